"""Keys in etcd and ``hapax cluster reload``, shown through three real nodes.

Every test starts three ``python -m node serve`` processes given the session's
real etcd and Redis and this test's own cluster name, and talks to them with
the openai SDK, httpx and the ``hapax`` CLI. Propagation "within a second" is a
bounded poll with a wide margin (a loaded CI machine); the figures measured are
printed (``-s``) and written up in docs/cluster.md.
"""

from __future__ import annotations

import os
import signal
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.etcd_server import EtcdServer
from tests.gateway_process import ROOT, GatewayProcess
from tests.reliability_support import metric
from tests.upstreams import openai_api
from tests.upstreams.server import UpstreamServer, UpstreamState

ADMIN_KEY = "hpx_admin_" + "E" * 40
ENV = {"HAPAX_ADMIN_KEY": ADMIN_KEY}
MSG = [{"role": "user", "content": "hi"}]
Start = Callable[..., GatewayProcess]
#: The bound of every propagation poll: "within a second", with room for a loaded machine.
WITHIN = 5.0


def config(name: str, redis_url: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "auth": {"mode": "keys", "admin_key": "${HAPAX_ADMIN_KEY}"},
        "state": {"cluster": name, "redis": {"url": redis_url}},
        "providers": {"mock": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": "demo", "provider": "mock"}],
    }
    cfg.update(extra)
    return cfg


def three(gateway: Start, etcd: EtcdServer, name: str, redis_url: str, **extra: Any) -> list[GatewayProcess]:
    return [gateway(config(name, redis_url, **extra), env=ENV, args=["--etcd", etcd.url]) for _ in range(3)]


def admin(gw: GatewayProcess, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, gw.url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10, **kw)


def make_key(gw: GatewayProcess, name: str = "k") -> tuple[str, str]:
    r = admin(gw, "POST", "/admin/keys", json={"name": name})
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["id"]


def status_of(gw: GatewayProcess, secret: str) -> int:
    """The status of one chat call with ``secret`` (the SDK raising on an error status)."""
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=10)
    try:
        c.chat.completions.create(model="demo", messages=MSG)  # type: ignore[arg-type]
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def refusal(gw: GatewayProcess, secret: str) -> openai.AuthenticationError:
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model="demo", messages=MSG)  # type: ignore[arg-type]
    return info.value


