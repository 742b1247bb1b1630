"""OpenAI and every server that speaks its API (vLLM, Ollama /v1, Groq, Together, ...).

Requests pass through with only ``model`` rewritten. For streams the adapter
always asks the upstream for usage (``stream_options.include_usage``) so the
gateway can count tokens, and hides that final usage-only chunk again when the
client did not ask for it.
"""

from __future__ import annotations

from typing import ClassVar

import orjson

from .._sse import SSEDecoder, SSEEvent
from .._transport import Transport, TransportError, UpstreamResponse
from .._usage import Usage
from ..config import ProviderConfig
from ._base import (
    Call,
    EventBatches,
    JsonReply,
    Operation,
    Provider,
    Reply,
    StreamReply,
    translate_transport_error,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"

_PATHS = {
    Operation.CHAT: "/chat/completions",
    Operation.COMPLETIONS: "/completions",
    Operation.EMBEDDINGS: "/embeddings",
}


class OpenAIProvider(Provider):
    type = "openai"
    operations: ClassVar[frozenset[Operation]] = frozenset(_PATHS)
    #: Not OpenAI-Organization/-Project: those pick whose account the gateway's key bills.
    default_forward_headers: ClassVar[tuple[str, ...]] = ("openai-beta",)
    base_url_hint = "an openai provider's base_url usually ends in /v1 (https://api.openai.com/v1, http://HOST:8000/v1)"

    def __init__(self, *, name: str, config: ProviderConfig, transport: Transport) -> None:
        super().__init__(name=name, config=config, transport=transport)
        # Built once: headers and URLs depend only on the (immutable) config.
        self._headers = self.headers()
        self._urls: dict[tuple[Operation, str], str] = {}

    def route_missing(self, raw: bytes) -> bool:
        # api.openai.com answers a path it does not serve in its own error shape, with a
        # message of its own: "Invalid URL (POST /chat/completions)".
        try:
            err = orjson.loads(raw).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            return True
        if isinstance(err, dict) and str(err.get("message", "")).startswith("Invalid URL ("):
            return True
        return super().route_missing(raw)

    def url(self, op: Operation, model: str) -> str:
        base = (self.config.base_url or DEFAULT_BASE_URL).rstrip("/")
        return base + _PATHS[op]

    def headers(self) -> dict[str, str]:
        h = {"content-type": "application/json", "accept": "application/json"}
        if self.config.api_key is not None:
            h["authorization"] = "Bearer " + self.config.api_key.get_secret_value()
        h.update(self.config.headers)
        return h

    async def send(self, call: Call) -> Reply:
        body = call.body
        headers = {**call.headers, **self._headers, "x-request-id": call.request_id}
        wants_usage = True
        if call.stream:
            opts = body.get("stream_options")
            wants_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            if not wants_usage:
                body = dict(body)
                body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        key = (call.op, str(body.get("model", "")))
        url = self._urls.get(key)
        if url is None:
            # Bounded: one entry per operation and configured deployment.
            url = self._urls[key] = self.url(*key)
        resp = await self._request(url, headers, body)
        if not call.stream:
            data, raw = await self._read_json(resp)
            usage = Usage()
            usage.take_openai(data.get("usage"))
            return JsonReply(body=data, usage=usage, raw=raw)
        reply = StreamReply(events=_empty())
        reply.events = self._stream(resp, reply.usage, wants_usage)
        reply._close = resp.close
        return reply

    async def _stream(self, resp: UpstreamResponse, usage: Usage, wants_usage: bool) -> EventBatches:
        # Decodes the body itself rather than through ``_events``: one generator step per
        # upstream read instead of two, on the path every streamed token takes.
        decoder = SSEDecoder()
        try:
            async for chunk in resp.iter_chunks():
                batch = decoder.feed(chunk)
                if batch:
                    for ev in batch:
                        if ev.data == b"[DONE]" or b'"usage"' in ev.data:
                            batch = self._kept(batch, usage, wants_usage)
                            break
                    if batch:
                        yield batch
            tail = decoder.close()
            if tail is not None and (batch := self._kept([tail], usage, wants_usage)):
                yield batch
        except TransportError as exc:
            raise translate_transport_error(exc, self.name) from exc
        finally:
            resp.close()

    @staticmethod
    def _kept(batch: list[SSEEvent], usage: Usage, wants_usage: bool) -> list[SSEEvent]:
        """``batch`` without ``[DONE]`` (the gateway writes its own terminator), counting usage
        and hiding the usage-only chunk the client did not ask for."""
        out = []
        for ev in batch:
            if ev.data == b"[DONE]":
                continue
            if b'"usage"' in ev.data:
                chunk = ev.json()
                if isinstance(chunk, dict) and chunk.get("usage"):
                    usage.take_openai(chunk["usage"])
                    if not wants_usage and not chunk.get("choices"):
                        continue
            out.append(ev)
        return out


async def _empty() -> EventBatches:
    return
    yield  # pragma: no cover
