"""Cheap request checks before anything is spent upstream.

Deliberately not a full schema: unknown fields pass through untouched (new
OpenAI parameters must work on day one), but the fields the gateway itself
relies on are checked, with ``param`` naming the culprit.
"""

from __future__ import annotations

from typing import Any

import orjson

from ._errors import InvalidField, InvalidJSON
from .providers import Operation


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidJSON("the request body is empty; send a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidJSON("the request body must be a JSON object")
    return data


def _require(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in body or body[key] is None:
        raise InvalidField(f"'{key}' is required", param=key, code="missing_required_parameter")
    value = body[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidField(f"'{key}' must be {what}", param=key)
    return value


def validate(op: Operation, body: dict[str, Any]) -> None:
    model = _require(body, "model", str, "a string")
    if not model:
        raise InvalidField("'model' must not be empty", param="model")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise InvalidField("'stream' must be a boolean", param="stream")
    if op in (Operation.CHAT, Operation.MESSAGES):
        msgs = _require(body, "messages", list, "an array of message objects")
        if op is Operation.CHAT and not msgs:
            raise InvalidField("'messages' must contain at least one message", param="messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidField(
                    f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
                )
            calls = m.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise InvalidField(f"messages[{i}].tool_calls must be an array", param=f"messages[{i}].tool_calls")
        # Translators rely on these shapes; check them once here for every provider.
        _optional_strings(body, "stop" if op is Operation.CHAT else "stop_sequences", allow_str=op is Operation.CHAT)
        if op is Operation.MESSAGES:
            mt = _require(body, "max_tokens", int, "an integer")
            if mt < 1:
                raise InvalidField("'max_tokens' must be at least 1", param="max_tokens")
    elif op is Operation.COMPLETIONS:
        _require(body, "prompt", (str, list), "a string or an array")
        _optional_strings(body, "stop", allow_str=True)
    elif op is Operation.EMBEDDINGS:
        inp = _require(body, "input", (str, list), "a string or an array")
        if isinstance(inp, list) and not inp:
            raise InvalidField("'input' must not be empty", param="input")
        fmt = body.get("encoding_format")
        if fmt is not None and fmt not in ("float", "base64"):
            raise InvalidField("'encoding_format' must be 'float' or 'base64'", param="encoding_format")


def _optional_strings(body: dict[str, Any], key: str, *, allow_str: bool) -> None:
    value = body.get(key)
    if value is None or (allow_str and isinstance(value, str)):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        what = "a string or an array of strings" if allow_str else "an array of strings"
        raise InvalidField(f"'{key}' must be {what}", param=key)


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)
