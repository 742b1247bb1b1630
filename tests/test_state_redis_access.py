"""How nodes reach Redis, as managed Redis services are reached: TLS, a password, a unix socket, a key prefix.

Real ``hapax serve`` processes, a real redis-server started for each test with
the setting under test (``tests.redis_server``), the openai SDK as the client.
Each setting must carry the whole of shared state, not just connect: two nodes
admit exactly one limit between them. A wrong password is Redis being down for
the failure policy, and the log says why without saying the password.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from tests.certs import make_certs
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer, TLSFiles
from tests.reliability_support import chats, lead_and_follow, metrics
from tests.test_state_http import clients, spread
from tests.upstreams.server import UpstreamServer, UpstreamState


def _config(redis: dict[str, Any], *, cluster: str, limits: dict[str, Any]) -> dict[str, Any]:
    return {
        "providers": {"mock": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": "demo", "provider": "mock"}],
        "limits": limits,
        "state": {"cluster": cluster, "redis": redis},
    }


@pytest.fixture
def servers() -> Iterator[Callable[..., RedisServer]]:
    """Factory for redis-servers of this test's own; all are stopped after it."""
    started: list[RedisServer] = []

    def start(**kw: Any) -> RedisServer:
        started.append(RedisServer(**kw).start())
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def tls_redis(servers: Callable[..., RedisServer], tmp_path: Path) -> dict[str, Any]:
    """A redis-server that speaks only TLS and wants a password: how a node's config reaches it."""
    make_certs(tmp_path)
    password = "redis-pw-" + secrets.token_hex(8)
    server = servers(tls=TLSFiles(tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem"),
                     password=password)
    assert server.url.startswith("rediss://")
    return {"url": server.url, "password": password, "tls_ca_file": str(tmp_path / "ca.pem"), "key_prefix": "acme"}


def _direct(reach: dict[str, Any]) -> redis.Redis:
    """A plain client to the TLS Redis, for the test to read keys itself."""
    return redis.Redis.from_url(reach["url"], password=reach["password"], ssl_ca_certs=reach["tls_ca_file"])


def _followers(reach: dict[str, Any], pattern: str) -> int:
    r = _direct(reach)
    try:
        return sum(int(r.scard(k)) for k in r.scan_iter(match=pattern))
    finally:
        r.close()


def _degraded(node: GatewayProcess) -> float:
    return metrics(node.url).get('hapax_degraded{dependency="redis"}', -1.0)


async def test_two_nodes_share_limits_over_tls_with_a_password_under_their_key_prefix(
    gateway: Callable[..., GatewayProcess], tls_redis: dict[str, Any]
) -> None:
    reach = tls_redis
    password = reach["password"]
    cfg = _config(reach, cluster="tls", limits={"requests_per_minute": 5, "on_redis_failure": "fail_closed"})
    a, b = gateway(cfg), gateway(cfg)
    codes = await spread(clients(a, b), 12)
    # fail_closed: had either node not reached Redis, its calls would all be refused.
    assert codes.count(200) == 5 and codes.count(429) == 7, codes
    assert [_degraded(n) for n in (a, b)] == [0.0, 0.0]
    direct = _direct(reach)
    try:
        keys = direct.keys("*")
    finally:
        direct.close()
    assert keys and all(k.startswith(b"acme:tls:") for k in keys), keys
    for n in (a, b):
        assert password not in n.logs()


def test_identical_requests_on_two_nodes_share_one_call_over_tls(
    gateway: Callable[..., GatewayProcess], tls_redis: dict[str, Any],
    openai_upstream: tuple[UpstreamServer, UpstreamState],
) -> None:
    # The leader's result reaches the other node by PUBLISH: pub/sub over TLS, not just commands.
    server, up = openai_upstream
    reach = tls_redis
    cfg = {
        "providers": {"a": {"type": "openai", "base_url": server.url + "/v1"}},
        "models": [{"name": "m", "deployments": [{"provider": "a", "model": "gpt-a"}]}],
        "state": {"cluster": "tls-dedup", "redis": reach},
    }
    a, b = gateway(cfg), gateway(cfg)
    ra, rb = lead_and_follow(a.url, b.url, up, lambda: _followers(reach, "acme:tls-dedup:dd:f:*") == 1)
    assert ra.status_code == rb.status_code == 200
    assert chats(up.seen) == 1  # one upstream call for both nodes
    assert rb.headers["x-hapax-dedup"] == "shared"


@pytest.mark.parametrize("where", ["password", "url"])
async def test_a_wrong_redis_password_is_redis_down_and_the_log_says_so_without_the_password(
    gateway: Callable[..., GatewayProcess], servers: Callable[..., RedisServer], where: str
) -> None:
    server = servers(password="redis-pw-" + secrets.token_hex(8))
    wrong = "not-the-password-" + secrets.token_hex(8)
    reach = {"url": server.url, "password": wrong} if where == "password" else {
        "url": server.url.replace("redis://", f"redis://:{wrong}@")}
    cfg = _config(reach, cluster="badpw",
                  limits={"requests_per_minute": 100, "on_redis_failure": "fail_closed"})
    node = gateway(cfg)
    async with openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="none", max_retries=0, timeout=30) as c:
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "state_unavailable" and "Redis" in info.value.message
    assert _degraded(node) == 1.0
    logs = node.logs()
    assert "redis unavailable" in logs and "AuthenticationError" in logs, logs
    assert wrong not in logs


async def test_two_nodes_share_limits_through_a_unix_socket(
    gateway: Callable[..., GatewayProcess], servers: Callable[..., RedisServer]
) -> None:
    # A short path: a unix socket's path is limited to about a hundred bytes.
    with tempfile.TemporaryDirectory(prefix="hapax-rs-") as d:
        sock = Path(d) / "redis.sock"
        servers(unix_socket=sock)
        cfg = _config({"url": f"unix://{sock}?db=0"}, cluster="unix",
                      limits={"requests_per_minute": 4, "on_redis_failure": "fail_closed"})
        a, b = gateway(cfg), gateway(cfg)
        codes = await spread(clients(a, b), 10)
        assert codes.count(200) == 4 and codes.count(429) == 6, codes
        assert [_degraded(n) for n in (a, b)] == [0.0, 0.0]
        for n in (a, b):
            n.stop()  # before the socket's directory goes
