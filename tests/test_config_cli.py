"""``hapax config push|get|diff|history|rollback`` as an operator runs them, against a real etcd.

Each test has a cluster of its own (``cluster_name``) on the session's etcd. What
etcd holds is checked with a client of its own too: the key a node watches, its
bytes and its ``mod_revision``, are what the commands claim they are.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from coordinator import RevisionConflict, connect, push_config
from coordinator._config_store import _swap
from coordinator._keys import config_key
from hapax.config import EtcdConfig
from tests.etcd_server import EtcdServer
from tests.gateway_process import ROOT
from tests.redis_server import free_port

GOOD_A = b"# first\nproviders:\n  m: {type: mock}\nmodels:\n  - {name: a, provider: m}\n"
GOOD_B = b"providers:\n  m: {type: mock}\nmodels:\n  - {name: b, provider: m}\n"
GOOD_C = b"providers:\n  m: {type: mock}\nmodels:\n  - {name: c, provider: m}\n  - {name: d, provider: m}\n"
BAD = (b"providers:\n  m: {type: mock}\nmodels:\n"
       b"  - {name: a, provider: nowhere}\n  - {name: b, provider: m, alias: [x]}\n")


def hapax(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("HAPAX_DEBUG", "HAPAX_ETCD_ENDPOINTS", "HAPAX_CLUSTER")}
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


class Cli:
    """``hapax config ...`` for one cluster, through the environment an operator would set."""

    def __init__(self, etcd: EtcdServer, cluster: str, tmp: Path) -> None:
        self.env = {"HAPAX_ETCD_ENDPOINTS": etcd.url, "HAPAX_CLUSTER": cluster}
        self.url, self.cluster, self.tmp = etcd.url, cluster, tmp

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return hapax("config", *args, env=self.env)

    def file(self, data: bytes, name: str = "hapax.yaml") -> str:
        f = self.tmp / name
        f.write_bytes(data)
        return str(f)

    def push(self, data: bytes) -> int:
        r = self("push", self.file(data), "--json")
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = orjson.loads(r.stdout)
        assert out["changed"] is True
        return int(out["revision"])

    def history(self) -> dict[str, Any]:
        r = self("history", "--json")
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = orjson.loads(r.stdout)
        return out

    def stored(self) -> tuple[bytes, int] | None:
        """What etcd holds at the config key, read with a client of the test's own."""
        async def read() -> tuple[bytes, int] | None:
            client = connect(EtcdConfig(endpoints=(self.url,)))
            try:
                got = await client.get(config_key(self.cluster))
                return None if got is None else (got.value, got.mod_revision)
            finally:
                await client.close()
        return asyncio.run(read())


@pytest.fixture
def cli(etcd_server: EtcdServer, cluster_name: str, tmp_path: Path) -> Cli:
    return Cli(etcd_server, cluster_name, tmp_path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_push_prints_the_revision_and_get_returns_the_bytes(cli: Cli) -> None:
    assert cli.stored() is None
    r = cli("push", cli.file(GOOD_A))
    assert r.returncode == 0, r.stderr
    stored = cli.stored()
    assert stored is not None and stored[0] == GOOD_A  # the bytes as pushed, comment and all
    assert r.stdout.strip() == f"pushed config to cluster {cli.cluster}: revision {stored[1]} (was none)"

    r = cli("get")
    assert r.returncode == 0 and r.stdout.encode() == GOOD_A
    assert f"revision {stored[1]}, sha256 {sha(GOOD_A)}" in r.stderr
    got = orjson.loads(cli("get", "--json").stdout)
    assert got == {"cluster": cli.cluster, "revision": stored[1], "size": len(GOOD_A), "sha256": sha(GOOD_A),
                   "yaml": GOOD_A.decode()}

    # The same bytes again write nothing: no new revision for nodes to apply.
    r = cli("push", cli.file(GOOD_A))
    assert r.returncode == 0 and r.stdout.startswith("unchanged:")
    assert cli.stored() == stored


def test_push_of_an_invalid_file_is_refused_with_the_key_path_and_nothing_written(cli: Cli) -> None:
    rev = cli.push(GOOD_A)
    bad = cli.file(BAD, "bad.yaml")
    r = cli("push", bad)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    refused = errors(r.stderr)
    assert "error: models[1].alias: unknown key; did you mean 'aliases'?" in refused
    # The same problems, worded the same, as ``hapax config validate`` of the file.
    validated = errors(hapax("config", "validate", bad).stderr)
    assert validated and refused[:len(validated)] == validated
    assert refused[-1] == f"error: {bad} refused: nothing pushed"
    assert cli.stored() == (GOOD_A, rev)

    # A file validate fails for its findings (no models) is refused too; --strict as validate's.
    assert cli("push", cli.file(b"providers:\n  m: {type: mock}\n")).returncode == 1
    r = cli("push", cli.file(GOOD_B), "--strict")  # auth.mode none: a warning
    assert r.returncode == 1 and "warning: auth.mode: none" in r.stderr
    assert cli.stored() == (GOOD_A, rev)


def test_diff_exits_0_when_equal_1_when_they_differ_2_on_trouble(cli: Cli) -> None:
    a, b = cli.file(GOOD_A, "a.yaml"), cli.file(GOOD_B, "b.yaml")
    r = cli("diff", a)
    assert r.returncode == 1 and "(nothing pushed)" in r.stdout and "+# first" in r.stdout
    rev = cli.push(GOOD_A)
    r = cli("diff", a)
    assert (r.returncode, r.stdout) == (0, "")
    r = cli("diff", b)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0] == f"--- /hapax/{cli.cluster}/config@{rev}" and lines[1] == f"+++ {b}"
    assert "-  - {name: a, provider: m}" in lines and "+  - {name: b, provider: m}" in lines
    r = cli("diff", str(cli.tmp / "missing.yaml"))
    assert r.returncode == 2 and errors(r.stderr) == [f"error: cannot read {cli.tmp / 'missing.yaml'}: "
                                                      "No such file or directory"]
    r = hapax("config", "diff", a, "--etcd", f"http://127.0.0.1:{free_port()}", "--cluster", cli.cluster)
    assert r.returncode == 2 and len(errors(r.stderr)) == 1
    r = hapax("config", "diff", a)  # no etcd named at all
    assert r.returncode == 2 and errors(r.stderr)[0].startswith("error: no etcd: pass --etcd URL")


