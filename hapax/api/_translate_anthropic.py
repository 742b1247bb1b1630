"""OpenAI chat completions <-> Anthropic messages, both directions.

Theory of operation: two translations are registered at import.

- ``CHAT -> MESSAGES``: the client speaks OpenAI chat, the provider takes
  Anthropic messages. ``chat_to_messages_request`` builds the Anthropic body,
  ``messages_to_chat_response`` turns the Anthropic message back into a
  ``chat.completion``, and ``ChatFromMessagesStream`` turns Anthropic's
  event sequence into ``chat.completion.chunk`` events.
- ``MESSAGES -> CHAT``: the reverse, for Anthropic clients of OpenAI-shaped
  providers: ``messages_to_chat_request``, ``chat_to_messages_response`` and
  ``MessagesFromChatStream``.

Rules both directions keep:

- OpenAI ``system``/``developer`` messages are Anthropic's top-level
  ``system``; Anthropic has no system role inside ``messages``.
- Tool results are OpenAI ``tool`` messages but Anthropic ``tool_result``
  blocks inside a user turn; consecutive ones share one user turn, and any
  user content right after them joins that turn, because Anthropic wants
  the roles to alternate.
- Tool arguments are a JSON string in OpenAI and an object in Anthropic.
- Anthropic requires ``max_tokens``; an OpenAI request without one gets
  ``DEFAULT_MAX_TOKENS``.
- Every top-level field is in a table (``CHAT_TO_MESSAGES_FIELDS``,
  ``MESSAGES_TO_CHAT_FIELDS``, ``hapax._translate_fields``): carried, or
  accepted only with a value that asks for nothing (``n: 1``), or refused.
  A request the other side cannot express (``n > 1``, ``seed``, an unknown
  field or content part, a server tool) is refused with a 400 naming the
  field, rather than silently answered differently.
- Prompt caching: OpenAI-format ``cache_control`` markers (on content parts,
  on a message, on a tool) become Anthropic's ``cache_control`` on the
  matching block. The other way they are accepted and not sent, since
  OpenAI-compatible servers cache prefixes by themselves; either way cached
  tokens come back in usage.
- Reasoning: ``reasoning_effort`` becomes ``thinking.budget_tokens`` and back,
  by the table in ``hapax._translate_fields``; ``max_tokens`` grows to keep
  Anthropic's rule that the budget is below it.
- A stream that ends before its terminal event raises ``UpstreamUnavailable``
  from ``finish``, so the client sees an error event, not a clean end.

Everything here is pure apart from the ``created`` timestamp the registered
factories read, which OpenAI shapes require and Anthropic's lack.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson

from .._errors import InvalidField, UpstreamUnavailable
from .._sse import SSEEvent
from .._translate_fields import CHAT_NEUTRAL, cache_control, reasoning_budget, reasoning_effort, refuse_unknown
from .._usage import Usage, estimate_prompt_tokens
from ..providers import Operation
from ._translate import StreamTranslator, Translation, register

#: Anthropic requires max_tokens and OpenAI does not; 4096 is what every current
#: Claude model accepts, and long enough that an unset limit rarely truncates.
DEFAULT_MAX_TOKENS = 4096

_DATA_URL = re.compile(r"^data:([^;,]+);base64,(.*)$", re.DOTALL)

# Anthropic stop_reason -> OpenAI finish_reason
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# OpenAI finish_reason -> Anthropic stop_reason
_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _loads(raw: str, where: str) -> Any:
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise InvalidField(f"{where} is not valid JSON", param=where) from None


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """An OpenAI content value that may only hold text (system, tool, assistant) as Anthropic
    text blocks, each part's ``cache_control`` kept."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(_with_cache({"type": "text", "text": part["text"]}, part, f"{where}[{i}]"))
            else:
                raise InvalidField(f"{where}[{i}] must be a text part", param=f"{where}[{i}]")
        return out
    raise InvalidField(f"{where} must be a string or an array of parts", param=where)


def _with_cache(block: dict[str, Any], part: dict[str, Any], where: str) -> dict[str, Any]:
    """``block`` with the ``cache_control`` of the OpenAI-format ``part`` it came from."""
    marker = part.get("cache_control")
    if marker is not None:
        block["cache_control"] = cache_control(marker, where)
    return block


