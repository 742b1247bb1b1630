"""Three ``hapax serve --etcd --redis --cluster`` processes: one gateway.

What a user checks: which node leads (``hapax_cluster_leader`` on /metrics),
which config each node runs (``x-hapax-config-revision`` on every response and
the models it serves), and how long a config written into etcd takes to be in
force on all three. The config is written straight into etcd (the YAML bytes at
``coordinator._keys.config_key``), as ``hapax config push`` does after
validating; an invalid one written that way must change no node.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aetcd
import httpx
import orjson
import pytest
import yaml

from coordinator import config_key, nodes_prefix
from coordinator._keys import NodeRecord
from hapax import __version__ as hapax_version
from tests.etcd_server import EtcdServer
from tests.gateway_process import ROOT, GatewayProcess

TTL = 2


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 20, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def node_config(model: str = "bootstrap") -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1"},
        "providers": {"m": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": model, "provider": "m"}],
        "cluster": {"lease_ttl": TTL},
    }


def pushed_yaml(model: str, *, also: tuple[str, ...] = ()) -> bytes:
    return yaml.safe_dump({
        "providers": {"m": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": n, "provider": "m"} for n in (model, *also)],
    }).encode()


def etcd_put(etcd: EtcdServer, key: bytes, value: bytes) -> int:
    """Write one key; the store revision it got (the key's mod_revision)."""
    async def put() -> int:
        async with aetcd.Client(port=etcd.port, timeout=5) as c:
            return int((await c.put(key, value)).header.revision)
    return asyncio.run(put())


def metric(gw: GatewayProcess, name: str, labels: str = "") -> float | None:
    try:
        text = httpx.get(gw.url + "/metrics", timeout=2, headers={"connection": "close"}).text
    except httpx.HTTPError:
        return None
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def leaders(nodes: list[GatewayProcess]) -> list[GatewayProcess]:
    return [g for g in nodes if metric(g, "hapax_cluster_leader") == 1]


def served(gw: GatewayProcess, client: httpx.Client | None = None) -> tuple[int, list[str]]:
    """(config revision, models) the node answers ``GET /v1/models`` with."""
    r = (client or httpx).get(gw.url + "/v1/models", timeout=2)
    return int(r.headers["x-hapax-config-revision"]), [m["id"] for m in r.json()["data"]]


@pytest.fixture
def three(gateway: Callable[..., GatewayProcess], etcd_server: EtcdServer, redis_url: str,
          cluster_name: str) -> Iterator[list[GatewayProcess]]:
    args = ["--etcd", etcd_server.url, "--cluster", cluster_name]
    nodes = [gateway(node_config(), redis=redis_url, args=args) for _ in range(3)]
    wait_for(lambda: all(metric(g, "hapax_cluster_nodes") == 3 for g in nodes), "three members")
    yield nodes


def test_one_leader_among_three_and_a_killed_leader_replaced_within_the_ttl(
    three: list[GatewayProcess],
) -> None:
    wait_for(lambda: len(leaders(three)) == 1, "a leader")
    assert all(metric(g, "hapax_degraded", '{dependency="etcd"}') == 0 for g in three)
    old = leaders(three)[0]
    rest = [g for g in three if g is not old]
    assert old.proc is not None
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: len(leaders(rest)) == 1, "a new leader", timeout=TTL + 10, every=0.01)
    took = time.monotonic() - killed
    print(f"\nleader failover after SIGKILL: {took:.2f} s (lease TTL {TTL} s)")
    assert took < TTL + 1
    wait_for(lambda: all(metric(g, "hapax_cluster_nodes") == 2 for g in rest), "the dead node to leave")
    assert len(leaders(rest)) == 1


