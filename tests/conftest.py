from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aetcd
import anthropic
import openai
import pytest

from tests.etcd_server import EtcdServer
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.reliability_support import Ups, upstreams
from tests.upstreams import anthropic_api, openai_api
from tests.upstreams.server import UpstreamServer, UpstreamState

Up = tuple[UpstreamServer, UpstreamState]


@pytest.fixture(autouse=True)
def _close_sdk_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every openai/anthropic client a test made, so no socket is left to the GC.

    An SDK client left open keeps its keep-alive connection; when the GC finds it
    later, the ResourceWarning lands on whatever test runs then (or on pytest's exit).
    """
    opened: list[Any] = []
    for cls in (openai.OpenAI, anthropic.Anthropic):
        original = cls.__init__

        def tracking(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> None:
            __original(self, *args, **kwargs)
            opened.append(self)

        monkeypatch.setattr(cls, "__init__", tracking)
    yield
    for client in opened:
        client.close()


@pytest.fixture
def ab() -> Iterator[Ups]:
    """Two OpenAI-compatible upstreams that answer "from a" and "from b"."""
    with upstreams(2) as ups:
        ups[0][1].reply = "from a"
        ups[1][1].reply = "from b"
        yield ups


@pytest.fixture
def openai_upstream() -> Iterator[tuple[UpstreamServer, UpstreamState]]:
    state = UpstreamState()
    server = UpstreamServer(openai_api.make_app(state)).start()
    try:
        yield server, state
    finally:
        server.stop()


@pytest.fixture
def openai_and_anthropic() -> Iterator[tuple[Up, Up]]:
    """An OpenAI-compatible upstream and an Anthropic one, each with its own state."""
    o, a = UpstreamState(), UpstreamState()
    oa = UpstreamServer(openai_api.make_app(o)).start()
    an = UpstreamServer(anthropic_api.make_app(a)).start()
    try:
        yield (oa, o), (an, a)
    finally:
        oa.stop()
        an.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: ``gateway(config_dict, env=...)`` starts a node; all are stopped after the test."""
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any], **kw: Any) -> GatewayProcess:
        d = tmp_path / f"gw{len(started)}"
        d.mkdir()
        g = GatewayProcess(config, d, **kw).start()
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests isolate by cluster name or ``redis_url``."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One real etcd for the session; tests isolate by cluster name (``cluster_name``)."""
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
async def direct(etcd_server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    """A plain aetcd client on the session's etcd, for a test to write and read keys itself."""
    client = aetcd.Client(port=etcd_server.port, timeout=5)
    await client.connect()
    yield client
    await client.close()


@pytest.fixture
def cluster_name(request: pytest.FixtureRequest) -> str:
    """A cluster name no other test uses: its etcd and Redis keys are this test's alone."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:40] + "-" + uuid.uuid4().hex[:6]


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    redis_server.flush()
    return redis_server.url