def _mark_last(blocks: list[dict[str, Any]], message: dict[str, Any], where: str) -> None:
    """A message-level ``cache_control`` (LiteLLM's form) marks the message's last block, which
    is where Anthropic's breakpoint for "everything up to here" goes."""
    marker = message.get("cache_control")
    if marker is not None and blocks:
        blocks[-1]["cache_control"] = cache_control(marker, where)


# =========================================================================================
# CHAT -> MESSAGES: OpenAI chat client, Anthropic provider
# =========================================================================================


def _image_block(url: str, where: str) -> dict[str, Any]:
    m = _DATA_URL.match(url)
    if m:
        return {"type": "image", "source": {"type": "base64", "media_type": m.group(1), "data": m.group(2)}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidField(f"{where} must be a base64 data: URL or an http(s) URL", param=where)


def _user_blocks(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidField(f"{where} must be a string or an array of parts", param=where)
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        here = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            block: dict[str, Any] = {"type": "text", "text": part["text"]}
        elif kind == "image_url":
            img = part.get("image_url")
            url = img.get("url") if isinstance(img, dict) else img
            if not isinstance(url, str):
                raise InvalidField(f"{here}.image_url.url must be a string", param=here)
            block = _image_block(url, here)
        elif kind == "file" and isinstance(part.get("file"), dict):
            m = _DATA_URL.match(str(part["file"].get("file_data", "")))
            if not m:
                raise InvalidField(f"{here}.file needs file_data as a base64 data: URL", param=here)
            block = {"type": "document",
                     "source": {"type": "base64", "media_type": m.group(1), "data": m.group(2)}}
        else:
            raise InvalidField(f"{here}: content part type {kind!r} is not supported by this model",
                               param=here)
        blocks.append(_with_cache(block, part, here))
    return blocks


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _append_turn(turns: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    """Add a turn, merging into the previous one of the same role (Anthropic alternates roles)."""
    if turns and turns[-1]["role"] == role:
        prev = turns[-1]
        prev["content"] = _as_blocks(prev["content"]) + _as_blocks(content)
    else:
        turns.append({"role": role, "content": content})


def _tool_choice_to_anthropic(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice is None:
        out = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        out = {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise InvalidField("'tool_choice' must be auto, none, required or a function", param="tool_choice")
    if parallel is False:
        out = dict(out or {"type": "auto"})
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


#: OpenAI chat fields ``chat_to_messages_request`` carries. ``metadata`` (tags for OpenAI's
#: stored completions) and ``prompt_cache_key`` (a cache routing hint; Anthropic caches by
#: ``cache_control`` prefix) change nothing in the answer and are accepted without effect.
CHAT_TO_MESSAGES_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "stop", "stream", "stream_options", "user", "safety_identifier", "tools", "tool_choice",
    "parallel_tool_calls", "reasoning_effort", "service_tier", "metadata", "prompt_cache_key",
})
_CHAT_TO_MESSAGES_NEUTRAL = {k: v for k, v in CHAT_NEUTRAL.items() if k not in CHAT_TO_MESSAGES_FIELDS}
#: OpenAI service_tier -> Anthropic's: "default" is OpenAI's standard tier.
_SERVICE_TIERS = {"auto": "auto", "default": "standard_only"}


def chat_to_messages_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic messages request. ``body`` is left untouched."""
    refuse_unknown(body, CHAT_TO_MESSAGES_FIELDS, _CHAT_TO_MESSAGES_NEUTRAL, "Anthropic")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(body.get("messages") or []):
        where = f"messages[{i}]"
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer"):
            blocks = _text_blocks(content, f"{where}.content")
            _mark_last(blocks, m, where)
            system.extend(blocks)
        elif role == "user":
            user = _user_blocks(content, f"{where}.content")
            if m.get("cache_control") is not None:
                user = _as_blocks(user) or [{"type": "text", "text": ""}]
                _mark_last(user, m, where)
            _append_turn(turns, "user", user)
        elif role == "assistant":
            blocks = []
            if isinstance(content, str):
                if content:
                    blocks.append({"type": "text", "text": content})
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if isinstance(part, dict) and part.get("type") == "refusal":
                        blocks.append({"type": "text", "text": str(part.get("refusal", ""))})
                    else:
                        blocks.extend(b for b in _text_blocks([part], f"{where}.content[{j}]") if b["text"])
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise InvalidField(f"{where}.tool_calls must be an array", param=where)
            for j, tc in enumerate(calls):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict):
                    raise InvalidField(f"{where}.tool_calls[{j}] needs a function", param=where)
                args = _loads(fn.get("arguments") or "", f"{where}.tool_calls[{j}].function.arguments")
                blocks.append({"type": "tool_use", "id": tc.get("id"), "name": fn.get("name"), "input": args})
            _mark_last(blocks, m, where)
            if blocks:  # Anthropic refuses an empty turn; an empty OpenAI one carries nothing
                _append_turn(turns, "assistant", blocks)
        elif role == "tool":
            texts = _text_blocks(content, f"{where}.content")
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": m.get("tool_call_id"),
                "content": "\n".join(t["text"] for t in texts),
            }
            # Anthropic marks the whole tool_result; any marked part (or the message) marks it.
            for t in texts:
                if "cache_control" in t:
                    result["cache_control"] = t["cache_control"]
            _mark_last([result], m, where)
            _append_turn(turns, "user", [result])
        else:
            raise InvalidField(f"{where}.role {role!r} is not supported by this model", param=where)

    out: dict[str, Any] = {"model": body.get("model"), "messages": turns}
    if system:
        if len(system) == 1 and "cache_control" not in system[0]:
            out["system"] = system[0]["text"]
        else:
            out["system"] = system
    mt = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = mt if isinstance(mt, int) and mt > 0 else DEFAULT_MAX_TOKENS
    effort = body.get("reasoning_effort")
    if effort is not None:
        budget = reasoning_budget(effort)
        if budget is not None:
            out["thinking"] = {"type": "enabled", "budget_tokens": budget}
            if not (isinstance(mt, int) and mt > budget):
                # Anthropic wants budget_tokens < max_tokens. OpenAI's limit counts reasoning too,
                # so a larger one stands; a smaller (or no) limit keeps that much room for the
                # answer on top of the thinking budget.
                out["max_tokens"] = budget + out["max_tokens"]
    temp = body.get("temperature")
    if isinstance(temp, int | float):
        # OpenAI's range is 0..2, Anthropic's 0..1: clamp rather than let the upstream refuse.
        out["temperature"] = min(float(temp), 1.0)
    for key in ("top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = list(stop)
    if body.get("stream"):
        out["stream"] = True
    user_id = body.get("user") or body.get("safety_identifier")
    if isinstance(user_id, str):
        out["metadata"] = {"user_id": user_id}
    tier = body.get("service_tier")
    if tier is not None:
        if tier not in _SERVICE_TIERS:
            raise InvalidField("'service_tier' must be 'auto' or 'default' for this model",
                               param="service_tier", code="unsupported_parameter")
        out["service_tier"] = _SERVICE_TIERS[tier]
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = []
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or t.get("type", "function") != "function":
                raise InvalidField(f"tools[{i}] must be a function tool", param=f"tools[{i}]")
            tool: dict[str, Any] = {
                "name": fn.get("name"),
                "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
            }
            if fn.get("description"):
                tool["description"] = fn["description"]
            out["tools"].append(_with_cache(tool, t, f"tools[{i}]"))
    choice = _tool_choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and "tools" in out:
        out["tool_choice"] = choice
    return out


def messages_to_chat_response(body: dict[str, Any], usage: Usage, *, created: int) -> dict[str, Any]:
    """An Anthropic message as an OpenAI ``chat.completion``."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in body.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": _dumps(block.get("input", {}))}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": body.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": body.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _FINISH.get(body.get("stop_reason") or "", "stop")}],
        "usage": usage.openai(),
    }