def test_a_config_written_into_etcd_is_in_force_on_all_three_within_a_second(
    three: list[GatewayProcess], etcd_server: EtcdServer, cluster_name: str,
) -> None:
    key = config_key(cluster_name)
    clients = [httpx.Client(timeout=2) for _ in three]
    times: list[float] = []
    try:
        for i in range(20):
            model = f"pushed-{i}"
            t0 = time.monotonic()
            rev = etcd_put(etcd_server, key, pushed_yaml(model))
            pending = set(range(3))
            deadline = time.monotonic() + 10
            while pending and time.monotonic() < deadline:  # bounded: every node, or fail
                for n in list(pending):
                    got_rev, models = served(three[n], clients[n])
                    if got_rev == rev:
                        assert models == [model]
                        pending.discard(n)
            assert not pending, f"nodes {sorted(pending)} did not apply revision {rev}"
            times.append(time.monotonic() - t0)
            for g in three:  # the applied revision is what each node publishes
                wait_for(lambda g=g, rev=rev: metric(g, "hapax_config_revision") == rev, "the revision gauge")
    finally:
        for c in clients:
            c.close()
    times.sort()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    print(f"\nconfig propagation to 3 nodes over {len(times)} pushes: p50 {p50 * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms")
    assert p50 < 1.0