def test_history_lists_pushes_newest_first(cli: Cli) -> None:
    assert cli.history()["revisions"] == []
    revs = [cli.push(data) for data in (GOOD_A, GOOD_B, GOOD_C)]
    assert revs == sorted(revs) and len(set(revs)) == 3
    h = cli.history()
    assert [(e["revision"], e["size"], e["sha256"], e["current"]) for e in h["revisions"]] == [
        (revs[2], len(GOOD_C), sha(GOOD_C), True),
        (revs[1], len(GOOD_B), sha(GOOD_B), False),
        (revs[0], len(GOOD_A), sha(GOOD_A), False),
    ]
    assert h["compacted"] is False and h["truncated"] is False
    table = cli("history").stdout.splitlines()
    assert table[1].split() == [str(revs[2]), str(len(GOOD_C)), sha(GOOD_C)[:12], "(current)"]
    assert [line.split()[0] for line in table[1:]] == [str(r) for r in reversed(revs)]
    r = cli("history", "--limit", "2", "--json")
    assert [e["revision"] for e in orjson.loads(r.stdout)["revisions"]] == revs[:0:-1]
    assert orjson.loads(r.stdout)["truncated"] is True
    # get --revision reads each of them back.
    assert cli("get", "--revision", str(revs[1])).stdout.encode() == GOOD_B


def test_rollback_restores_an_older_revision_as_a_new_one(cli: Cli) -> None:
    first, second = cli.push(GOOD_A), cli.push(GOOD_B)
    r = cli("rollback", str(first))
    assert r.returncode == 0, r.stderr
    stored = cli.stored()
    assert stored is not None and stored[0] == GOOD_A and stored[1] > second
    assert r.stdout.strip() == (f"pushed the config of revision {first} to cluster {cli.cluster}: "
                                f"revision {stored[1]} (was {second})")
    assert [e["sha256"] for e in cli.history()["revisions"]] == [sha(GOOD_A), sha(GOOD_B), sha(GOOD_A)]

    for rev, why in [(stored[1] + 1000, f"revision {stored[1] + 1000} does not exist yet"),
                     (0, "revision 0 is not a revision"),
                     (first - 1, f"cluster '{cli.cluster}' had no config at revision {first - 1}")]:
        r = cli("rollback", str(rev))
        assert r.returncode == 1 and errors(r.stderr)[0].startswith(f"error: {why}"), r.stderr
    assert cli.stored() == stored


def test_rollback_validates_the_old_revision_again(cli: Cli) -> None:
    """An invalid revision (written straight into etcd, not by push) is not pushed back."""
    good = cli.push(GOOD_A)

    async def put_raw() -> int:
        client = connect(EtcdConfig(endpoints=(cli.url,)))
        try:
            put = await client.put(config_key(cli.cluster), BAD)
            return int(put.header.revision)
        finally:
            await client.close()
    bad = asyncio.run(put_raw())
    restored = cli.push(GOOD_A)
    r = cli("rollback", str(bad))
    assert r.returncode == 1
    assert "error: models[1].alias: unknown key; did you mean 'aliases'?" in errors(r.stderr)
    assert f"revision {bad}: " in r.stderr and errors(r.stderr)[-1].endswith("nothing pushed")
    assert cli.stored() == (GOOD_A, restored) and restored > bad > good


def test_rollback_of_a_compacted_revision_is_refused_clearly(cli: Cli) -> None:
    first, _ = cli.push(GOOD_A), cli.push(GOOD_B)
    last = cli.push(GOOD_C)

    async def compact() -> None:
        client = connect(EtcdConfig(endpoints=(cli.url,)))
        try:
            await client.compact(last)
        finally:
            await client.close()
    asyncio.run(compact())
    r = cli("rollback", str(first))
    assert r.returncode == 1
    assert errors(r.stderr) == [f"error: revision {first} was compacted away by etcd; "
                                "'hapax config history' lists the revisions it keeps"]
    h = cli.history()
    assert [e["revision"] for e in h["revisions"]] == [last] and h["compacted"] is True
    assert "(older revisions were compacted away by etcd)" in cli("history").stdout


