"""What a provider adapter is.

Theory of operation: the gateway speaks four operations, each in its public
wire format: ``chat`` and ``completions`` and ``embeddings`` (OpenAI) and
``messages`` (Anthropic). A provider lists the operations it takes
(``operations``); the gateway translates any other operation into one of
those before calling (``hapax.api._translate``), so adapters never translate
between the public formats themselves. Adapters that front a foreign wire format
(Gemini) convert inside ``send``.

``send`` returns a ``JsonReply`` or, for ``stream=True``, a ``StreamReply``
whose events are in the operation's wire format. The adapter fills
``reply.usage`` as the stream goes, so the gateway can count tokens whatever
the client asked for. All upstream I/O goes through the injected ``Transport``.

A 404 means one of two things. The provider's API answered that the model (or
deployment) does not exist: its own error body, JSON with an ``error``; that is
the request's problem (``upstream_bad_request``, 404). Or nothing at that path
speaks the API at all (a web server's "404: Not Found", FastAPI's
``{"detail": "Not Found"}``): the ``base_url`` is wrong, typically a missing or
doubled ``/v1``. That is the operator's problem (``UpstreamMisconfigured``,
502): it is logged once, shown as ``misconfigured`` in ``/v1/health/providers``
until a call succeeds, and ``hapax config validate --probe`` finds it before
any traffic does. ``route_missing`` tells them apart, per provider family.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import orjson

from .._errors import (
    InvalidField,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamMisconfigured,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .._sse import SSEDecoder, SSEEvent
from .._transport import (
    ConnectError,
    ConnectTimeout,
    FirstByteTimeout,
    ReadError,
    StreamIdleTimeout,
    TotalTimeout,
    Transport,
    TransportError,
    UpstreamRequest,
    UpstreamResponse,
)
from .._usage import Usage
from ..config import ProviderConfig, Timeouts

log = logging.getLogger("hapax.providers")

#: Token-free liveness requests by provider type: (default base URL, path under it).
#: Each lists models, which all of these APIs serve without spending tokens.
PROBES: dict[str, tuple[str, str]] = {
    "openai": ("https://api.openai.com/v1", "/models"),
    "azure-openai": ("", "/openai/models?api-version={api_version}"),
    "anthropic": ("https://api.anthropic.com", "/v1/models"),
    "gemini": ("https://generativelanguage.googleapis.com", "/v1beta/models"),
}
#: Headers that ask one provider family for something (a beta feature). A client's is
#: forwarded where the provider's ``forward_headers`` allows it, and refused elsewhere.
PROVIDER_HEADERS = ("anthropic-beta", "openai-beta")


def has_provider_headers(headers: Mapping[str, str]) -> bool:
    """Whether a client sent any of ``PROVIDER_HEADERS`` (spelled out: this runs per request)."""
    return "anthropic-beta" in headers or "openai-beta" in headers
#: Extra upstream header values shorter than this are not treated as secrets when
#: redacting error messages: "2023-06-01" or "true" would blank out ordinary words.
_MIN_SECRET_CHARS = 12
#: A generally available Azure OpenAI API version, for probes when none is configured.
_PROBE_AZURE_API_VERSION = "2024-10-21"


class Operation(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    MESSAGES = "messages"


@dataclass(slots=True)
class Call:
    op: Operation
    #: The request body in the operation's wire format; ``model`` is the upstream name.
    body: dict[str, Any]
    stream: bool
    request_id: str
    #: Client headers the provider's ``forward_headers`` let through (``anthropic-beta``...).
    #: Adapters put their own headers (credentials included) over these.
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class JsonReply:
    body: dict[str, Any]
    usage: Usage
    #: The upstream's bytes, when ``body`` is exactly what it sent; saves a re-encode.
    raw: bytes | None = None


#: A stream's events, in batches: everything decoded from one upstream read, so the
#: gateway writes once per read rather than once per event.
EventBatches = AsyncIterator[list[SSEEvent]]


@dataclass(slots=True)
class StreamReply:
    """A stream's events, relayed by one consumer (the gateway).

    The consumer relays ``first`` (a batch read ahead: the dispatcher waits for the
    first event before it commits to a deployment) before ``events``, and calls
    ``failed`` with an ``UpstreamError`` that ``events`` raised. Fields rather than
    wrapping generators, because every wrapper is one more generator step per batch.
    """

    events: EventBatches
    usage: Usage = field(default_factory=Usage)
    _close: Callable[[], None] | None = None
    first: list[SSEEvent] | None = None
    #: Told of an error the upstream's events raised mid-stream (the breaker learns of it).
    on_failure: Callable[[UpstreamError], None] | None = None

    def failed(self, exc: UpstreamError) -> None:
        """The events raised ``exc``: tell whoever watches the stream, once."""
        fn, self.on_failure = self.on_failure, None
        if fn is not None:
            fn(exc)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


Reply = JsonReply | StreamReply


class Provider(ABC):
    type: ClassVar[str]
    operations: ClassVar[frozenset[Operation]]
    #: Client headers forwarded upstream when the config's ``forward_headers`` is unset.
    default_forward_headers: ClassVar[tuple[str, ...]] = ()
    #: What a right ``base_url`` looks like, for the misconfiguration error.
    base_url_hint: ClassVar[str] = ""

    def __init__(self, *, name: str, config: ProviderConfig, transport: Transport) -> None:
        self.name = name
        self.config = config
        self.transport = transport
        fwd = config.forward_headers
        self.forward_headers: tuple[str, ...] = self.default_forward_headers if fwd is None else fwd
        #: Provider-specific headers a client may send that this provider would not get: a
        #: request carrying one is refused rather than answered without it.
        self.refused_headers = tuple(h for h in PROVIDER_HEADERS if h not in self.forward_headers)
        #: Why the last call found the provider misconfigured; None once a call succeeds.
        self.misconfigured: str | None = None

    @abstractmethod
    async def send(self, call: Call) -> Reply: ...

    def check(self, op: Operation, body: dict[str, Any]) -> None:
        """Raise ``InvalidField`` for a body this adapter cannot carry; runs before any attempt."""
        return None  # bodies in the adapter's own wire format pass through as they are

    def forwarded(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The client's headers to send upstream: the allowlisted ones, nothing else."""
        for name in self.refused_headers:
            if name in headers:
                raise InvalidField(
                    f"the {name} header cannot reach provider {self.name} ({self.type}); "
                    "remove it or use a model that takes it",
                    param=name, code="unsupported_parameter",
                )
        out = {}
        for name in self.forward_headers:
            value = headers.get(name)
            if value is not None:
                out[name] = value
        return out

    async def aclose(self) -> None:
        await self.transport.aclose()

    # -- health probes ---------------------------------------------------------------------

    async def probe(self, *, timeout: float, prompt_model: str | None = None, strict: bool = False) -> None:
        """Check the provider answers; raise ``UpstreamError`` when it does not.

        By default a token-free GET from ``PROBES`` (list models): any answer but
        5xx, 401 or 403 means the endpoint is up, since a 404 or 429 still proves
        it is serving. ``strict`` (``hapax config validate --probe``) also fails a
        404 that says the API is not at ``base_url`` at all; background probes do
        not, since some compatible servers have no models route. With
        ``prompt_model`` it sends a one-token completion instead, which spends
        tokens and is only made when configured.
        """
        if prompt_model is not None:
            await self._probe_prompt(prompt_model)
            return
        req = self.probe_request(timeout)
        if req is None:
            if self.type == "mock" and self.config.mock.failure_rate >= 1:
                raise UpstreamUnavailable(f"provider {self.name} is configured to always fail")
            return
        try:
            resp = await self.transport.send(req)
            try:
                raw = await resp.read()
            finally:
                resp.close()
        except TransportError as exc:
            raise translate_transport_error(exc, self.name) from exc
        if resp.status >= 500 or resp.status in (401, 403):
            raise self.error_from_status(resp.status, b"", resp.headers.get("retry-after"))
        if strict and resp.status == 404 and self.route_missing(raw):
            raise self.misconfiguration(req.method, req.url)

    def probe_request(self, timeout: float) -> UpstreamRequest | None:
        """The cheap probe for this provider type; ``None`` when there is nothing to call."""
        entry = PROBES.get(self.type)
        if entry is None:
            return None
        default_base, path = entry
        base = (self.config.base_url or default_base).rstrip("/")
        if base.endswith("/v1") and path.startswith("/v1/"):
            path = path[3:]  # the base already carries the version, as some SDKs spell it
        path = path.format(api_version=self.config.api_version or _PROBE_AZURE_API_VERSION)
        make_headers = getattr(self, "headers", None)
        headers: dict[str, str] = dict(make_headers()) if callable(make_headers) else dict(self.config.headers)
        headers.pop("content-type", None)
        t = Timeouts(connect=timeout, first_byte=timeout, total=timeout, stream_idle=timeout)
        return UpstreamRequest("GET", base + path, headers, None, t)

    async def _probe_prompt(self, model: str) -> None:
        messages = [{"role": "user", "content": "ping"}]
        if Operation.CHAT in self.operations:
            call = Call(Operation.CHAT, {"model": model, "messages": messages, "max_tokens": 1}, False, "probe")
        else:
            call = Call(Operation.MESSAGES, {"model": model, "messages": messages, "max_tokens": 1}, False, "probe")
        reply = await self.send(call)
        if isinstance(reply, StreamReply):
            reply.close()

    # -- helpers shared by HTTP adapters -------------------------------------------------

    async def _request(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> UpstreamResponse:
        """POST ``body`` as JSON; raise the gateway's error for a non-2xx status."""
        req = UpstreamRequest("POST", url, headers, orjson.dumps(body), self.config.timeouts)
        try:
            resp = await self.transport.send(req)
        except TransportError as exc:
            raise translate_transport_error(exc, self.name) from exc
        if resp.status >= 400:
            try:
                raw = await resp.read()
            except TransportError:
                raw = b""
            finally:
                resp.close()
            if resp.status == 404 and self.route_missing(raw):
                wrong = self.misconfiguration("POST", url)
                if self.misconfigured is None:
                    log.warning("provider misconfigured", extra={"fields": {
                        "provider": self.name, "error": wrong.message}})
                self.misconfigured = wrong.message
                raise wrong
            raise self.error_from_status(resp.status, raw, resp.headers.get("retry-after"))
        if self.misconfigured is not None:
            self.misconfigured = None  # it answers again (fixed upstream, or a proxy came back)
        return resp

    def route_missing(self, raw: bytes) -> bool:
        """Whether a 404 body says nothing serves this path, rather than "no such model".

        Every family's API answers a missing model with its own JSON error: OpenAI's
        and Anthropic's ``{"error": {...}}``, Gemini's ``{"error": {"status":
        "NOT_FOUND"}}``, vLLM's ``{"object": "error"}``, Ollama's ``{"error": "..."}``.
        A path nothing serves gets a web server's page or a framework's default.
        """
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(data, dict):
            return True
        return "error" not in data and data.get("object") != "error" and data.get("type") != "error"

    def misconfiguration(self, method: str, url: str) -> UpstreamMisconfigured:
        hint = f"; {self.base_url_hint}" if self.base_url_hint else ""
        return UpstreamMisconfigured(
            f"provider {self.name} is misconfigured: {method} {_without_secrets(url)} answered 404 for the "
            f"route itself, not for the model; check its base_url{hint}"
        )

    async def _read_json(self, resp: UpstreamResponse) -> tuple[dict[str, Any], bytes]:
        try:
            raw = await resp.read()
        except TransportError as exc:
            raise translate_transport_error(exc, self.name) from exc
        finally:
            resp.close()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable(f"provider {self.name} sent a body that is not JSON") from None
        if not isinstance(data, dict):
            raise UpstreamUnavailable(f"provider {self.name} sent JSON that is not an object")
        return data, raw

    async def _events(self, resp: UpstreamResponse) -> EventBatches:
        """Decode an upstream SSE body, one batch per read; a cut or stalled stream raises ``UpstreamError``."""
        decoder = SSEDecoder()
        try:
            async for chunk in resp.iter_chunks():
                batch = decoder.feed(chunk)
                if batch:
                    yield batch
            tail = decoder.close()
            if tail is not None:
                yield [tail]
        except TransportError as exc:
            raise translate_transport_error(exc, self.name) from exc
        finally:
            resp.close()

    def error_message(self, raw: bytes) -> str:
        """Pull the provider's own message out of its error body (OpenAI/Anthropic shapes).

        The message reaches the client, the logs and ``/v1/health/providers``, so any
        of the provider's own credentials it echoes are cut out first.
        """
        return self.redact(self._raw_error_message(raw))

    def _raw_error_message(self, raw: bytes) -> str:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw[:200].decode("utf-8", "replace").strip()
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return str(data["message"])
        return raw[:200].decode("utf-8", "replace")

    def redact(self, text: str) -> str:
        """``text`` without the provider's api_key or extra header values (some upstreams echo them)."""
        secrets = [v for v in self.config.headers.values() if len(v) >= _MIN_SECRET_CHARS]
        if self.config.api_key is not None:
            secrets.append(self.config.api_key.get_secret_value())
        for secret in sorted(secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text

    def error_from_status(self, status: int, raw: bytes, retry_after: str | None) -> UpstreamError:
        if status in (401, 403):
            # The gateway's credential for the provider is wrong: not the caller's fault, and
            # none of the caller's business. Providers' messages here quote the key (OpenAI:
            # "Incorrect API key provided: sk-proj-****abcd"), so none of it is passed on.
            return UpstreamUnavailable(
                f"provider {self.name} refused the gateway's credentials ({status}); check its api_key",
                code="upstream_auth_failed",
            )
        detail = self.error_message(raw)
        msg = f"provider {self.name} returned {status}: {detail}"
        if status == 429:
            return UpstreamRateLimited(msg, retry_after=parse_retry_after(retry_after))
        if status == 408:
            return UpstreamTimeout(msg)
        if 400 <= status < 500:
            return UpstreamBadRequest(msg, status=400 if status not in (404, 413, 422) else status)
        return UpstreamUnavailable(msg, retry_after=parse_retry_after(retry_after))


def _without_secrets(url: str) -> str:
    """``url`` without userinfo or query: both can carry credentials."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: rare from LLM providers; treat as unknown


def translate_transport_error(exc: TransportError, provider: str) -> UpstreamError:
    if isinstance(exc, ConnectTimeout | FirstByteTimeout):
        return UpstreamTimeout(f"provider {provider} timed out ({type(exc).__name__})")
    if isinstance(exc, TotalTimeout):
        return UpstreamTimeout(f"provider {provider}: the exchange passed its timeouts.total")
    if isinstance(exc, StreamIdleTimeout):
        return UpstreamTimeout(f"provider {provider} stream stalled", code="upstream_stream_idle")
    if isinstance(exc, ConnectError):
        return UpstreamUnavailable(f"cannot connect to provider {provider}: {exc}")
    if isinstance(exc, ReadError):
        return UpstreamUnavailable(f"provider {provider} connection broke: {exc}")
    return UpstreamUnavailable(f"provider {provider} failed: {exc}")