def test_an_invalid_revision_written_into_etcd_changes_no_node(
    three: list[GatewayProcess], etcd_server: EtcdServer, cluster_name: str,
) -> None:
    key = config_key(cluster_name)
    good = etcd_put(etcd_server, key, pushed_yaml("good"))
    wait_for(lambda: all(served(g) == (good, ["good"]) for g in three), "the good revision everywhere")
    failures = [metric(g, "hapax_config_reloads_total", '{result="failure"}') or 0 for g in three]
    etcd_put(etcd_server, key, b"models: [{name: broken, provider: nowhere}]\n")
    # Each node looked at it and rejected it (its failure count moved), and still serves the good one.
    wait_for(lambda: all((metric(g, "hapax_config_reloads_total", '{result="failure"}') or 0) > f
                         for g, f in zip(three, failures, strict=True)), "each node to reject it")
    for g in three:
        assert served(g) == (good, ["good"])
        r = httpx.post(g.url + "/v1/chat/completions", timeout=5,
                       json={"model": "good", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert "nowhere" in g.logs()
    fixed = etcd_put(etcd_server, key, pushed_yaml("fixed"))
    wait_for(lambda: all(served(g) == (fixed, ["fixed"]) for g in three), "the next good revision")


def test_without_etcd_a_node_is_the_single_node_of_today(gateway: Callable[..., GatewayProcess]) -> None:
    g = gateway(node_config())
    assert served(g) == (1, ["bootstrap"])
    assert metric(g, "hapax_cluster_leader") is None
    assert metric(g, "hapax_degraded", '{dependency="etcd"}') is None


ADMIN = "hpx_admin_" + "C" * 40


def hapax(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cluster_status_and_admin_cluster_agree_with_what_the_test_knows(
    gateway: Callable[..., GatewayProcess], etcd_server: EtcdServer, redis_url: str, cluster_name: str,
) -> None:
    args = ["--etcd", etcd_server.url, "--cluster", cluster_name]
    cfg = {**node_config(), "auth": {"mode": "keys", "admin_key": ADMIN}}
    nodes = [gateway(cfg, redis=redis_url, args=args) for _ in range(3)]
    auth = {"authorization": f"Bearer {ADMIN}"}
    wait_for(lambda: all(metric(g, "hapax_cluster_nodes") == 3 for g in nodes), "three members")
    rev = etcd_put(etcd_server, config_key(cluster_name), yaml.safe_dump(
        {**yaml.safe_load(pushed_yaml("pushed")), "auth": {"mode": "keys", "admin_key": ADMIN}}).encode())
    wait_for(lambda: all(metric(g, "hapax_config_revision") == rev for g in nodes), "the push everywhere")
    wait_for(lambda: len(leaders(nodes)) == 1, "a leader")
    leader = leaders(nodes)[0]
    ports = sorted(g.port for g in nodes)

    def admin_view(g: GatewayProcess) -> dict[str, Any]:
        r = httpx.get(g.url + "/admin/cluster", headers=auth, timeout=5)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    # Every node's record says the revision it runs: wait until each has written it.
    wait_for(lambda: all(n["config_revision"] == rev for n in admin_view(nodes[0])["nodes"]), "published revisions")
    for g in nodes:
        doc = admin_view(g)
        assert doc["cluster"] == cluster_name and doc["revision"] == rev
        assert sorted(int(n["address"].rsplit(":", 1)[1]) for n in doc["nodes"]) == ports
        by_port = {int(n["address"].rsplit(":", 1)[1]): n for n in doc["nodes"]}
        assert [by_port[p]["leader"] for p in ports] == [p == leader.port for p in ports]
        assert doc["leader"] == by_port[leader.port]["id"]
        assert {n["config_revision"] for n in doc["nodes"]} == {rev}
        assert all(n["version"] == hapax_version and n["started_at"].endswith("Z") for n in doc["nodes"])
        assert doc["dependencies"] == {"etcd": "ok", "redis": "ok"}
    assert httpx.get(nodes[0].url + "/admin/cluster", timeout=5).status_code == 401
    # The role "view cluster": a viewer's key may look (on any node: keys are shared), a developer's not.
    for role, status in (("viewer", 200), ("developer", 403)):
        made = httpx.post(nodes[0].url + "/admin/keys", headers=auth, timeout=5, json={"name": role, "role": role})
        assert made.status_code == 201, made.text
        secret = made.json()["key"]
        wait_for(lambda secret=secret, status=status: httpx.get(
            nodes[2].url + "/admin/cluster", headers={"authorization": f"Bearer {secret}"}, timeout=5,
        ).status_code == status, f"{role} on another node")

    via_etcd = hapax("cluster", "status", "--json", *args)
    assert via_etcd.returncode == 0, via_etcd.stderr
    via_url = hapax("cluster", "status", "--json", "--url", nodes[1].url, "--admin-key", ADMIN)
    assert via_url.returncode == 0, via_url.stderr
    a, b = orjson.loads(via_etcd.stdout), orjson.loads(via_url.stdout)
    strip = ("in_flight",)  # load moves; everything else must be the same document
    for doc in (a, b):
        assert doc["leader"] == admin_view(nodes[0])["leader"] and doc["revision"] == rev
        for n in doc["nodes"]:
            for k in strip:
                n.pop(k)
    assert a["nodes"] == b["nodes"]
    table = hapax("cluster", "status", *args)
    assert table.returncode == 0 and f"leader {a['leader']}" in table.stdout
    assert len(table.stdout.strip().splitlines()) == 2 + 3

    # A node that cannot apply what the others run: status waits --settle seconds, then exits 1.
    # (A member record written by hand, as a node stuck on an old revision would leave.)
    stuck = NodeRecord(id="stuck-node", address="127.0.0.1:1", version=hapax_version, started_at=time.time(),
                       config_revision=rev - 1, in_flight=0)
    etcd_put(etcd_server, nodes_prefix(cluster_name) + b"stuck-node", stuck.encode())
    t0 = time.monotonic()
    disagree = hapax("cluster", "status", "--settle", "1", *args)
    assert disagree.returncode == 1
    assert time.monotonic() - t0 >= 1
    assert "disagree on the config revision" in disagree.stderr
    assert "stuck-node" in disagree.stdout


def test_etcd_stopped_and_started_under_load_loses_no_request_and_the_watch_resumes(
    three: list[GatewayProcess], etcd_server: EtcdServer, cluster_name: str,
) -> None:
    key = config_key(cluster_name)
    rev1 = etcd_put(etcd_server, key, pushed_yaml("before", also=("steady",)))
    wait_for(lambda: all(served(g) == (rev1, ["before", "steady"]) for g in three), "the first push everywhere")
    wait_for(lambda: len(leaders(three)) == 1, "a leader")
    stop = threading.Event()
    results: Counter[int] = Counter()
    errors: list[str] = []

    def load(g: GatewayProcess) -> None:
        with httpx.Client(base_url=g.url, timeout=10) as c:
            for _ in range(100_000):  # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    r = c.post("/v1/chat/completions",
                               json={"model": "steady", "messages": [{"role": "user", "content": "x"}]})
                    results[r.status_code] += 1
                    if r.status_code != 200:
                        errors.append(r.text[:200])
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=load, args=(g,), daemon=True) for g in three]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(results.values()) >= 30, "load")
        etcd_server.stop()
        wait_for(lambda: all(metric(g, "hapax_degraded", '{dependency="etcd"}') == 1 for g in three),
                 "every node to report etcd degraded")
        # Cut off, the leader steps down: no node leads (and so none probes) while etcd is away.
        wait_for(lambda: not leaders(three), "the leader to step down")
        during = sum(results.values())
        wait_for(lambda: sum(results.values()) >= during + 30, "requests served while etcd is down")
        assert all(served(g) == (rev1, ["before", "steady"]) for g in three)  # the last good config stays
        etcd_server.start()
        # Written at once, before the nodes' watches are back (they reconnect with backoff): they
        # must resume from the revision they had, and so find this one, not start from "now".
        rev2 = etcd_put(etcd_server, key, pushed_yaml("after-1", also=("steady",)))
        wait_for(lambda: all(metric(g, "hapax_degraded", '{dependency="etcd"}') == 0 for g in three),
                 "etcd back on every node", timeout=30)
        wait_for(lambda: all(served(g) == (rev2, ["after-1", "steady"]) for g in three), "after-1 everywhere")
        wait_for(lambda: len(leaders(three)) == 1, "a leader again", timeout=30)
        for model in ("after-2",):
            rev = etcd_put(etcd_server, key, pushed_yaml(model, also=("steady",)))
            wait_for(lambda rev=rev, model=model: all(served(g) == (rev, [model, "steady"]) for g in three),
                     f"{model} everywhere")
        after = sum(results.values())
        wait_for(lambda: sum(results.values()) >= after + 30, "requests after etcd came back")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert errors == [] and set(results) == {200}, (results, errors[:5])
    assert all(g.proc is not None and g.proc.poll() is None for g in three)


