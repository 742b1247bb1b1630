"""Answer with the model name the client asked for, cheaply.

Theory of operation: upstream responses name the upstream's model
(``"model": "llama-3-70b"``); clients asked for a public name (``mini``) and
should get it back. On the pass-through path bodies and stream events are
forwarded as bytes, so re-encoding each one to change one field would cost a
parse and a dump per event. Instead ``rename`` replaces the value of the first
``"model"`` key in the bytes. That is the top-level field in every format we
pass through (OpenAI objects and chunks put ``model`` before ``choices`` or
``data``; Anthropic's ``message_start`` has it first in ``message``), and a
``"model"`` *key* cannot hide inside a string: a quote in a JSON string is
escaped. Anything unexpected (whitespace we do not skip, an escaped value, a
value that is not the one the caller expected) falls back to a real parse.
"""

from __future__ import annotations

from typing import Any

import orjson

_KEY = b'"model"'
_KEY_LEN = len(_KEY)


def rename(data: bytes, name: bytes, *, expect: str | None = None) -> bytes:
    """``data`` (a JSON object) with its model field's value set to ``name`` (already JSON-encoded).

    With ``expect``, the value found must be that string, or the slow path decides.
    Data without a model field comes back unchanged.
    """
    i = data.find(_KEY)
    if i < 0:
        return data
    j = i + _KEY_LEN
    # Compact JSON (orjson, most servers) is ``"model":"x"``; Python's json adds one space.
    if data.startswith(b':"', j):
        start = j + 1
    elif data.startswith(b': "', j):
        start = j + 2
    else:
        return _rename_slow(data, name)
    end = data.find(b'"', start + 1)
    if end < 0 or data.find(b"\\", start, end) >= 0:
        return _rename_slow(data, name)
    if expect is not None and data[start + 1 : end] != expect.encode():
        return _rename_slow(data, name)
    return data[:start] + name + data[end + 1 :]


def _rename_slow(data: bytes, name: bytes) -> bytes:
    try:
        doc: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    if not isinstance(doc, dict):
        return data
    target = doc
    if "model" not in doc and isinstance(doc.get("message"), dict):
        target = doc["message"]  # Anthropic's message_start
    if not isinstance(target.get("model"), str):
        return data
    target["model"] = orjson.loads(name)
    return orjson.dumps(doc)