class ChatFromMessagesStream(StreamTranslator):
    """Anthropic stream events in, OpenAI ``chat.completion.chunk`` events out."""

    def __init__(self, model: str, *, include_usage: bool, created: int) -> None:
        self.include_usage = include_usage
        self.base: dict[str, Any] = {"id": "", "object": "chat.completion.chunk", "created": created,
                                     "model": model}
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.done = False
        #: Anthropic content block index -> OpenAI tool_calls index
        self.tools: dict[int, int] = {}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> SSEEvent:
        c = {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return SSEEvent(data=orjson.dumps(c))

    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        data = event.json()
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "input_json_delta":
                idx = self.tools.get(data.get("index", -1))
                if idx is None:
                    return []
                return [self._chunk({"tool_calls": [
                    {"index": idx, "function": {"arguments": delta.get("partial_json", "")}}]})]
            return []  # thinking and signature deltas have no chat equivalent
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") != "tool_use":
                return []
            idx = self.tools[data.get("index", -1)] = len(self.tools)
            return [self._chunk({"tool_calls": [{"index": idx, "id": block.get("id"), "type": "function",
                                                 "function": {"name": block.get("name"), "arguments": ""}}]})]
        if kind == "message_start":
            msg = data.get("message") or {}
            self.base["id"] = msg.get("id", "")
            self.base["model"] = msg.get("model") or self.base["model"]
            self.usage.take_anthropic(msg.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "message_delta":
            self.usage.take_anthropic(data.get("usage"))
            reason = (data.get("delta") or {}).get("stop_reason")
            self.finish_reason = _FINISH.get(reason or "", "stop")
            return [self._chunk({}, self.finish_reason)]
        if kind == "message_stop":
            self.done = True
            if self.include_usage:
                return [SSEEvent(data=orjson.dumps({**self.base, "choices": [],
                                                    "usage": self.usage.openai()}))]
            return []
        if kind == "error":
            err = data.get("error") or {}
            raise UpstreamUnavailable(f"upstream stream failed: {err.get('message', 'unknown error')}")
        return []  # ping, content_block_stop, and event types added later

    def finish(self, usage: Usage) -> list[SSEEvent]:
        if not self.done:
            raise UpstreamUnavailable("upstream stream ended before message_stop")
        return []


def _chat_stream_factory(model: str, body: dict[str, Any]) -> StreamTranslator:
    opts = body.get("stream_options")
    include = isinstance(opts, dict) and bool(opts.get("include_usage"))
    return ChatFromMessagesStream(model, include_usage=include, created=int(time.time()))


# =========================================================================================
# MESSAGES -> CHAT: Anthropic client, OpenAI chat provider
# =========================================================================================


def _image_url(source: Any, where: str) -> str:
    if isinstance(source, dict):
        if source.get("type") == "base64":
            return f"data:{source.get('media_type')};base64,{source.get('data')}"
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return str(source["url"])
    raise InvalidField(f"{where}.source must be a base64 or url source", param=where)


def _openai_parts(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for i, b in enumerate(blocks):
        here = f"{where}[{i}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": b.get("text", "")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(b.get("source"), here)}})
        elif kind == "document":
            src = b.get("source") or {}
            if src.get("type") == "text":
                parts.append({"type": "text", "text": src.get("data", "")})
            elif src.get("type") == "base64":
                parts.append({"type": "file", "file": {
                    "file_data": f"data:{src.get('media_type')};base64,{src.get('data')}",
                    "filename": b.get("title") or "document.pdf"}})
            else:
                raise InvalidField(f"{here}: document source {src.get('type')!r} is not supported", param=here)
        else:
            raise InvalidField(f"{here}: content block type {kind!r} is not supported by this model", param=here)
    return parts


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A lone text part as a plain string: the form every OpenAI-compatible server accepts."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return str(parts[0]["text"])
    return parts


