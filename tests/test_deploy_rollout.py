"""A rolling update, as Kubernetes does it, drops no request.

Kubernetes ends a pod by running its ``preStop`` hook, then sending SIGTERM to the container's
first process, then SIGKILL after ``terminationGracePeriodSeconds``. The chart's pod runs
``hapax serve --workers N`` with Redis (the supervisor is that first process), so this test does
the same to a node under load: streams and plain calls from several clients at once, a
load balancer that sends while ``/health/ready`` says 200 and stops when it says 503. It shows:

- readiness drops first: ``/health/ready`` is 503 before the listener closes;
- every request that arrived before the signal completes (streams whole, to the last word);
- requests the balancer still sent in the ``drain_delay`` window succeed too;
- the node exits 0 with nothing abandoned.

``tests/test_lifecycle.py::test_sigterm_drains_a_stream_in_flight`` covers one stream on a
single process; this is the pod's case: many of them, on the multi-worker node.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from tests.gateway_process import GatewayProcess

REPLY = " ".join(f"w{i}" for i in range(25))
#: Each stream takes about 25 x 80 ms = 2 s: a signal always finds several mid-way.
CHUNK_DELAY_MS = 80
DRAIN_DELAY = 1.5
SHUTDOWN_GRACE = 20.0
CLIENTS = 10


@dataclass
class Call:
    started: float
    stream: bool
    ended: float | None = None
    text: str | None = None
    error: str | None = None


@dataclass
class Balancer:
    """Routes to the node while its readiness says so, as an endpoints controller would."""

    url: str
    ready: threading.Event = field(default_factory=threading.Event)
    not_ready_at: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.stop.is_set():
                try:
                    status = client.get(self.url + "/health/ready", headers={"connection": "close"}).status_code
                except httpx.HTTPError:
                    status = 0
                if status == 200:
                    self.ready.set()
                elif self.ready.is_set() and self.not_ready_at is None:
                    self.not_ready_at = time.monotonic()
                    self.ready.clear()
                self.stop.wait(0.02)


def _client_loop(gw: GatewayProcess, lb: Balancer, calls: list[Call], lock: threading.Lock, index: int) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=30)
    with client:
        n = 0
        while lb.ready.is_set() and not lb.stop.is_set():
            call = Call(started=time.monotonic(), stream=(index + n) % 3 != 0)
            n += 1
            with lock:
                calls.append(call)
            try:
                if call.stream:
                    text = ""
                    for c in client.chat.completions.create(
                        model="slow", messages=[{"role": "user", "content": "go"}], stream=True
                    ):
                        text += (c.choices[0].delta.content or "") if c.choices else ""
                    call.text = text
                else:
                    r = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "go"}])
                    call.text = r.choices[0].message.content
            except Exception as exc:  # recorded for the assertion, with its type
                call.error = f"{type(exc).__name__}: {exc}"
            call.ended = time.monotonic()


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigterm_under_load_drains_every_request(gateway: Callable[..., GatewayProcess], redis_url: str) -> None:
    config: dict[str, Any] = {
        "server": {"drain_delay": DRAIN_DELAY, "shutdown_grace": SHUTDOWN_GRACE},
        "providers": {
            "slow": {"type": "mock", "mock": {"chunk_delay_ms": CHUNK_DELAY_MS, "reply": REPLY}},
            "fast": {"type": "mock", "mock": {"reply": "done"}},
        },
        "models": [{"name": "slow", "provider": "slow"}, {"name": "fast", "provider": "fast"}],
    }
    gw = gateway(config, workers=2, redis=redis_url)
    lb = Balancer(gw.url)
    watcher = threading.Thread(target=lb.watch, daemon=True)
    watcher.start()
    assert lb.ready.wait(10), "the node never reported ready"

    calls: list[Call] = []
    lock = threading.Lock()
    clients = [threading.Thread(target=_client_loop, args=(gw, lb, calls, lock, i), daemon=True)
               for i in range(CLIENTS)]
    for t in clients:
        t.start()
    try:
        # Under load: plain calls done and several streams open at once.
        def loaded() -> bool:
            with lock:
                done = sum(1 for c in calls if c.ended is not None and not c.stream)
                open_streams = sum(1 for c in calls if c.stream and c.ended is None)
            return done >= 5 and open_streams >= 4

        _wait(loaded, 30, "the node to be under load")
        signalled = time.monotonic()
        gw.signal(signal.SIGTERM)

        _wait(lambda: lb.not_ready_at is not None, 5, "readiness to drop")
        for t in clients:
            t.join(SHUTDOWN_GRACE + 10)
        assert gw.proc is not None
        assert gw.proc.wait(SHUTDOWN_GRACE + 15) == 0
        closed = time.monotonic()
    finally:
        lb.stop.set()
        watcher.join(5)

    # The listener is gone now: a new connection is refused.
    try:
        httpx.get(gw.url + "/health/live", timeout=2)
        raise AssertionError("the node still accepts connections after exiting")
    except httpx.ConnectError:
        pass

    before = [c for c in calls if c.started < signalled]
    after = [c for c in calls if c.started >= signalled]
    streams_cut = [c for c in before if c.stream and c.ended is not None and c.ended > signalled]
    failed = [c for c in calls if c.error is not None or c.text != (REPLY if c.stream else "done")]
    assert not failed, [(c.stream, round(c.started - signalled, 3), c.error, c.text) for c in failed]
    assert all(c.ended is not None for c in calls)
    # The signal found streams in flight, and they finished after it, whole.
    assert len(streams_cut) >= 4, len(streams_cut)
    # Readiness dropped at the signal, long before the node stopped answering.
    assert lb.not_ready_at is not None and signalled <= lb.not_ready_at < closed
    # Each worker's last line: it stopped with nothing left in flight.
    assert re.findall(r'"abandoned_requests":(\d+)', gw.logs()) == ["0", "0"], gw.logs()[-2000:]
    print(f"drain: {len(before)} calls before the signal ({len(streams_cut)} streams in flight), "
          f"{len(after)} after it; ready -> 503 in {lb.not_ready_at - signalled:.3f} s; "
          f"exit {closed - signalled:.2f} s after SIGTERM")
