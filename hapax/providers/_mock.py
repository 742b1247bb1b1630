"""The ``mock`` provider: deterministic answers in every operation's wire format.

For demos (the embedded default serves one) and tests. The same request always
gets the same reply: it echoes the last user message unless a fixed ``reply``
is configured. Latency, inter-chunk delay and a failure rate are configurable.
No network I/O: the transport is never used.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import orjson

from .._sse import SSEEvent
from .._usage import Usage, estimate_prompt_tokens, text_of
from ._base import PROVIDER_HEADERS, Call, EventBatches, JsonReply, Operation, Provider, Reply, StreamReply


class MockProvider(Provider):
    type = "mock"
    operations: ClassVar[frozenset[Operation]] = frozenset(Operation)
    #: A stand-in for any provider: it takes (and ignores) every family's headers.
    default_forward_headers: ClassVar[tuple[str, ...]] = PROVIDER_HEADERS

    _rng = random.Random(0)

    async def send(self, call: Call) -> Reply:
        s = self.config.mock
        if s.latency_ms:
            await asyncio.sleep(s.latency_ms / 1000)
        if s.failure_rate and self._rng.random() < s.failure_rate:
            if s.failure_mode == "exception":
                raise RuntimeError("mock provider: injected bug")
            raw = orjson.dumps({"error": {"message": "injected failure", "type": "mock_error"}})
            raise self.error_from_status(s.failure_status, raw, "1" if s.failure_status == 429 else None)
        body = call.body
        model = str(body.get("model", "mock"))
        usage = Usage(prompt_tokens=estimate_prompt_tokens(body), reported=True)
        if call.op is Operation.EMBEDDINGS:
            return JsonReply(body=self._embeddings(body, usage), usage=usage)
        text = self._reply_text(body)
        words = _split_words(text)
        usage.completion_tokens = len(words)
        tool = _first_tool(body) if call.op in (Operation.CHAT, Operation.MESSAGES) else None
        if not call.stream:
            return JsonReply(body=_BUILD[call.op](model, text, tool, usage, call.request_id), usage=usage)
        gen = _STREAM[call.op](model, words, tool, usage, call.request_id, body, s.chunk_delay_ms / 1000)
        return StreamReply(events=_one_per_batch(gen), usage=usage)

    def _reply_text(self, body: dict[str, Any]) -> str:
        s = self.config.mock
        if s.reply is not None:
            text = s.reply
        else:
            prompt = _last_user_text(body)
            text = f"Hello from Hapax! You said: {prompt}" if prompt else "Hello from Hapax!"
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
            text = orjson.dumps({"reply": text}).decode()
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(max_tokens, int) and max_tokens > 0:
            text = "".join(_split_words(text)[:max_tokens])
        return text

    def _embeddings(self, body: dict[str, Any], usage: Usage) -> dict[str, Any]:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else None
        n = dims or self.config.mock.embedding_dimensions
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(items):
            vec = _vector(orjson.dumps(item), n)
            emb: Any = base64.b64encode(struct.pack(f"<{n}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        usage.completion_tokens = 0
        return {
            "object": "list",
            "data": data,
            "model": str(body.get("model", "mock")),
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
        }


async def _one_per_batch(events: AsyncIterator[SSEEvent]) -> EventBatches:
    # Each mock event stands for one upstream read, as a paced real stream would arrive.
    async for ev in events:
        yield [ev]


def _vector(seed: bytes, n: int) -> list[float]:
    out: list[float] = []
    counter = 0
    while len(out) < n:
        digest = hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        out.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    vec = out[:n]
    norm = sum(x * x for x in vec) ** 0.5 or 1.0
    # Round-trip through float32 so the float and base64 forms agree exactly.
    return [struct.unpack("<f", struct.pack("<f", x / norm))[0] for x in vec]


def _split_words(text: str) -> list[str]:
    """Split keeping the spaces, so the chunks join back to the exact text."""
    words: list[str] = []
    for i, w in enumerate(text.split(" ")):
        words.append(w if i == 0 else " " + w)
    return [w for w in words if w]


def _last_user_text(body: dict[str, Any]) -> str:
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "user":
                return text_of(m.get("content"))[:200]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:200]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0][:200]
    return ""


def _first_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("type") == "none":
        return None
    t = tools[0]
    if isinstance(t, dict):
        fn = t.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return str(fn["name"])
        if isinstance(t.get("name"), str):
            return str(t["name"])
    return None


def _id(prefix: str, request_id: str) -> str:
    return prefix + hashlib.sha1(request_id.encode()).hexdigest()[:24]


# -- OpenAI chat ---------------------------------------------------------------------------


def _chat(model: str, text: str, tool: str | None, usage: Usage, rid: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    finish = "stop"
    if tool:
        msg = {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [{
                "id": _id("call_", rid), "type": "function",
                "function": {"name": tool, "arguments": "{}"},
            }],
        }
        finish = "tool_calls"
    return {
        "id": _id("chatcmpl-", rid),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
        "usage": usage.openai(),
    }


async def _chat_stream(
    model: str, words: list[str], tool: str | None, usage: Usage, rid: str,
    body: dict[str, Any], delay: float,
) -> AsyncIterator[SSEEvent]:
    base = {"id": _id("chatcmpl-", rid), "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> SSEEvent:
        c = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return SSEEvent(data=orjson.dumps(c))

    yield chunk({"role": "assistant", "content": ""})
    if tool:
        yield chunk({"tool_calls": [{"index": 0, "id": _id("call_", rid), "type": "function",
                                     "function": {"name": tool, "arguments": ""}}]})
        yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
        yield chunk({}, "tool_calls")
    else:
        for w in words:
            if delay:
                await asyncio.sleep(delay)
            yield chunk({"content": w})
        yield chunk({}, "stop")
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        yield SSEEvent(data=orjson.dumps({**base, "choices": [], "usage": usage.openai()}))


# -- OpenAI legacy completions -------------------------------------------------------------


def _completion(model: str, text: str, tool: str | None, usage: Usage, rid: str) -> dict[str, Any]:
    return {
        "id": _id("cmpl-", rid),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage.openai(),
    }


async def _completion_stream(
    model: str, words: list[str], tool: str | None, usage: Usage, rid: str,
    body: dict[str, Any], delay: float,
) -> AsyncIterator[SSEEvent]:
    base = {"id": _id("cmpl-", rid), "object": "text_completion",
            "created": int(time.time()), "model": model}
    for i, w in enumerate(words):
        if delay and i:
            await asyncio.sleep(delay)
        yield SSEEvent(data=orjson.dumps({**base, "choices": [
            {"index": 0, "text": w, "logprobs": None, "finish_reason": None}]}))
    yield SSEEvent(data=orjson.dumps({**base, "choices": [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]}))
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        yield SSEEvent(data=orjson.dumps({**base, "choices": [], "usage": usage.openai()}))


# -- Anthropic messages --------------------------------------------------------------------


def _message(model: str, text: str, tool: str | None, usage: Usage, rid: str) -> dict[str, Any]:
    content: list[dict[str, Any]]
    if tool:
        content = [{"type": "tool_use", "id": _id("toolu_", rid), "name": tool, "input": {}}]
    else:
        content = [{"type": "text", "text": text}]
    return {
        "id": _id("msg_", rid),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "tool_use" if tool else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens},
    }


async def _message_stream(
    model: str, words: list[str], tool: str | None, usage: Usage, rid: str,
    body: dict[str, Any], delay: float,
) -> AsyncIterator[SSEEvent]:
    def ev(name: str, data: dict[str, Any]) -> SSEEvent:
        return SSEEvent(data=orjson.dumps({"type": name, **data}), event=name)

    start = _message(model, "", None, usage, rid)
    start["content"] = []
    start["stop_reason"] = None
    start["usage"] = {"input_tokens": usage.prompt_tokens, "output_tokens": 1}
    yield ev("message_start", {"message": start})
    if tool:
        yield ev("content_block_start", {"index": 0, "content_block": {
            "type": "tool_use", "id": _id("toolu_", rid), "name": tool, "input": {}}})
        yield ev("content_block_delta", {"index": 0, "delta": {
            "type": "input_json_delta", "partial_json": "{}"}})
    else:
        yield ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        yield ev("ping", {})
        for w in words:
            if delay:
                await asyncio.sleep(delay)
            yield ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
    yield ev("content_block_stop", {"index": 0})
    yield ev("message_delta", {
        "delta": {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": usage.completion_tokens},
    })
    yield ev("message_stop", {})


_BUILD = {
    Operation.CHAT: _chat,
    Operation.COMPLETIONS: _completion,
    Operation.MESSAGES: _message,
}
_STREAM = {
    Operation.CHAT: _chat_stream,
    Operation.COMPLETIONS: _completion_stream,
    Operation.MESSAGES: _message_stream,
}
