"""The HTTP/3 front door through a real ``hapax serve``, with aioquic's client as the peer.

Every test talks QUIC over real UDP sockets to a node process and compares with what
the same node answers over HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aioquic.tls import SessionTicket

from bench.h3client import H3Response, client_configuration, connect
from node.certs import write_dev_pair
from tests.gateway_process import ROOT, GatewayProcess

REPLY = " ".join(f"w{i}" for i in range(12))
JSON = [("content-type", "application/json")]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_dev_pair(tmp_path_factory.mktemp("certs"))


def _config(certs: tuple[Path, Path], **h3: Any) -> dict[str, Any]:
    cert, key = certs
    return {
        "server": {
            "reload_interval": 0.2,
            "http3": {"enabled": True, "certificate_file": str(cert), "key_file": str(key), **h3},
        },
        "providers": {
            "mock": {"type": "mock", "mock": {"reply": REPLY}},
            "slow": {"type": "mock", "mock": {"reply": REPLY, "chunk_delay_ms": 150}},
        },
        "models": [{"name": "demo", "provider": "mock"}, {"name": "slow", "provider": "slow"}],
    }


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def _chat(stream: bool = False, model: str = "demo") -> bytes:
    return orjson.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "go"}]})


def _wait(pred: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _metric(gw: GatewayProcess, series: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    m = re.search("^" + re.escape(series) + r" (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


# Headers whose values are per request or per transport (HTTP/1.1's framing, the date).
_VARY = {"server-timing", "date", "content-length", "transfer-encoding", "connection", "keep-alive", "alt-svc"}


def _same_parts(h1: httpx.Response, h3: H3Response) -> None:
    assert h3.status == h1.status_code
    assert {k: v for k, v in h3.headers.items() if k not in _VARY} == {
        k: v for k, v in h1.headers.items() if k not in _VARY
    }
    # The mock's "created" is the wall clock's second: the only byte that may differ.
    created = re.compile(rb'"created":\d+')
    assert created.sub(b"", h3.body) == created.sub(b"", h1.content)


def _h1(gw: GatewayProcess, method: str, path: str, rid: str, body: bytes = b"", **headers: str) -> httpx.Response:
    return httpx.request(method, gw.url + path, content=body or None,
                         headers={"x-request-id": rid, **headers}, timeout=10)


async def _h3(port: int, cert: Path, method: str, path: str, rid: str, body: bytes = b"",
              headers: list[tuple[str, str]] | None = None) -> H3Response:
    async with connect("127.0.0.1", port, client_configuration(cafile=str(cert))) as c:
        return await c.request(method, path, [("x-request-id", rid), *(headers or [])], body)


def test_completions_stream_or_not_are_the_same_bytes_as_on_http1(gateway: Any, certs: tuple[Path, Path]) -> None:
    gw = gateway(_config(certs))
    for i, (stream, path) in enumerate([(False, "/v1/chat/completions"), (True, "/v1/chat/completions")]):
        rid = f"same-{i}"
        h1 = _h1(gw, "POST", path, rid, _chat(stream), **{"content-type": "application/json"})
        h3 = _run(_h3(gw.port, certs[0], "POST", path, rid, _chat(stream), JSON))
        assert h1.status_code == 200
        _same_parts(h1, h3)
        if stream:
            assert h3.headers["content-type"].startswith("text/event-stream")
            assert h3.body.endswith(b"data: [DONE]\n\n")
            assert h3.body.count(b"data: ") > 10
    # The Anthropic surface too, streaming and not.
    for i, stream in enumerate((False, True)):
        body = orjson.dumps({"model": "demo", "max_tokens": 50, "stream": stream,
                             "messages": [{"role": "user", "content": "go"}]})
        hdrs = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
        h1 = _h1(gw, "POST", "/v1/messages", f"msg-{i}", body, **hdrs)
        assert h1.status_code == 200
        _same_parts(h1, _run(_h3(gw.port, certs[0], "POST", "/v1/messages", f"msg-{i}", body, list(hdrs.items()))))
    for path in ("/v1/models", "/health/ready", "/nope"):
        _same_parts(_h1(gw, "GET", path, "get"), _run(_h3(gw.port, certs[0], "GET", path, "get")))
    # The request metrics say which door: h1 and h3 each answered two completions.
    series = 'hapax_requests_total{{model="demo",protocol="{}",provider="mock",route="chat_completions",status="200"}}'
    assert _metric(gw, series.format("h3")) == 2
    assert _metric(gw, series.format("h1")) == 2
    assert _metric(gw, 'hapax_http3_handshakes_total{kind="full"}') >= 5
    assert '"protocol":"h3"' in gw.logs()


def test_http1_responses_advertise_http3_with_alt_svc(gateway: Any, certs: tuple[Path, Path]) -> None:
    gw = gateway(_config(certs, alt_svc_max_age=3600))
    r = httpx.get(gw.url + "/v1/models")
    assert r.headers["alt-svc"] == f'h3=":{gw.port}"; ma=3600'
    # A reload that changes the max-age changes the header.
    gw.write_config(_config(certs, alt_svc_max_age=60))
    gw.signal(signal.SIGHUP)
    _wait(lambda: httpx.get(gw.url + "/v1/models").headers["alt-svc"] == f'h3=":{gw.port}"; ma=60')
    off = gateway(_config(certs, enabled=False))
    assert "alt-svc" not in httpx.get(off.url + "/v1/models").headers
    silent = gateway(_config(certs, alt_svc_max_age=0))
    assert "alt-svc" not in httpx.get(silent.url + "/v1/models").headers
    assert _run(_h3(silent.port, certs[0], "GET", "/v1/models", "x")).status == 200
    behind = gateway(_config(certs, advertise_port=443))  # a Service maps 443 to the pod's port
    assert httpx.get(behind.url + "/v1/models").headers["alt-svc"] == 'h3=":443"; ma=86400'


async def _ticket(port: int, cert: Path) -> SessionTicket:
    tickets: list[SessionTicket] = []
    async with connect("127.0.0.1", port, client_configuration(cafile=str(cert)), on_ticket=tickets.append) as c:
        assert (await c.request("GET", "/v1/models")).status == 200
        await c.ping()  # the ticket follows the handshake; a round trip makes sure it is in
    assert tickets
    return tickets[-1]


async def _early(port: int, cert: Path, ticket: SessionTicket) -> tuple[H3Response, H3Response]:
    """A GET and a POST sent in 0-RTT early data on a resumed connection."""
    cfg = client_configuration(cafile=str(cert), ticket=ticket)
    async with connect("127.0.0.1", port, cfg, wait_connected=False) as c:
        get = c.send("GET", "/v1/models", [("x-request-id", "early-get")])
        post = c.send("POST", "/v1/chat/completions", [("x-request-id", "early-post"), *JSON], _chat())
        assert c._quic.tls.session_resumed is False  # still handshaking: these went out as 0-RTT

        return await c.response(get), await c.response(post)


def test_zero_rtt_serves_a_get_and_refuses_a_post_with_425(gateway: Any, certs: tuple[Path, Path]) -> None:
    gw = gateway(_config(certs, early_data="reject"))
    ticket = _run(_ticket(gw.port, certs[0]))
    get, post = _run(_early(gw.port, certs[0], ticket))
    assert get.status == 200
    assert orjson.loads(get.body)["object"] == "list"
    assert post.status == 425
    err = orjson.loads(post.body)["error"]
    assert (err["code"], err["type"]) == ("too_early", "invalid_request_error")
    assert _metric(gw, 'hapax_http3_early_data_total{outcome="accepted"}') == 1
    assert _metric(gw, 'hapax_http3_early_data_total{outcome="refused"}') == 1
    assert _metric(gw, 'hapax_http3_handshakes_total{kind="resumed"}') == 1
    # The refusal is not a duplicate rejection: the same POST after the handshake is served.
    again = _run(_h3(gw.port, certs[0], "POST", "/v1/chat/completions", "early-post", _chat(), JSON))
    assert again.status == 200


def test_zero_rtt_post_is_held_until_the_handshake_completes(gateway: Any, certs: tuple[Path, Path]) -> None:
    gw = gateway(_config(certs, early_data="hold"))
    ticket = _run(_ticket(gw.port, certs[0]))
    get, post = _run(_early(gw.port, certs[0], ticket))
    assert get.status == 200
    assert post.status == 200
    assert orjson.loads(post.body)["choices"][0]["message"]["content"] == REPLY
    assert _metric(gw, 'hapax_http3_early_data_total{outcome="held"}') == 1
    assert _metric(gw, 'hapax_http3_early_data_total{outcome="accepted"}') == 1
    assert _metric(gw, 'hapax_http3_early_data_total{outcome="refused"}') == 0


def test_a_ticket_resumes_once(gateway: Any, certs: tuple[Path, Path]) -> None:
    """Single-use tickets: the same early data replayed on a second connection is not early data."""
    gw = gateway(_config(certs))
    ticket = _run(_ticket(gw.port, certs[0]))
    _run(_early(gw.port, certs[0], ticket))
    get, post = _run(_early(gw.port, certs[0], ticket))  # the replay: a full handshake, then 1-RTT
    assert (get.status, post.status) == (200, 200)
    assert _metric(gw, 'hapax_http3_handshakes_total{kind="resumed"}') == 1
    assert _metric(gw, 'hapax_http3_early_data_total{outcome="refused"}') == 1


def test_a_client_that_changes_address_mid_stream_keeps_its_stream(gateway: Any, certs: tuple[Path, Path]) -> None:
    gw = gateway(_config(certs))
    body, before, after = _run(_migrate(gw.port, certs[0]))
    assert before != after
    assert _text(body) == REPLY
    assert body.endswith(b"data: [DONE]\n\n")
    assert _metric(gw, "hapax_http3_migrations_total") == 1


async def _migrate(port: int, cert: Path) -> tuple[bytes, int, int]:
    """A slow stream whose client moves to a new UDP port after the second event."""
    async with connect("127.0.0.1", port, client_configuration(cafile=str(cert))) as c:
        sid = c.send("POST", "/v1/chat/completions", JSON, _chat(True, "slow"))
        body, before = b"", c.local_port
        async for resp, chunk in c.events(sid):
            assert resp.status == 200
            if chunk is not None:
                body += chunk
                if body.count(b"data: ") == 2:
                    await c.rebind()  # a new UDP socket: a new source port mid-stream
        return body, before, c.local_port


def _text(body: bytes) -> str:
    return "".join(
        (orjson.loads(line[6:])["choices"] or [{"delta": {}}])[0]["delta"].get("content") or ""
        for line in body.decode().split("\n\n") if line.startswith("data: {")
    )


def test_a_verifying_client_refuses_a_certificate_it_does_not_trust(
    gateway: Any, certs: tuple[Path, Path], tmp_path: Path
) -> None:
    gw = gateway(_config(certs))
    other, _ = write_dev_pair(tmp_path / "other")

    async def attempt(**kw: Any) -> None:
        async with connect("127.0.0.1", gw.port, client_configuration(**kw)) as c:
            await c.request("GET", "/v1/models")

    with pytest.raises(ConnectionError):
        _run(attempt(cafile=str(other)))  # signed by someone else
    with pytest.raises(ConnectionError):
        _run(attempt(cafile=str(certs[0]), server_name="api.example.com"))  # not its name
    _run(attempt(cafile=str(certs[0])))


def test_malformed_and_oversize_requests_get_the_same_errors_as_on_http1(
    gateway: Any, certs: tuple[Path, Path]
) -> None:
    cfg = _config(certs)
    cfg["server"]["max_body_bytes"] = 4096
    gw = gateway(cfg)
    big = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "x" * 8000}]})
    cases: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("POST", "/v1/chat/completions", b"{not json", {"content-type": "application/json"}),
        ("POST", "/v1/chat/completions", _chat(), {"content-type": "text/plain"}),
        ("POST", "/v1/chat/completions", b'{"model": "demo"}', {"content-type": "application/json"}),
        ("POST", "/v1/chat/completions", big, {"content-type": "application/json"}),
        ("GET", "/v1/chat/completions", b"", {}),
        ("POST", "/v1/chat/completions", orjson.dumps({"model": "nope", "messages": []}),
         {"content-type": "application/json"}),
    ]
    for i, (method, path, body, headers) in enumerate(cases):
        rid = f"bad-{i}"
        h1 = _h1(gw, method, path, rid, body, **headers)
        h3 = _run(_h3(gw.port, certs[0], method, path, rid, body, list(headers.items())))
        assert h1.status_code >= 400
        _same_parts(h1, h3)
    # An oversize body with no content-length, sent in pieces: 413 as soon as it passes the limit.

    async def chunked() -> H3Response:
        async with connect("127.0.0.1", gw.port, client_configuration(cafile=str(certs[0]))) as c:
            sid = c.open("POST", "/v1/chat/completions", JSON)
            for _ in range(5):
                c.write(sid, b"x" * 1000)
            return await c.response(sid)

    r = _run(chunked())
    assert r.status == 413
    assert orjson.loads(r.body)["error"]["code"] == "payload_too_large"

    # A request head HTTP/3 forbids (no :path): a protocol error, counted like malformed HTTP/1.1.
    async def no_path() -> None:
        async with connect("127.0.0.1", gw.port, client_configuration(cafile=str(certs[0]))) as c:
            sid = c._quic.get_next_available_stream_id()
            c.http.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x")],
                                end_stream=True)
            c.transmit()
            await asyncio.wait_for(c.wait_closed(), 10)

    _run(no_path())
    assert _metric(gw, "hapax_http_protocol_errors_total") == 1


def test_a_body_slower_than_the_body_timeout_gets_408_as_on_http1(gateway: Any, certs: tuple[Path, Path]) -> None:
    cfg = _config(certs)
    cfg["server"]["body_timeout"] = 0.5
    gw = gateway(cfg)

    async def slow() -> H3Response:
        async with connect("127.0.0.1", gw.port, client_configuration(cafile=str(certs[0]))) as c:
            sid = c.open("POST", "/v1/chat/completions", [*JSON, ("content-length", "100")])
            c.write(sid, b'{"model":')  # and nothing more
            return await c.response(sid)

    r = _run(slow())
    assert r.status == 408
    assert orjson.loads(r.body)["error"]["code"] == "request_timeout"
    assert _metric(gw, 'hapax_connections_closed_total{reason="body_timeout"}') == 1


def test_sigterm_lets_an_http3_stream_in_flight_finish(gateway: Any, certs: tuple[Path, Path]) -> None:
    cfg = _config(certs)
    cfg["server"].update(drain_delay=0.3, shutdown_grace=10)
    gw = gateway(cfg)

    async def go() -> tuple[bytes, H3Response]:
        async with connect("127.0.0.1", gw.port, client_configuration(cafile=str(certs[0]))) as c:
            sid = c.send("POST", "/v1/chat/completions", JSON, _chat(True, "slow"))
            body = b""
            signalled = False
            late = H3Response()
            async for _head, chunk in c.events(sid):
                if chunk is not None:
                    body += chunk
                    if not signalled:
                        gw.signal(signal.SIGTERM)
                        signalled = True
                        # GOAWAY comes after drain_delay, while the stream is still going.
                        await asyncio.wait_for(c.goaway_received.wait(), 10)
                        assert c.goaway == sid + 4  # the first stream id it will not serve
                        # After GOAWAY a new request on the connection is refused unprocessed.
                        late = await c.request("GET", "/v1/models")
            return body, late

    body, late = _run(go())
    assert body.endswith(b"data: [DONE]\n\n")
    assert b"shutting_down" not in body
    assert late.reset == 0x10B  # H3_REQUEST_REJECTED: safe to retry elsewhere
    assert gw.proc is not None
    assert gw.proc.wait(15) == 0
    assert '"abandoned_requests":0' in gw.logs()


def test_a_stream_cut_at_the_end_of_the_grace_ends_with_the_same_error_event_as_on_http1(
    gateway: Any, certs: tuple[Path, Path]
) -> None:
    cfg = _config(certs)
    cfg["server"]["shutdown_grace"] = 0.5  # shorter than the slow stream (12 events, 150 ms apart)
    gw = gateway(cfg)

    async def go() -> bytes:
        async with connect("127.0.0.1", gw.port, client_configuration(cafile=str(certs[0]))) as c:
            sid = c.send("POST", "/v1/chat/completions", JSON, _chat(True, "slow"))
            body = b""
            async for _head, chunk in c.events(sid):
                if chunk is not None:
                    if not body:
                        gw.signal(signal.SIGTERM)
                    body += chunk
            return body

    events = [e for e in _run(go()).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert orjson.loads(events[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert gw.proc is not None
    assert gw.proc.wait(15) == 0
    assert '"protocol":"h3"' in gw.logs() and '"error_code":"shutting_down"' in gw.logs()


def test_certificates_reload_when_the_files_change(gateway: Any, tmp_path: Path) -> None:
    pair = write_dev_pair(tmp_path / "live")
    gw = gateway(_config(pair))
    first = pair[0].read_bytes()
    (tmp_path / "first.pem").write_bytes(first)
    assert _run(_h3(gw.port, pair[0], "GET", "/v1/models", "a")).status == 200
    write_dev_pair(tmp_path / "live")  # a renewed pair in the same files (a rotated secret)
    assert pair[0].read_bytes() != first

    def trusted(cafile: Path) -> bool:
        try:
            return bool(_run(_h3(gw.port, cafile, "GET", "/v1/models", "b")).status == 200)
        except ConnectionError:
            return False

    _wait(lambda: trusted(pair[0]), timeout=20)
    assert not trusted(tmp_path / "first.pem")
    assert "HTTP/3 certificate loaded" in gw.logs()
    # SIGHUP re-reads them on the spot.
    write_dev_pair(tmp_path / "live")
    gw.signal(signal.SIGHUP)
    _wait(lambda: trusted(pair[0]), timeout=20)


def test_certs_dev_writes_a_pair_the_node_serves(gateway: Any, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "node", "certs", "dev", "--dir", str(tmp_path / "c")],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    cert, key = tmp_path / "c" / "cert.pem", tmp_path / "c" / "key.pem"
    assert str(cert) in out.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    gw = gateway(_config((cert, key)))
    assert _run(_h3(gw.port, cert, "GET", "/v1/models", "c")).status == 200


def test_enabled_without_certificates_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "h.yaml"
    cfg.write_text("server:\n  http3:\n    enabled: true\n")
    out = subprocess.run([sys.executable, "-m", "node", "config", "validate", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    assert "certificate_file" in out.stderr


@pytest.fixture
def udp_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    yield port


def test_workers_share_the_udp_port(
    gateway: Any, certs: tuple[Path, Path], redis_url: str, udp_port: int
) -> None:
    gw = gateway(_config(certs, port=udp_port), workers=2, redis=redis_url)
    assert httpx.get(gw.url + "/v1/models").headers["alt-svc"].startswith(f'h3=":{udp_port}"')

    async def many() -> set[str]:
        seen: set[str] = set()
        for _ in range(12):  # each connection a new client port: the kernel spreads them
            r = await _h3(udp_port, certs[0], "POST", "/v1/chat/completions", "w", _chat(), JSON)
            assert r.status == 200
            seen.add(r.headers["x-hapax-worker"])
        return seen

    assert _run(many()) == {"0", "1"}


def test_with_two_workers_a_migrating_client_keeps_its_stream(
    gateway: Any, certs: tuple[Path, Path], redis_url: str, udp_port: int
) -> None:
    """Datagrams are steered by connection id, not by address: after a move to a new port
    (hashed anew, half the time to the other worker) the stream still reaches its worker."""
    gw = gateway(_config(certs, port=udp_port), workers=2, redis=redis_url)

    async def moves() -> list[tuple[bytes, int, int]]:
        return await asyncio.gather(*(_migrate(udp_port, certs[0]) for _ in range(6)))

    for body, before, after in _run(moves()):
        assert before != after
        assert _text(body) == REPLY
        assert body.endswith(b"data: [DONE]\n\n")
    assert _metric(gw, "hapax_http3_migrations_total") == 6



def test_a_restarted_worker_serves_on_the_same_steered_socket(
    gateway: Any, certs: tuple[Path, Path], redis_url: str, udp_port: int
) -> None:
    """The supervisor keeps the UDP sockets: a worker killed and started again takes over its
    own, so the group keeps its order and steering by connection id still holds."""
    gw = gateway(_config(certs, port=udp_port), workers=2, redis=redis_url)
    old = gw.wait_workers(2)
    os.kill(old[1], signal.SIGKILL)
    gw.wait_workers(2, exclude=[old[1]])

    async def after() -> tuple[set[str], list[tuple[bytes, int, int]]]:
        seen: set[str] = set()
        for _ in range(12):
            r = await _h3(udp_port, certs[0], "GET", "/v1/models", "r")
            assert r.status == 200
            seen.add(r.headers["x-hapax-worker"])
        return seen, await asyncio.gather(*(_migrate(udp_port, certs[0]) for _ in range(4)))

    seen, moved = _run(after())
    assert seen == {"0", "1"}
    for body, _, _ in moved:
        assert _text(body) == REPLY
