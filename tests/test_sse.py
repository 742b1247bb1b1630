"""The SSE decoder handles any split of the byte stream, as the spec's line rules say."""

from __future__ import annotations

import random

from hapax._sse import SSEDecoder, encode

STREAM = (
    b"".join(b'data: {"n": %d}\n\n' % i for i in range(20))
    + b"event: message_delta\r\ndata: one\r\ndata: two\r\n\r\n"
    + b": a comment, ignored\n\n"
    + b"data: [DONE]\n\n"
)


def _decode(chunks: list[bytes]) -> list[tuple[str | None, bytes]]:
    d = SSEDecoder()
    out = [e for c in chunks for e in d.feed(c)]
    tail = d.close()
    if tail is not None:
        out.append(tail)
    return [(e.event, e.data) for e in out]


EXPECTED = [(None, b'{"n": %d}' % i) for i in range(20)] + [
    ("message_delta", b"one\ntwo"),
    (None, b"[DONE]"),
]


def test_whole_stream() -> None:
    assert _decode([STREAM]) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert _decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_random_splits() -> None:
    rng = random.Random(7)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(STREAM)), 12))
        parts = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
        assert _decode(parts) == EXPECTED


def test_unterminated_tail_is_reported() -> None:
    assert _decode([b'data: {"n": 1}\n\ndata: {"cut']) == [(None, b'{"n": 1}'), (None, b'{"cut')]


def test_encode_round_trips() -> None:
    wire = encode(b'{"x":1}') + encode(b'{"type":"ping"}', "ping")
    assert _decode([wire]) == [(None, b'{"x":1}'), ("ping", b'{"type":"ping"}')]