def test_expect_revision_refuses_a_push_when_someone_else_pushed_meanwhile(cli: Cli) -> None:
    seen = cli.push(GOOD_A)
    theirs = cli.push(GOOD_B)  # another operator
    r = cli("push", cli.file(GOOD_C), "--expect-revision", str(seen))
    assert r.returncode == 1
    assert errors(r.stderr) == [f"error: the config of cluster '{cli.cluster}' is not at revision {seen}: "
                                f"it is revision {theirs}; nothing written (see 'hapax config diff', then push again)"]
    assert cli("rollback", str(seen), "--expect-revision", str(seen)).returncode == 1
    assert cli.stored() == (GOOD_B, theirs)
    r = cli("push", cli.file(GOOD_C), "--expect-revision", str(theirs), "--json")
    assert r.returncode == 0 and orjson.loads(r.stdout)["previous"] == theirs
    # 0: only if nothing was pushed yet.
    assert cli("push", cli.file(GOOD_A), "--expect-revision", "0").returncode == 1


async def test_a_write_that_raced_another_is_refused_not_written_over(
        etcd_server: EtcdServer, cluster_name: str) -> None:
    """The compare-and-swap under every push: a writer whose read is stale writes nothing.

    A race between two ``hapax`` processes is not reproducible on demand, so this
    drives the transaction itself with the revision a slower writer would have read.
    """
    client = connect(EtcdConfig(endpoints=(etcd_server.url,)))
    try:
        first = await push_config(client, cluster_name, GOOD_A, timeout=2)
        second = await push_config(client, cluster_name, GOOD_B, timeout=2)
        assert (first.previous, second.previous) == (0, first.revision)
        with pytest.raises(RevisionConflict, match=f"another push made it revision {second.revision};"):
            await _swap(client, cluster_name, GOOD_C, base=first.revision, timeout=2)
        with pytest.raises(RevisionConflict):  # "nothing pushed yet" is a base too
            await _swap(client, cluster_name, GOOD_C, base=0, timeout=2)
        got = await client.get(config_key(cluster_name))
        assert (got.value, got.mod_revision) == (GOOD_B, second.revision)
    finally:
        await client.close()


def test_two_clusters_on_one_etcd_do_not_see_each_other(etcd_server: EtcdServer, cluster_name: str,
                                                        tmp_path: Path) -> None:
    one = Cli(etcd_server, cluster_name + "-one", tmp_path)
    rev = one.push(GOOD_A)
    # The other by flags rather than the environment: both routes name a cluster.
    other = ["--etcd", etcd_server.url, "--cluster", cluster_name + "-two"]
    r = hapax("config", "get", *other)
    assert r.returncode == 1
    assert errors(r.stderr) == [f"error: no config pushed to cluster '{cluster_name}-two' yet "
                                f"(the etcd key /hapax/{cluster_name}-two/config is empty)"]
    assert orjson.loads(hapax("config", "history", "--json", *other).stdout)["revisions"] == []
    assert hapax("config", "push", one.file(GOOD_B, "b.yaml"), *other).returncode == 0
    assert hapax("config", "get", *other).stdout.encode() == GOOD_B
    assert one("get").stdout.encode() == GOOD_A
    assert [e["revision"] for e in one.history()["revisions"]] == [rev]


@pytest.fixture(params=["refused", "silent"])
def dead_etcd(request: pytest.FixtureRequest) -> Iterator[str]:
    """An endpoint nothing answers on: a closed port, or one that accepts and never speaks."""
    if request.param == "refused":
        yield f"http://127.0.0.1:{free_port()}"
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_etcd_down_is_one_clear_line_and_a_non_zero_exit(dead_etcd: str, tmp_path: Path) -> None:
    boot = tmp_path / "boot.yaml"
    boot.write_text("cluster:\n  etcd:\n    timeout: 0.5\n")
    good = tmp_path / "good.yaml"
    good.write_bytes(GOOD_A)
    for cmd in (["push", str(good)], ["get"], ["diff", str(good)], ["history"], ["rollback", "3"]):
        # The subprocess bound is generous (a loaded machine); a hang would still fail it.
        r = hapax("config", *cmd, "-c", str(boot), "--etcd", dead_etcd, "--cluster", "down", timeout=20)
        assert r.returncode == (2 if cmd[0] == "diff" else 1), (cmd, r.stderr)
        [line] = errors(r.stderr)
        assert line.startswith(f"error: etcd at {dead_etcd}: ") and "0.5 s" in line, line
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_without_etcd_the_commands_say_how_to_name_one(tmp_path: Path) -> None:
    r = hapax("config", "history")
    assert r.returncode == 1
    assert errors(r.stderr) == ["error: no etcd: pass --etcd URL (or HAPAX_ETCD_ENDPOINTS, or --config with "
                                "cluster.etcd.endpoints)"]