def _tool_result_text(content: Any, where: str) -> tuple[str, list[dict[str, Any]]]:
    """A tool_result's text, and any images in it (OpenAI tool messages take text only)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidField(f"{where} must be a string or an array of blocks", param=where)
    parts = _openai_parts(content, where)
    texts = [p["text"] for p in parts if p["type"] == "text"]
    return "\n".join(texts), [p for p in parts if p["type"] != "text"]


#: Anthropic request fields ``messages_to_chat_request`` carries. ``cache_control`` markers
#: inside them are accepted and not sent: OpenAI-compatible servers cache prompt prefixes
#: on their own, and report what they cached, which reaches the client as
#: ``cache_read_input_tokens``.
MESSAGES_TO_CHAT_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_p",
    "top_k", "metadata", "tools", "tool_choice", "thinking", "service_tier",
})
#: Anthropic service_tier -> OpenAI's.
_OPENAI_TIERS = {"auto": "auto", "standard_only": "default"}


def _thinking_to_effort(thinking: Any) -> str | None:
    """Anthropic ``thinking`` as an OpenAI ``reasoning_effort`` (``None``: do not ask)."""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return None
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if kind != "enabled" or not isinstance(budget, int) or isinstance(budget, bool):
        raise InvalidField("'thinking' must be {\"type\": \"enabled\", \"budget_tokens\": N} or "
                           "{\"type\": \"disabled\"} for this model", param="thinking",
                           code="unsupported_parameter")
    return reasoning_effort(budget)


def messages_to_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic messages request as an OpenAI chat request. ``body`` is left untouched."""
    refuse_unknown(body, MESSAGES_TO_CHAT_FIELDS, {}, "an OpenAI-compatible provider")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    elif isinstance(system, list) and system:
        texts = [b.get("text", "") for b in system if isinstance(b, dict) and b.get("type") == "text"]
        messages.append({"role": "system", "content": "\n".join(texts)})
    for i, m in enumerate(body.get("messages") or []):
        where = f"messages[{i}]"
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise InvalidField(f"{where}.role must be 'user' or 'assistant'", param=f"{where}.role")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidField(f"{where}.content must be a string or an array", param=f"{where}.content")
        if role == "assistant":
            texts = []
            calls = []
            for j, b in enumerate(content):
                kind = b.get("type") if isinstance(b, dict) else None
                if kind == "text":
                    texts.append(b.get("text", ""))
                elif kind == "tool_use":
                    calls.append({"id": b.get("id"), "type": "function",
                                  "function": {"name": b.get("name"), "arguments": _dumps(b.get("input", {}))}})
                elif kind in ("thinking", "redacted_thinking"):
                    # Anthropic itself strips earlier turns' thinking from the context, and
                    # another provider could not verify its signature anyway.
                    continue
                else:
                    raise InvalidField(f"{where}.content[{j}]: block type {kind!r} is not supported",
                                       param=f"{where}.content[{j}]")
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
            continue
        # A user turn: tool results become tool messages, which must come first so they
        # directly follow the assistant's tool calls; the rest is one user message.
        rest: list[Any] = []
        extra: list[dict[str, Any]] = []
        for j, b in enumerate(content):
            if isinstance(b, dict) and b.get("type") == "tool_result":
                text, media = _tool_result_text(b.get("content"), f"{where}.content[{j}].content")
                messages.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": text})
                extra.extend(media)
            else:
                rest.append(b)
        parts = extra + _openai_parts(rest, f"{where}.content")
        if parts:
            messages.append({"role": "user", "content": _collapse(parts)})

    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    # max_tokens, not max_completion_tokens: every OpenAI-compatible server takes it.
    out["max_tokens"] = body.get("max_tokens")
    # top_k goes under its own name: vLLM, Gemini (through hapax) and others take it, and
    # OpenAI itself refuses it with a 400 that names it, so it is never silently lost.
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("thinking") is not None:
        effort = _thinking_to_effort(body["thinking"])
        if effort is not None:
            out["reasoning_effort"] = effort
    tier = body.get("service_tier")
    if tier is not None:
        if tier not in _OPENAI_TIERS:
            raise InvalidField("'service_tier' must be 'auto' or 'standard_only'", param="service_tier",
                               code="unsupported_parameter")
        out["service_tier"] = _OPENAI_TIERS[tier]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    meta = body.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("user_id"), str):
        out["user"] = meta["user_id"]
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") not in (None, "custom") or "input_schema" not in t:
                raise InvalidField(f"tools[{i}]: only client tools with an input_schema are supported "
                                   "by this model", param=f"tools[{i}]")
            fn: dict[str, Any] = {"name": t.get("name"), "parameters": t["input_schema"]}
            if t.get("description"):
                fn["description"] = t["description"]
            out["tools"].append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and "tools" in out:
        kind = choice.get("type")
        if kind == "auto":
            out["tool_choice"] = "auto"
        elif kind == "any":
            out["tool_choice"] = "required"
        elif kind == "none":
            out["tool_choice"] = "none"
        elif kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        else:
            raise InvalidField("'tool_choice.type' must be auto, any, tool or none", param="tool_choice")
        if choice.get("disable_parallel_tool_use") and kind != "none":
            out["parallel_tool_calls"] = False
    return out


