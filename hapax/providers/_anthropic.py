"""Anthropic's Messages API.

The adapter takes ``messages`` only; chat and completions reach it through
``hapax.api._translate_anthropic``. Bodies pass through with ``model`` already
rewritten. Streams pass through event by event; the adapter reads usage from
``message_start`` and ``message_delta`` as they go by (parsing only those
events, not every delta), and turns an ``error`` event into an
``UpstreamError`` raised from the stream, so the gateway ends the client's
stream with its own error event.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from .._errors import (
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .._sse import SSEEvent
from .._transport import UpstreamResponse
from .._usage import Usage
from ._base import Call, EventBatches, JsonReply, Operation, Provider, Reply, StreamReply

DEFAULT_BASE_URL = "https://api.anthropic.com"

#: Anthropic error ``type`` -> the gateway error it is, for errors that arrive mid-stream
#: (no HTTP status to go by then).
_STREAM_ERRORS: dict[str, type[UpstreamError]] = {
    "invalid_request_error": UpstreamBadRequest,
    "request_too_large": UpstreamBadRequest,
    "rate_limit_error": UpstreamRateLimited,
    "timeout_error": UpstreamTimeout,
    "overloaded_error": UpstreamUnavailable,
    "api_error": UpstreamUnavailable,
}


class AnthropicProvider(Provider):
    type = "anthropic"
    operations: ClassVar[frozenset[Operation]] = frozenset({Operation.MESSAGES})
    default_forward_headers: ClassVar[tuple[str, ...]] = ("anthropic-beta",)
    base_url_hint = "an anthropic provider's base_url is the host, with or without /v1 (https://api.anthropic.com)"

    def route_missing(self, raw: bytes) -> bool:
        # Anthropic answers an unknown path in its own shape, but with the bare message
        # "Not Found"; an unknown model names the model ("model: claude-x").
        try:
            err = orjson.loads(raw).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            return True
        if isinstance(err, dict) and err.get("message") == "Not Found":
            return True
        return super().route_missing(raw)

    @property
    def url(self) -> str:
        base = (self.config.base_url or DEFAULT_BASE_URL).rstrip("/")
        # Anthropic's SDKs take the host without /v1; accept either spelling.
        return base + ("/messages" if base.endswith("/v1") else "/v1/messages")

    def headers(self) -> dict[str, str]:
        h = {
            "content-type": "application/json",
            "accept": "application/json",
            "anthropic-version": self.config.anthropic_version,
        }
        if self.config.api_key is not None:
            h["x-api-key"] = self.config.api_key.get_secret_value()
        h.update(self.config.headers)
        return h

    async def send(self, call: Call) -> Reply:
        headers = {**call.headers, **self.headers()} if call.headers else self.headers()
        headers["x-request-id"] = call.request_id
        resp = await self._request(self.url, headers, call.body)
        if not call.stream:
            data, raw = await self._read_json(resp)
            usage = Usage()
            usage.take_anthropic(data.get("usage"))
            return JsonReply(body=data, usage=usage, raw=raw)
        reply = StreamReply(events=_empty())
        reply.events = self._stream(resp, reply.usage)
        reply._close = resp.close
        return reply

    async def _stream(self, resp: UpstreamResponse, usage: Usage) -> EventBatches:
        async for batch in self._events(resp):
            for i, ev in enumerate(batch):
                name = ev.event
                if name == "message_start":
                    msg = _object(ev).get("message")
                    usage.take_anthropic(msg.get("usage") if isinstance(msg, dict) else None)
                elif name == "message_delta":
                    usage.take_anthropic(_object(ev).get("usage"))
                elif name == "error":
                    if i:
                        yield batch[:i]  # what came before the error still reaches the client
                    raise self.stream_error(ev.data)
            yield batch

    def stream_error(self, raw: bytes) -> UpstreamError:
        """The gateway error for an ``error`` event that arrived mid-stream."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        err = data.get("error") if isinstance(data, dict) else None
        kind = err.get("type") if isinstance(err, dict) else None
        cls = _STREAM_ERRORS.get(kind if isinstance(kind, str) else "", UpstreamUnavailable)
        return cls(f"provider {self.name} failed mid-stream: {self.error_message(raw)}")

    def error_message(self, raw: bytes) -> str:
        """Anthropic's message, prefixed by its error type (overloaded_error says a lot)."""
        msg = super().error_message(raw)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return msg
        err = data.get("error") if isinstance(data, dict) else None
        kind = err.get("type") if isinstance(err, dict) else None
        return f"{kind}: {msg}" if isinstance(kind, str) and kind else msg


def _object(ev: SSEEvent) -> dict[str, Any]:
    try:
        data = ev.json()
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


async def _empty() -> EventBatches:
    return
    yield  # pragma: no cover
