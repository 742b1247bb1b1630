"""Cheap request checks before anything is spent upstream.

Deliberately not a full schema: unknown fields pass through untouched (new
OpenAI parameters must work on day one), but the fields the gateway itself
relies on are checked, with ``param`` naming the culprit.

No request may stall the event loop (every stream on the node waits while one
body is parsed or walked), so a body's cost is bounded before it is paid:

- parsing costs about 0.1-0.2 µs per JSON value, so a body may hold at most
  ``MAX_JSON_VALUES``. Counting them exactly would mean parsing; instead the
  commas, ``[`` and ``{`` are counted (an upper bound: each value but the first
  of its container follows a comma, and each container opens with a bracket),
  in slices, yielding to the loop between slices. If commas inside strings
  push that over the bound, they are counted again outside strings only. A body
  too short to reach the bound skips the count;
- the pipeline walks ``messages`` in Python several times (validation, token
  estimate, translation), so there are at most ``MAX_MESSAGES``;
- orjson reads 1,024 levels of nesting but writes only 254, so a deeper body
  would parse and then fail on its way upstream; nesting beyond ``MAX_NESTING``
  is refused up front.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import orjson

from .._errors import InvalidField, InvalidJSON, RequestTooComplex
from ..providers import Operation

#: JSON values a body may hold (commas, ``[`` and ``{`` counted, inside strings too). Real
#: prompts keep their text in a few long strings, far below this; parsing this many takes
#: about 10-20 ms on the reference 2-core machines.
MAX_JSON_VALUES: Final = 100_000
#: Messages in one chat or messages request.
MAX_MESSAGES: Final = 10_000
#: Levels of ``[``/``{`` nesting; well above any real request, well below orjson's 254.
MAX_NESTING: Final = 128
#: A body shorter than this cannot hold MAX_JSON_VALUES (each takes two bytes with its separator).
_COUNT_FROM: Final = 2 * MAX_JSON_VALUES
#: Bytes counted between yields to the event loop: a few milliseconds of counting.
_SLICE: Final = 1 << 20
#: Quotes stepped over between yields when counting outside strings: a few milliseconds.
_QUOTES_PER_YIELD: Final = 4096
#: Quotes (two a string, plus escaped ones) a body may hold when its commas need that count:
#: each costs a step in Python. Real bodies with this many strings exceed MAX_JSON_VALUES anyway.
MAX_QUOTES: Final = 4 * MAX_JSON_VALUES
#: orjson.dumps fails beyond this depth; wrapping a body in (this - MAX_NESTING) lists makes
#: it fail exactly when the body itself is deeper than MAX_NESTING.
_ORJSON_MAX_DEPTH: Final = 254


async def read_json_body(raw: bytes) -> dict[str, Any]:
    """``parse_body``, after bounding the body's cost without blocking the loop for long."""
    opens = None
    if len(raw) > _COUNT_FROM:
        opens, seps = await _count(raw, in_strings=True)
        if opens + seps >= MAX_JSON_VALUES:
            # Maybe commas in long texts: count again, skipping strings (slower, so second).
            opens, seps = await _count(raw, in_strings=False)
            if opens + seps >= MAX_JSON_VALUES:
                raise RequestTooComplex(
                    f"the request body holds more than {MAX_JSON_VALUES} JSON values; "
                    "send fewer, larger items (long strings are fine)"
                )
        body = parse_body(raw, opens=opens)
        # Parsing a large body took milliseconds; serialising it for the upstream will take
        # more. Let other requests run in between rather than block for both at once.
        await asyncio.sleep(0)
        return body
    return parse_body(raw, opens=opens)


async def _count(raw: bytes, *, in_strings: bool) -> tuple[int, int]:
    """``[``/``{`` and commas in ``raw``, stopping at MAX_JSON_VALUES; yields to the loop as it goes.

    With ``in_strings`` false, what stands inside JSON strings is skipped: one step per
    quote, so a body of many short strings (or escaped quotes) yields every
    ``_QUOTES_PER_YIELD`` quotes, and more than ``MAX_QUOTES`` count as too many values.
    """
    opens = seps = 0
    pos, n, quotes = 0, len(raw), 0
    find, count = raw.find, raw.count
    while pos < n:
        quote = -1 if in_strings else find(b'"', pos)
        end = n if quote < 0 else quote
        while pos < end:
            stop = min(end, pos + _SLICE)
            opens += count(b"[", pos, stop) + count(b"{", pos, stop)
            seps += count(b",", pos, stop)
            pos = stop
            if opens + seps >= MAX_JSON_VALUES:
                return opens, seps
            if stop < end:
                await asyncio.sleep(0)  # let other requests run between slices
        if quote < 0:
            break
        # Skip to the quote that closes this string: the next one not escaped.
        close = find(b'"', quote + 1)
        while True:
            quotes += 1
            if quotes % _QUOTES_PER_YIELD == 0:
                await asyncio.sleep(0)
                if quotes >= MAX_QUOTES:
                    return opens, MAX_JSON_VALUES
            if close < 0:
                return opens, seps  # unterminated: the parser will say so
            k = close - 1
            while raw[k] == 0x5C:  # backslashes: the quote is escaped if they are odd
                k -= 1
            if (close - 1 - k) % 2 == 0:
                break
            close = find(b'"', close + 1)
        pos = close + 1
    return opens, seps


def parse_body(raw: bytes, *, opens: int | None = None) -> dict[str, Any]:
    """The body as a JSON object; ``opens``: its count of ``[`` and ``{`` if already known."""
    if not raw:
        raise InvalidJSON("the request body is empty; send a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidJSON("the request body must be a JSON object")
    if opens is None:
        opens = raw.count(b"[") + raw.count(b"{")
    if opens > MAX_NESTING:  # else it cannot be that deep: skip the check
        _check_nesting(data)
    return data


def _check_nesting(data: dict[str, Any]) -> None:
    wrapped: Any = data
    for _ in range(_ORJSON_MAX_DEPTH - MAX_NESTING):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        raise RequestTooComplex(f"the request body is nested more than {MAX_NESTING} levels deep") from None


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
        if len(msgs) > MAX_MESSAGES:
            raise RequestTooComplex(
                f"'messages' holds {len(msgs)} messages; the limit is {MAX_MESSAGES}", param="messages"
            )
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