def chat_to_messages_response(body: dict[str, Any], usage: Usage) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` as an Anthropic message."""
    choices = body.get("choices") or [{}]
    choice = choices[0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = msg.get("content") or msg.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    for tc in msg.get("tool_calls") or []:
        fn = tc.get("function") or {}
        content.append({"type": "tool_use", "id": tc.get("id"), "name": fn.get("name"),
                        "input": _tool_input(fn.get("arguments"))})
    return {
        "id": body.get("id"),
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content,
        "stop_reason": _STOP.get(choice.get("finish_reason") or "", "end_turn"),
        "stop_sequence": None,
        "usage": _anthropic_usage(usage),
    }


def _tool_input(arguments: Any) -> Any:
    """Tool arguments as an object; a model's malformed JSON still reaches the client, wrapped."""
    if not isinstance(arguments, str) or not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"_value": value}


def _anthropic_usage(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens": usage.completion_tokens}


class MessagesFromChatStream(StreamTranslator):
    """OpenAI ``chat.completion.chunk`` events in, Anthropic stream events out.

    Anthropic streams content as a sequence of blocks, each opened, filled by
    deltas and closed before the next opens; OpenAI interleaves text and tool
    call fragments freely, keyed by tool index. So a new kind of fragment
    closes the open block and opens the next one.
    """

    def __init__(self, model: str, *, input_tokens: int) -> None:
        self.model = model
        self.input_tokens = input_tokens
        self.started = False
        self.block = -1  # index of the open block; -1 when none is open
        self.next_block = 0
        self.block_kind: str | None = None
        #: OpenAI tool_calls index -> Anthropic block index
        self.tools: dict[int, int] = {}
        self.stop_reason: str | None = None
        self.usage: Usage | None = None

    @staticmethod
    def _ev(name: str, data: dict[str, Any]) -> SSEEvent:
        return SSEEvent(data=orjson.dumps({"type": name, **data}), event=name)

    def _start(self, chunk: dict[str, Any]) -> list[SSEEvent]:
        self.started = True
        message: dict[str, Any] = {
            "id": chunk.get("id") or "msg_hapax",
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model") or self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # OpenAI reports usage only at the end: an estimate now, the real count in message_delta.
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return [self._ev("message_start", {"message": message})]

    def _close(self) -> list[SSEEvent]:
        if self.block < 0:
            return []
        ev = self._ev("content_block_stop", {"index": self.block})
        self.block, self.block_kind = -1, None
        return [ev]

    def _open(self, block: dict[str, Any]) -> list[SSEEvent]:
        out = self._close()
        self.block, self.block_kind = self.next_block, block["type"]
        self.next_block += 1
        out.append(self._ev("content_block_start", {"index": self.block, "content_block": block}))
        return out

    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        chunk = event.json()
        if not isinstance(chunk, dict):
            return []
        if "error" in chunk and "choices" not in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise UpstreamUnavailable(f"upstream stream failed: {err.get('message', 'unknown error')}")
        out = [] if self.started else self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage = Usage()
            self.usage.take_openai(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self.block_kind != "text":
                    out += self._open({"type": "text", "text": ""})
                out.append(self._ev("content_block_delta", {
                    "index": self.block, "delta": {"type": "text_delta", "text": text}}))
            for tc in delta.get("tool_calls") or []:
                out += self._tool_fragment(tc)
            if choice.get("finish_reason"):
                self.stop_reason = _STOP.get(choice["finish_reason"], "end_turn")
        return out

    def _tool_fragment(self, tc: dict[str, Any]) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        idx = tc.get("index", 0)
        fn = tc.get("function") or {}
        if idx not in self.tools:
            out += self._open({"type": "tool_use", "id": tc.get("id") or f"toolu_{idx}",
                               "name": fn.get("name") or "", "input": {}})
            self.tools[idx] = self.block
        args = fn.get("arguments")
        if args:
            out.append(self._ev("content_block_delta", {
                "index": self.tools[idx], "delta": {"type": "input_json_delta", "partial_json": args}}))
        return out

    def finish(self, usage: Usage) -> list[SSEEvent]:
        if self.stop_reason is None:
            raise UpstreamUnavailable("upstream stream ended without a finish_reason")
        out = [] if self.started else self._start({})
        out += self._close()
        final = self.usage or usage
        out.append(self._ev("message_delta", {
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
            "usage": _anthropic_usage(final),
        }))
        out.append(self._ev("message_stop", {}))
        return out


def _messages_stream_factory(model: str, body: dict[str, Any]) -> StreamTranslator:
    return MessagesFromChatStream(model, input_tokens=estimate_prompt_tokens(body))


register(Translation(
    source=Operation.CHAT,
    target=Operation.MESSAGES,
    request=chat_to_messages_request,
    response=lambda body, usage: messages_to_chat_response(body, usage, created=int(time.time())),
    stream=_chat_stream_factory,
))
register(Translation(
    source=Operation.MESSAGES,
    target=Operation.CHAT,
    request=messages_to_chat_request,
    response=chat_to_messages_response,
    stream=_messages_stream_factory,
))