def test_each_worker_of_a_node_is_a_member_and_one_process_of_the_cluster_leads(
    gateway: Callable[..., GatewayProcess], etcd_server: EtcdServer, redis_url: str, cluster_name: str,
) -> None:
    args = ["--etcd", etcd_server.url, "--cluster", cluster_name]
    cfg = {**node_config(), "cluster": {"lease_ttl": TTL, "node_id": "host-a"}}
    a = gateway(cfg, redis=redis_url, workers=2, args=args)
    b = gateway(node_config(), redis=redis_url, args=args)
    wait_for(lambda: metric(b, "hapax_cluster_nodes") == 3, "two workers and a node")
    wait_for(lambda: len(leaders([a, b])) == 1, "a leader")
    doc = orjson.loads(hapax("cluster", "status", "--json", *args).stdout)
    ids = [n["id"] for n in doc["nodes"]]
    assert "host-a-w0" in ids and "host-a-w1" in ids and len(ids) == 3
    assert all(n["address"] == f"127.0.0.1:{a.port}" for n in doc["nodes"] if n["id"].startswith("host-a-"))
    assert sum(n["leader"] for n in doc["nodes"]) == 1
    rev = etcd_put(etcd_server, config_key(cluster_name), pushed_yaml("pushed"))
    # Every worker applies it and says so: the status is "agreed" only when both workers have.
    status = hapax("cluster", "status", "--json", "--settle", "10", *args)
    assert status.returncode == 0, status.stderr
    assert {n["config_revision"] for n in orjson.loads(status.stdout)["nodes"]} == {rev}
    wait_for(lambda: metric(a, "hapax_config_revision") == rev, "the lowest worker's revision")


def test_hapax_config_push_and_rollback_reach_every_node(
    three: list[GatewayProcess], etcd_server: EtcdServer, cluster_name: str, tmp_path: Path,
) -> None:
    args = ["--etcd", etcd_server.url, "--cluster", cluster_name]
    revs = []
    for model in ("one", "two"):
        f = tmp_path / f"{model}.yaml"
        f.write_bytes(pushed_yaml(model))
        pushed = hapax("config", "push", str(f), *args)
        assert pushed.returncode == 0, pushed.stderr
        m = re.search(r"revision (\d+)", pushed.stdout)
        assert m is not None, pushed.stdout
        rev = int(m.group(1))
        revs.append(rev)
        wait_for(lambda rev=rev, model=model: all(served(g) == (rev, [model]) for g in three), f"{model} everywhere")
    back = hapax("config", "rollback", str(revs[0]), *args)
    assert back.returncode == 0, back.stderr
    status = hapax("cluster", "status", "--json", "--settle", "10", *args)
    assert status.returncode == 0, status.stderr
    doc = orjson.loads(status.stdout)
    assert doc["revision"] > revs[1] and {n["config_revision"] for n in doc["nodes"]} == {doc["revision"]}
    assert all(served(g) == (doc["revision"], ["one"]) for g in three)
