"""A deliberately cheap OpenAI chat-completions upstream: canned HTTP/1.1 keep-alive replies.

It is a raw ``asyncio.Protocol`` (on uvloop when importable) that frames requests
by ``Content-Length`` only and answers every one from pre-built bytes, so the
thing under test is never waiting on it. A request whose body contains
``"stream":true`` gets an SSE stream (``--chunks`` content chunks, a usage
chunk and ``data: [DONE]``) in chunked transfer encoding, written in one
``write``; anything else gets a ``chat.completion`` JSON object. With
``--chunk-ms``, a stream's events are written one per interval instead, on a
fixed schedule from its first, as a model generating tokens would (the streams
benchmark).

    python -m bench.upstream --port 9000 [--chunks 20] [--chunk-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

MODEL = "bench-upstream-model"


def completion_body() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000000",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello! This is a canned reply from the benchmark upstream, "
                        "about as long as a short real answer.",
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 24, "completion_tokens": 20, "total_tokens": 44},
        },
        separators=(",", ":"),
    ).encode()


def sse_events(chunks: int) -> list[bytes]:
    """``chunks`` content chunks (the last one carries finish_reason), a usage chunk, [DONE]."""

    def chunk(delta: dict[str, str], finish: str | None, usage: dict[str, int] | None = None) -> bytes:
        obj: dict[str, object] = {
            "id": "chatcmpl-bench0000000000000000000000",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if usage:
            obj["usage"] = usage
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    out = [chunk({"role": "assistant", "content": "tok0 "}, None if chunks > 1 else "stop")]
    out += [chunk({"content": f"tok{i} "}, None if i < chunks - 1 else "stop") for i in range(1, chunks)]
    out.append(chunk({}, None, {"prompt_tokens": 24, "completion_tokens": chunks, "total_tokens": 24 + chunks}))
    out.append(b"data: [DONE]\n\n")
    return out


def canned_responses(chunks: int) -> tuple[bytes, bytes]:
    body = completion_body()
    plain = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: keep-alive\r\n"
        b"\r\n" + body
    )
    frames = b"".join(b"%x\r\n%b\r\n" % (len(ev), ev) for ev in sse_events(chunks))
    stream = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream; charset=utf-8\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Connection: keep-alive\r\n"
        b"\r\n" + frames + b"0\r\n\r\n"
    )
    return plain, stream


def dripped_frames(chunks: int) -> list[bytes]:
    """The stream response cut into writes: headers with the first event, one event per write,
    then the usage chunk, [DONE] and the terminating chunk with the last content event."""
    frames = [b"%x\r\n%b\r\n" % (len(ev), ev) for ev in sse_events(chunks)]
    head = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream; charset=utf-8\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Connection: keep-alive\r\n"
        b"\r\n"
    )
    content = frames[:chunks]
    return [head + content[0], *content[1:-1], content[-1] + b"".join(frames[chunks:]) + b"0\r\n\r\n"]


class CannedHTTP(asyncio.Protocol):
    """Frames pipelined/keep-alive requests by Content-Length and answers each at once."""

    plain = b""
    stream = b""
    #: With --chunk-ms: seconds between a stream's writes, and the writes.
    interval = 0.0
    dripped: list[bytes] = []

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buf[:end]).lower()
            i = head.find(b"\r\ncontent-length:")
            length = 0
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                break
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            streaming = b'"stream":true' in body or b'"stream": true' in body
            if streaming and self.interval:
                self._drip(0)  # keep-alive clients send the next request after this one ends
                continue
            out.append(self.stream if streaming else self.plain)
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


    def _drip(self, i: int, start: float = 0.0) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        loop = asyncio.get_running_loop()
        if i == 0:
            start = loop.time()
        t.write(self.dripped[i])
        if i + 1 < len(self.dripped):
            # On a fixed schedule from the first write, as a model's tokens come: a timer set
            # from each write would add this loop's own lateness to every interval.
            loop.call_at(start + (i + 1) * self.interval, self._drip, i + 1, start)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, chunks: int, chunk_ms: float = 0.0) -> None:
    CannedHTTP.plain, CannedHTTP.stream = canned_responses(chunks)
    CannedHTTP.interval = chunk_ms / 1000
    CannedHTTP.dripped = dripped_frames(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(CannedHTTP, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    p.add_argument("--chunk-ms", type=float, default=0.0, help="ms between a stream's chunks (0: all at once)")
    a = p.parse_args()
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of streams
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(a.host, a.port, a.chunks, a.chunk_ms))
    else:
        uvloop.run(serve(a.host, a.port, a.chunks, a.chunk_ms))


if __name__ == "__main__":
    main()
