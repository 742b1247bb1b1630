"""The front door under hostile or careless clients, through real sockets to a real node.

Idle and slow connections, a connection flood, a file-descriptor limit, clients
that stop reading, bodies that are legal but costly, ``Expect: 100-continue``,
malformed HTTP and streams cut by a shutdown.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.gateway_process import GatewayProcess
from tests.reliability_support import wait_for
from tests.upstreams.server import UpstreamServer, UpstreamState

ADMIN = "admin-" + "k" * 40
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}
#: Long enough that its stream outgrows every socket buffer between node and client.
LONG_REPLY = " ".join(f"w{i:05d}" for i in range(100_000))


def _config(server: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "server": server or {},
        "providers": {
            "demo": {"type": "mock"},
            "slow": {"type": "mock", "mock": {"chunk_delay_ms": 100, "reply": "a b c d e f g h i j " * 20}},
        },
        "models": [{"name": "demo", "provider": "demo"}, {"name": "slow", "provider": "slow"}],
        **extra,
    }


def _wait(pred: Callable[[], bool], timeout: float = 10) -> None:
    wait_for(pred, timeout=timeout)


def _metric(gw: GatewayProcess, series: str) -> float:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


@contextmanager
def _sock(gw: GatewayProcess, *, timeout: float = 10, rcvbuf: int | None = None) -> Iterator[socket.socket]:
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", gw.port))
    try:
        yield s
    finally:
        s.close()


def _read_until_close(s: socket.socket) -> bytes:
    """Everything the server sends until it closes; raises socket.timeout if it never does."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _read_response(s: socket.socket) -> bytes:
    """One response with a content-length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    m = re.search(rb"content-length: (\d+)", head, re.I)
    n = int(m.group(1)) if m else 0
    while len(rest) < n:
        chunk = s.recv(65536)
        assert chunk
        rest += chunk
    return head + b"\r\n\r\n" + rest


def _post_head(path: str, length: int, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: x", "content-type: application/json", f"content-length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _access(gw: GatewayProcess) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in gw.logs().splitlines() if line.startswith("{"))
    return [e for e in lines if e.get("logger") == "hapax.access"]


# -- hygiene -------------------------------------------------------------------------------


def test_server_header_names_no_versions(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config())
    for r in (httpx.get(gw.url + "/health/live"), httpx.get(gw.url + "/nope"),
              httpx.post(gw.url + "/v1/chat/completions", json=CHAT)):
        assert r.headers["server"] == "hapax", r.headers
    with _sock(gw) as s:
        s.sendall(b"BAD REQUEST LINE\r\n\r\n")
        assert b"\r\nserver: hapax\r\n" in _read_until_close(s).lower()


def test_malformed_http_is_one_warning_line_and_counted(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config())
    for raw in (b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", b"\x16\x03\x01 not http at all\r\n\r\n",
                b"GET /health/live HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n"):
        with _sock(gw) as s:
            s.sendall(raw)
            resp = _read_until_close(s)
            assert re.match(rb"HTTP/1\.[01] 400 ", resp), resp
            assert b'"code":"malformed_http"' in resp
    _wait(lambda: _metric(gw, "hapax_http_protocol_errors_total") == 3)
    logs = gw.logs()
    assert "malformed HTTP request" in logs
    assert "Traceback" not in logs and '"level":"error"' not in logs.replace(" ", "")
    # Still serving.
    assert httpx.get(gw.url + "/health/live").status_code == 200


# -- timeouts --------------------------------------------------------------------------------


def test_idle_keepalive_connection_is_closed(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config({"keepalive_timeout": 0.5}))
    with _sock(gw) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _read_response(s).startswith(b"HTTP/1.1 200")
        # Then nothing: the node closes the idle connection (aiohttp's default: an hour).
        assert _read_until_close(s) == b""
    with _sock(gw) as s:  # a connection that never sends a byte, likewise
        assert _read_until_close(s) == b""


def test_slow_headers_get_408_and_close(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config({"header_timeout": 0.5, "keepalive_timeout": 60}))
    with _sock(gw) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n")  # and never the blank line
        resp = _read_until_close(s)
    assert resp.startswith(b"HTTP/1.1 408"), resp
    assert b'"code":"request_timeout"' in resp
    assert _metric(gw, 'hapax_connections_closed_total{reason="header_timeout"}') == 1
    # A keep-alive connection's second request gets the same limit.
    with _sock(gw) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health/live HTTP/1.1\r\n")
        assert _read_until_close(s).startswith(b"HTTP/1.1 408")


def test_slow_body_gets_408_and_close(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config({"body_timeout": 0.5, "keepalive_timeout": 60}))
    with _sock(gw) as s:
        s.sendall(_post_head("/v1/chat/completions", 100) + b'{"model": ')
        resp = _read_until_close(s)
    assert resp.startswith(b"HTTP/1.1 408"), resp
    body = json.loads(resp.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "request_timeout" and "body_timeout" in body["error"]["message"]
    assert _metric(gw, 'hapax_connections_closed_total{reason="body_timeout"}') == 1


def test_client_that_stops_reading_is_cut_and_frees_its_slot(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway({
        "server": {"stream_write_timeout": 0.5},
        "providers": {"long": {"type": "mock", "mock": {"reply": LONG_REPLY}}},
        "models": [{"name": "long", "provider": "long", "max_concurrency": 1}],
        "reliability": {"admission": {"queue_timeout": 20}},
    })
    body = orjson.dumps({"model": "long", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    with _sock(gw, rcvbuf=4096) as s:
        s.sendall(_post_head("/v1/chat/completions", len(body)) + body)
        # Read nothing. The node's writes back up, and after the write timeout it cuts the stream.
        _wait(lambda: _metric(gw, 'hapax_connections_closed_total{reason="write_timeout"}') == 1, timeout=30)
        # The model's only slot is free again: the next call is answered, not queued behind it.
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                       json={"model": "long", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
    # The access line is written when the cut exchange ends and flushed within the log's
    # interval; on a loaded machine that can trail the metric.
    def cut() -> list[dict[str, Any]]:
        return [e for e in _access(gw) if e.get("error_code") == "client_write_timeout"]

    _wait(lambda: bool(cut()), timeout=10)
    assert len(cut()) == 1 and cut()[0]["status"] == 408, _access(gw)


def test_timeouts_total_bounds_a_stream_read_slowly_but_steadily(
    gateway: Callable[..., GatewayProcess], openai_upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    # A client that keeps reading, just slowly, never trips the write timeout; with the
    # upstream's chunks already buffered no wait timed out either, so the stream ran past
    # timeouts.total for as long as the client kept at it.
    server, state = openai_upstream
    state.reply = LONG_REPLY
    gw = gateway({
        "providers": {"up": {"type": "openai", "base_url": server.url + "/v1", "api_key": "k",
                             "timeouts": {"total": 1.0, "first_byte": 1.0}}},
        "models": [{"name": "m", "provider": "up"}],
    })
    body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    got = bytearray()
    with _sock(gw, rcvbuf=4096) as s:
        s.sendall(_post_head("/v1/chat/completions", len(body)) + body)
        deadline = time.monotonic() + 60  # bounded: the whole reply at this pace takes minutes
        while not got.endswith(b"0\r\n\r\n") and time.monotonic() < deadline:
            chunk = s.recv(8192)
            if not chunk:
                break
            got += chunk
            if not got.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" in got:
                break  # refused before the stream began: no chunked end will come
            time.sleep(0.01)  # a slow but steady reader
    assert got.startswith(b"HTTP/1.1 200"), got[:600]
    assert b'"code":"upstream_timeout"' in got, got[-400:]
    assert b"w99999" not in got  # cut, not completed
    assert got.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") or got.endswith(b"0\r\n\r\n")


# -- connection limits ---------------------------------------------------------------------


def test_connection_cap_evicts_idle_connections_then_refuses(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config({"max_connections": 4}))
    idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(6)]
    try:
        # Full of idle sockets, yet a probe is answered: the oldest idle ones made room.
        assert httpx.get(gw.url + "/health/live").status_code == 200
        assert _metric(gw, 'hapax_connections_closed_total{reason="idle_evicted"}') >= 3
        assert _metric(gw, "hapax_connections_open") <= 4
    finally:
        for s in idle:
            s.close()
    _wait(lambda: _metric(gw, "hapax_connections_open") <= 1)  # the scrape's own
    # Four streams in progress: nothing is idle, so a fifth connection is refused with a 503.
    busy = []
    body = orjson.dumps({"model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    try:
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            busy.append(s)
            s.sendall(_post_head("/v1/chat/completions", len(body)) + body)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        with _sock(gw) as s:
            s.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            resp = _read_until_close(s)
        assert resp.startswith(b"HTTP/1.1 503"), resp
        assert b'"code":"too_many_connections"' in resp
    finally:
        for s in busy:
            s.close()
    assert "connection limit reached" in gw.logs()
    _wait(lambda: httpx.get(gw.url + "/health/live").status_code == 200)
    assert _metric(gw, 'hapax_connections_closed_total{reason="refused"}') == 1


def _nofile(soft: int, hard: int | None = None) -> Callable[[], None]:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard if hard is not None else resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
    return set_limit


def _limits(gw: GatewayProcess) -> tuple[int, int]:
    assert gw.proc is not None
    for line in Path(f"/proc/{gw.proc.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def test_soft_fd_limit_is_raised_to_the_hard_limit(gateway: Callable[..., GatewayProcess]) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > 512, "the test needs a hard limit above 512"
    gw = gateway(_config(), preexec_fn=_nofile(512))
    assert _limits(gw) == (hard, hard)


def test_more_idle_sockets_than_descriptors_still_leaves_room_for_probes(
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(_config(), preexec_fn=_nofile(256, 256))
    idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(300)]
    try:
        r = httpx.get(gw.url + "/health/live", timeout=5)
        assert r.status_code == 200
    finally:
        for s in idle:
            s.close()
    assert "server.max_connections lowered to fit the file-descriptor limit" in gw.logs()
    assert _metric(gw, 'hapax_connections_closed_total{reason="idle_evicted"}') >= 300 - 128


def test_listen_backlog_is_the_configured_one(gateway: Callable[..., GatewayProcess]) -> None:
    # A burst of 2,000 streams overflowed the old fixed backlog of 1,024 (SYNs dropped).
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    want = min(2000, somaxconn)
    gw = gateway(_config({"listen_backlog": want}))
    # For a listening socket, ss reports the accept backlog as its Send-Q.
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{gw.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(out[2]) == want


# -- costly bodies ---------------------------------------------------------------------------


def _post(gw: GatewayProcess, body: bytes) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", content=body, timeout=30,
                      headers={"content-type": "application/json"})


def test_a_body_of_many_tiny_values_is_400_not_a_stall(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config())
    # Legal and under the 10 MiB limit: 345,000 tiny messages (parsing them alone took 0.2 s).
    tiny = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "a"}] * 345_000})
    assert len(tiny) < 10 * 1024 * 1024
    r = _post(gw, tiny)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "request_too_complex"
    # Fewer values, but more messages than the pipeline walks cheaply.
    many = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "a"}] * 10_001})
    r = _post(gw, many)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # A big body of long strings is fine.
    big = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "word, " * 1_000_000}]})
    assert _post(gw, big).status_code == 200


def _nested(depth: int) -> bytes:
    inner: Any = "x"
    for _ in range(depth - 1):  # the body object is the first level
        inner = [inner]
    return orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}], "metadata": inner})


def test_deep_nesting_is_400_not_500(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config({"max_body_bytes": 1 << 20}))
    deep = b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * 600 + b"]" * 600 + b"}"
    for body in (deep, _nested(129), _nested(250)):
        r = _post(gw, body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "request_too_complex"
    assert _post(gw, _nested(128)).status_code == 200


# -- Expect: 100-continue --------------------------------------------------------------------


def test_expect_100_continue_is_answered_after_the_head_checks(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config({"max_body_bytes": 4096}, auth={"mode": "keys", "admin_key": ADMIN}))
    body = orjson.dumps({**CHAT, "model": "demo"})
    with _sock(gw) as s:
        s.sendall(_post_head("/v1/chat/completions", len(body), "expect: 100-continue",
                             f"authorization: Bearer {ADMIN}"))
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        assert _read_response(s).startswith(b"HTTP/1.1 200")
    # Refused uploads are refused before the body is sent: no 100, the final answer at once.
    for head, status in (
        (_post_head("/v1/chat/completions", len(body), "expect: 100-continue"), b"401"),
        (_post_head("/v1/chat/completions", len(body), "expect: 100-continue",
                    "authorization: Bearer wrong"), b"401"),
        (_post_head("/v1/chat/completions", 10_000, "expect: 100-continue",
                    f"authorization: Bearer {ADMIN}"), b"413"),
    ):
        with _sock(gw) as s:
            s.sendall(head)
            resp = _read_until_close(s)
            assert resp.startswith(b"HTTP/1.1 " + status), resp
            assert b"100 Continue" not in resp


# -- shutdown -----------------------------------------------------------------------------------


def test_stream_cut_at_the_end_of_the_grace_ends_with_an_error_event(
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(_config({"shutdown_grace": 0.5}))
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=20, json={
        "model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}],
    }) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        gw.signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down"
    assert gw.proc is not None and gw.proc.wait(10) == 0
    cut = [e for e in _access(gw) if e.get("route") == "chat_completions"]
    assert cut[-1]["status"] == 503 and cut[-1]["error_code"] == "shutting_down", cut


def test_anthropic_stream_cut_at_shutdown_ends_with_an_error_event(
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(_config({"shutdown_grace": 0.5}))
    with httpx.stream("POST", gw.url + "/v1/messages", timeout=20, json={
        "model": "slow", "stream": True, "max_tokens": 100, "messages": [{"role": "user", "content": "x"}],
    }) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("event: ")
        gw.signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-2] == "event: error", rest[-3:]
    assert json.loads(rest[-1].removeprefix("data: "))["error"]["type"] == "overloaded_error"