def until(check: Callable[[], Any], what: str, timeout: float = WITHIN) -> Any:
    """Poll ``check`` (bounded) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        out = check()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def propagation(nodes: list[GatewayProcess], secret: str, status: int) -> float:
    """Seconds until every node answers ``secret`` with ``status`` (polled, bounded)."""
    t0 = time.monotonic()
    for gw in nodes:
        until(lambda gw=gw: status_of(gw, secret) == status, f"{gw.url} answers {status}")  # type: ignore[misc]
    return time.monotonic() - t0


def hapax_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **ENV, **(env or {})}, timeout=60)


def report(what: str, samples: list[float]) -> None:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    print(f"\n{what}: n={len(samples)} p50={statistics.median(samples) * 1000:.0f} ms "
          f"p99={q[98] * 1000:.0f} ms max={max(samples) * 1000:.0f} ms")


def test_a_key_made_through_one_node_works_on_all_three(
    gateway: Start, etcd_server: EtcdServer, cluster_name: str, redis_url: str
) -> None:
    nodes = three(gateway, etcd_server, cluster_name, redis_url)
    times = []
    for i in range(6):
        secret, key_id = make_key(nodes[i % 3], f"k{i}")
        # The node that made it knows it when the admin call returns.
        assert status_of(nodes[i % 3], secret) == 200
        times.append(propagation(nodes, secret, 200))
        listed = {k["id"] for k in admin(nodes[(i + 1) % 3], "GET", "/admin/keys").json()["data"]}
        assert key_id in listed
    report("create propagation", times)

    # Last-used times travel through Redis: a key used on node 1 only shows its use on node 2.
    secret, key_id = make_key(nodes[0], "used-on-one")
    until(lambda: admin(nodes[2], "GET", f"/admin/keys/{key_id}").status_code == 200, "node 2 knows the key")
    assert admin(nodes[2], "GET", f"/admin/keys/{key_id}").json()["last_used_at"] is None
    until(lambda: status_of(nodes[1], secret) == 200, "node 1 knows the key")
    until(lambda: admin(nodes[2], "GET", f"/admin/keys/{key_id}").json()["last_used_at"] is not None,
          "node 2 shows the use node 1 saw")


def test_revoked_and_rotated_keys_are_refused_by_every_node(
    gateway: Start, etcd_server: EtcdServer, cluster_name: str, redis_url: str
) -> None:
    nodes = three(gateway, etcd_server, cluster_name, redis_url)
    keys = [make_key(nodes[i % 3], f"k{i}") for i in range(20)]
    for secret, _ in keys:
        propagation(nodes, secret, 200)
    revoked = []
    for i, (secret, key_id) in enumerate(keys):
        through, others = nodes[i % 3], [n for n in nodes if n is not nodes[i % 3]]
        t0 = time.monotonic()
        r = admin(through, "POST", f"/admin/keys/{key_id}/revoke")
        assert r.status_code == 200 and r.json()["revoked"], r.text
        assert status_of(through, secret) == 401  # at once on the node that did it
        for gw in others:
            until(lambda gw=gw, s=secret: status_of(gw, s) == 401, f"{gw.url} refuses a revoked key")  # type: ignore[misc]
        revoked.append(time.monotonic() - t0)
    report("revocation propagation (admin call to refused by both others)", revoked)
    err = refusal(nodes[1], keys[0][0])
    assert err.body["code"] == "invalid_api_key" and "revoked" in err.body["message"]  # type: ignore[index]

    secret, key_id = make_key(nodes[0], "rotating")
    propagation(nodes, secret, 200)
    rotated = []
    for i in range(5):
        r = admin(nodes[i % 3], "POST", f"/admin/keys/{key_id}/rotate")
        assert r.status_code == 200, r.text
        new = r.json()["key"]
        t0 = time.monotonic()
        propagation(nodes, secret, 401)
        propagation(nodes, new, 200)
        rotated.append(time.monotonic() - t0)
        secret = new
    report("rotation propagation", rotated)


def test_the_cli_reaches_every_node_through_etcd(
    gateway: Start, etcd_server: EtcdServer, cluster_name: str, redis_url: str
) -> None:
    nodes = three(gateway, etcd_server, cluster_name, redis_url)
    flags = ["--etcd", etcd_server.url, "--cluster", cluster_name]
    out = hapax_cli("keys", "create", "--name", "from-cli", "--team", "red", *flags)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip()
    propagation(nodes, secret, 200)
    # The environment works as the flags do.
    env = {"HAPAX_ETCD_ENDPOINTS": etcd_server.url, "HAPAX_CLUSTER": cluster_name}
    listed = hapax_cli("keys", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [k["name"] for k in __import__("orjson").loads(listed.stdout)["data"]] == ["from-cli"]
    rotated = hapax_cli("keys", "rotate", "from-cli", *flags)
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    propagation(nodes, secret, 401)
    propagation(nodes, new, 200)
    revoked = hapax_cli("keys", "revoke", "from-cli", *flags)
    assert revoked.returncode == 0, revoked.stderr
    propagation(nodes, new, 401)
    # A key made through a node's admin API is one the CLI sees, and the other way round.
    _, key_id = make_key(nodes[2], "from-api")
    shown = hapax_cli("keys", "show", key_id, "--json", *flags)
    assert shown.returncode == 0 and key_id in shown.stdout, shown.stderr


def test_with_etcd_down_known_keys_work_and_key_writes_get_a_clear_503(
    gateway: Start, etcd_server: EtcdServer, cluster_name: str, redis_url: str
) -> None:
    nodes = three(gateway, etcd_server, cluster_name, redis_url, cluster={"etcd": {"timeout": 0.5}})
    live, gone = make_key(nodes[0], "live"), make_key(nodes[1], "gone")
    for secret, _ in (live, gone):
        propagation(nodes, secret, 200)
    admin(nodes[2], "POST", f"/admin/keys/{gone[1]}/revoke")
    propagation(nodes, gone[0], 401)
    etcd_server.stop()
    try:
        for gw in nodes:
            assert status_of(gw, live[0]) == 200  # from the local copy
            assert status_of(gw, gone[0]) == 401  # revoked stays revoked
            r = admin(gw, "POST", "/admin/keys", json={"name": "during-outage"})
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "key_store_unavailable" and "etcd" in err["message"]
            r = admin(gw, "POST", f"/admin/keys/{live[1]}/revoke")
            assert r.status_code == 503 and r.json()["error"]["code"] == "key_store_unavailable"
        assert status_of(nodes[1], live[0]) == 200  # the failed revoke changed nothing
        out = hapax_cli("keys", "create", "--name", "cli-outage", "--etcd", etcd_server.url,
                        "--cluster", cluster_name)
        assert out.returncode == 1 and "etcd" in out.stderr, out.stderr
        out = hapax_cli("cluster", "reload", "--etcd", etcd_server.url, "--cluster", cluster_name)
        assert out.returncode == 1 and "did not take the reload" in out.stderr, out.stderr
    finally:
        etcd_server.start()
    # Back without a restart: the watches resume and a write reaches every node again.
    secret, _ = until(lambda: admin(nodes[0], "POST", "/admin/keys", json={"name": "after"}).status_code == 201
                      and make_key(nodes[0], "after2"), "key writes work again", timeout=20)
    propagation(nodes, secret, 200)


def test_cluster_reload_makes_every_node_read_its_credential_file_again(
    gateway: Start, etcd_server: EtcdServer, cluster_name: str, redis_url: str,
    openai_upstream: tuple[UpstreamServer, UpstreamState], tmp_path: Path,
) -> None:
    server, state = openai_upstream
    key_files = []
    nodes = []
    for i in range(3):
        f = tmp_path / f"node{i}-openai-key"  # each node's own mount of the same Secret
        f.write_text("sk-old\n")
        key_files.append(f)
        cfg = config(cluster_name, redis_url,
                     providers={"up": {"type": "openai", "base_url": server.url + "/v1",
                                       "api_key_file": str(f)}},
                     models=[{"name": "demo", "provider": "up", "model": "gpt-x"}])
        nodes.append(gateway(cfg, env=ENV, args=["--etcd", etcd_server.url]))
    secret, _ = make_key(nodes[0])
    propagation(nodes, secret, 200)

    def keys_seen() -> list[str]:
        return [s.headers.get("Authorization", "") for s in state.seen]

    assert set(keys_seen()) == {"Bearer sk-old"}
    for f in key_files:  # the Secret rotated; the nodes do not notice by themselves
        f.write_text("sk-new\n")
    for gw in nodes:
        assert status_of(gw, secret) == 200
    assert keys_seen()[-1] == "Bearer sk-old"

    out = hapax_cli("cluster", "reload", "--etcd", etcd_server.url, "--cluster", cluster_name)
    assert out.returncode == 0, out.stderr
    assert "revision" in out.stdout

    def reloaded(gw: GatewayProcess) -> bool:
        return metric(gw.url, "hapax_reloads_total", result="success", trigger="cluster") == 1

    for gw in nodes:
        until(lambda gw=gw: reloaded(gw), f"{gw.url} reloaded")  # type: ignore[misc]
        state.seen.clear()
        assert status_of(gw, secret) == 200
        assert keys_seen() == ["Bearer sk-new"]
        assert "reloaded credentials and certificates" in gw.logs()
        assert "sk-new" not in gw.logs() and "sk-old" not in gw.logs()


def test_keys_of_a_state_directory_move_into_etcd_with_export_and_import(
    gateway: Start, etcd_server: EtcdServer, cluster_name: str, redis_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    made = hapax_cli("keys", "create", "--name", "old-node", "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    exported = hapax_cli("keys", "export", "--state-dir", str(state))
    assert exported.returncode == 0, exported.stderr
    assert secret not in exported.stdout  # hashes only
    dump = tmp_path / "keys-export.json"
    dump.write_text(exported.stdout)

    node = gateway(config(cluster_name, redis_url), env=ENV, args=["--etcd", etcd_server.url])
    assert status_of(node, secret) == 401
    flags = ["--etcd", etcd_server.url, "--cluster", cluster_name]
    imported = hapax_cli("keys", "import", str(dump), *flags)
    assert imported.returncode == 0 and "imported 1 key(s)" in imported.stderr, imported.stderr
    until(lambda: status_of(node, secret) == 200, "an imported key works on a running node")
    again = hapax_cli("keys", "import", str(dump), *flags)
    assert again.returncode == 0 and "imported 0 key(s); 1 already there" in again.stderr, again.stderr
    bad = tmp_path / "not-keys.json"
    bad.write_text('{"something": "else"}')
    refused = hapax_cli("keys", "import", str(bad), *flags)
    assert refused.returncode != 0 and "is not a keys.json" in refused.stderr, refused.stderr


def test_sighup_rereads_one_nodes_credential_file_and_a_missing_one_keeps_the_last_key(
    gateway: Start, openai_upstream: tuple[UpstreamServer, UpstreamState], tmp_path: Path
) -> None:
    server, state = openai_upstream
    f = tmp_path / "openai-key"
    f.write_text("sk-first\n")
    cfg = {"providers": {"up": {"type": "openai", "base_url": server.url + "/v1", "api_key_file": str(f)}},
           "models": [{"name": "demo", "provider": "up", "model": "gpt-x"}]}
    gw = gateway(cfg)

    def last_key() -> str:
        state.seen.clear()
        assert status_of(gw, "unused") == 200
        return state.seen[-1].headers.get("Authorization", "")

    assert last_key() == "Bearer sk-first"
    f.write_text("sk-second\n")
    gw.signal(signal.SIGHUP)
    until(lambda: metric(gw.url, "hapax_reloads_total", result="success", trigger="signal") == 1, "reloaded")
    assert last_key() == "Bearer sk-second"

    f.unlink()  # a Secret being swapped: the provider keeps the key it has
    gw.signal(signal.SIGHUP)
    until(lambda: metric(gw.url, "hapax_reloads_total", result="failure", trigger="signal") == 1, "reload failed")
    assert last_key() == "Bearer sk-second"
    assert "providers.up.api_key_file" in gw.logs() and "sk-second" not in gw.logs()


def test_a_node_whose_credential_file_is_unreadable_does_not_start(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "key"
    cfg = {"providers": {"up": {"type": "openai", "api_key_file": str(missing)}},
           "models": [{"name": "demo", "provider": "up", "model": "gpt-x"}]}
    def refused_start(cfg: dict[str, Any], name: str) -> str:
        (tmp_path / name).mkdir()
        gw = GatewayProcess(cfg, tmp_path / name)
        try:
            with pytest.raises(RuntimeError, match="exited early") as info:
                gw.start()
        finally:
            assert gw.stop() != 0  # it had exited, with an error status
        return str(info.value)

    out = refused_start(cfg, "a")
    assert "providers.up.api_key_file" in out and str(missing) in out
    both = {"providers": {"up": {"type": "openai", "api_key": "sk-x", "api_key_file": str(missing)}},
            "models": [{"name": "demo", "provider": "up", "model": "gpt-x"}]}
    out = refused_start(both, "b")
    assert "set api_key or api_key_file, not both" in out and "sk-x" not in out


class TlsUpstream(UpstreamServer):
    """The mock OpenAI upstream behind TLS, with a certificate of its own."""

    def __init__(self, state: UpstreamState, context: ssl.SSLContext) -> None:
        super().__init__(openai_api.make_app(state))
        self.context = context

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.context).start()


def self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def test_cluster_reload_makes_every_node_trust_a_rotated_ca_bundle(
    gateway: Start, etcd_server: EtcdServer, cluster_name: str, redis_url: str, tmp_path: Path
) -> None:
    served, served_key = self_signed(tmp_path, "upstream")
    other, _ = self_signed(tmp_path, "someone-else")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(served, served_key)
    state = UpstreamState()
    upstream = TlsUpstream(state, ctx).start()
    try:
        bundle = tmp_path / "ca-bundle.pem"  # the mounted trust store, not yet trusting the upstream
        bundle.write_bytes(other.read_bytes())
        cfg = config(cluster_name, redis_url,
                     providers={"up": {"type": "openai", "base_url": upstream.url + "/v1", "api_key": "sk-t"}},
                     models=[{"name": "demo", "provider": "up", "model": "gpt-x"}],
                     # Every failed handshake answers 502 (no breaker opening to 503 in between).
                     reliability={"circuit_breaker": {"enabled": False}})
        nodes = [gateway(cfg, env={**ENV, "SSL_CERT_FILE": str(bundle)}, args=["--etcd", etcd_server.url])
                 for _ in range(2)]
        secret, _ = make_key(nodes[0])
        until(lambda: all(status_of(gw, secret) != 401 for gw in nodes), "the key is known on both nodes")
        assert state.seen == []  # no TLS handshake succeeded: the upstream's certificate is not trusted

        bundle.write_bytes(other.read_bytes() + served.read_bytes())
        assert [status_of(gw, secret) for gw in nodes] == [502, 502]  # not noticed by themselves
        assert state.seen == []
        out = hapax_cli("cluster", "reload", "--etcd", etcd_server.url, "--cluster", cluster_name)
        assert out.returncode == 0, out.stderr
        for gw in nodes:
            until(lambda gw=gw: metric(gw.url, "hapax_reloads_total", result="success", trigger="cluster") == 1,
                  f"{gw.url} reloaded")  # type: ignore[misc]
            assert status_of(gw, secret) == 200
        assert len(state.seen) == 2
    finally:
        upstream.stop()


def test_a_node_started_while_etcd_is_down_loads_the_keys_when_etcd_answers(
    gateway: Start, etcd_server: EtcdServer, cluster_name: str, redis_url: str
) -> None:
    made = hapax_cli("keys", "create", "--name", "early", "--etcd", etcd_server.url, "--cluster", cluster_name)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    etcd_server.stop()
    try:
        node = gateway(config(cluster_name, redis_url, cluster={"etcd": {"timeout": 0.5}}), env=ENV,
                       args=["--etcd", etcd_server.url])
        assert status_of(node, secret) == 401  # no stored keys yet
        assert admin(node, "GET", "/admin/keys").status_code == 200  # the bootstrap admin key works
    finally:
        etcd_server.start()
    until(lambda: status_of(node, secret) == 200, "the node loaded the keys", timeout=20)
