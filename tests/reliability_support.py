"""Helpers for the reliability tests: several scripted upstreams, metric scraping, polling."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx

from tests.upstreams import openai_api
from tests.upstreams.server import UpstreamServer, UpstreamState

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


@contextmanager
def upstreams(n: int) -> Iterator[list[tuple[UpstreamServer, UpstreamState]]]:
    """``n`` OpenAI-compatible upstreams, each with its own fault script."""
    started: list[tuple[UpstreamServer, UpstreamState]] = []
    try:
        for _ in range(n):
            state = UpstreamState()
            started.append((UpstreamServer(openai_api.make_app(state)).start(), state))
        yield started
    finally:
        for server, _ in started:
            server.stop()


Ups = list[tuple[UpstreamServer, UpstreamState]]


def metrics(url: str) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        m = _LINE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric(url: str, name: str, **labels: str) -> float:
    want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    return metrics(url).get(name + want, 0.0)


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``cond`` until truthy; fail (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def chats(seen: list[Any]) -> int:
    return sum(1 for s in seen if s.method == "POST")


def chat(url: str, content: str = "hi", *, stream: bool = False, headers: dict[str, str] | None = None,
         timeout: float = 10, model: str = "m") -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=timeout)


def lead_and_follow(lead_url: str, follow_url: str, up: UpstreamState,
                    following: Callable[[], bool]) -> tuple[httpx.Response, httpx.Response]:
    """The same question to two nodes: the first's call is held upstream until the second
    follows it (``following``), then let go. Both responses, leader's first."""
    up.faults.append({"hold": 20})
    with ThreadPoolExecutor(2) as pool:
        lead = pool.submit(chat, lead_url, "same question", timeout=30)
        wait_for(lambda: chats(up.seen) == 1, what="the leader's call upstream")
        follow = pool.submit(chat, follow_url, "same question", timeout=30)
        wait_for(following, what="the other node following")
        up.release.set()
        return lead.result(30), follow.result(30)
