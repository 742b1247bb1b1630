"""coordinator.PrefixWatch against a real etcd: the view, exact prefixes, outages, compaction.

The outage tests need to know the watch was down while keys changed (otherwise a
watch that restarted "from now" would pass too), so one of them puts a TCP proxy
between the watch and etcd and cuts it; the other stops etcd itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping

import aetcd
import pytest

from coordinator import PrefixWatch, connect
from hapax.config import EtcdConfig
from tests.etcd_server import EtcdServer
from tests.redis_server import free_port


async def until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def put_once_up(client: aetcd.Client, key: bytes, value: bytes, timeout: float = 10.0) -> aetcd.Put:
    """A put from the test's own client right after etcd came back. gRPC shares one subchannel
    per target between channels, so even a new client may find it still backing off from the
    outage and fail at once; the test's writer waits that out (bounded), the node's own watch
    does likewise through its reconnect loop."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.put(key, value)
        except aetcd.exceptions.ConnectionFailedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class Proxy:
    """A TCP proxy to etcd that can be cut (every connection reset, new ones refused)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.transport.abort()
            return
        self._conns |= {w, uw}

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            b.transport.abort()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))


class Seen:
    """What on_change was called with: every revision, and the last view."""

    def __init__(self) -> None:
        self.revisions: list[int] = []
        self.view: dict[bytes, bytes] = {}

    def __call__(self, view: Mapping[bytes, bytes], revision: int) -> None:
        self.revisions.append(revision)
        self.view = dict(view)


def _client(port: int) -> aetcd.Client:
    return connect(EtcdConfig(endpoints=(f"http://127.0.0.1:{port}",), timeout=2.0))


async def _range(client: aetcd.Client, prefix: bytes) -> tuple[dict[bytes, bytes], int]:
    resp = await client.get_prefix(prefix)
    return {kv.key: kv.value for kv in resp.kvs}, max((kv.mod_revision for kv in resp.kvs), default=0)


async def test_view_follows_puts_and_deletes_under_an_exact_prefix(
    etcd_server: EtcdServer, direct: aetcd.Client, cluster_name: str
) -> None:
    prefix = f"/hapax/{cluster_name}/keys/".encode()
    await direct.put(prefix + b"a", b"1")
    await direct.put(prefix + b"b", b"2")
    # Neighbours a looser prefix would match: /keys0..., /keysX/, and the bare prefix minus its slash.
    await direct.put(f"/hapax/{cluster_name}/keys0".encode(), b"x")
    await direct.put(f"/hapax/{cluster_name}/keysX/a".encode(), b"x")
    seen = Seen()
    client = _client(etcd_server.port)
    watch = PrefixWatch(client, prefix, on_change=seen, timeout=2.0)
    try:
        await watch.start()
        assert dict(watch.view) == {prefix + b"a": b"1", prefix + b"b": b"2"}
        assert seen.view == dict(watch.view)  # called once after the first read
        await until(lambda: watch.connected, "the watch stream")
        await direct.put(prefix + b"c", b"3")
        await direct.delete(prefix + b"a")
        await direct.put(prefix + b"b", b"22")
        await direct.put(f"/hapax/{cluster_name}/keysY".encode(), b"x")
        expected, last = await _range(direct, prefix)
        await until(lambda: watch.revision >= last, "the watch to catch up")
        assert dict(watch.view) == expected == {prefix + b"b": b"22", prefix + b"c": b"3"}
        assert seen.view == expected
        assert seen.revisions == sorted(set(seen.revisions)), "revisions only move forward"
    finally:
        await watch.close()
        await client.close()


async def test_a_cut_watch_resumes_from_its_revision_and_misses_nothing(
    etcd_server: EtcdServer, direct: aetcd.Client, cluster_name: str
) -> None:
    prefix = f"/hapax/{cluster_name}/nodes/".encode()
    proxy = Proxy(etcd_server.port)
    await proxy.open()
    for i in range(5):
        await direct.put(prefix + f"n{i}".encode(), b"v0")
    seen = Seen()
    client = _client(proxy.port)
    watch = PrefixWatch(client, prefix, on_change=seen, timeout=2.0)
    try:
        await watch.start()
        await until(lambda: watch.connected, "the watch stream")
        await proxy.cut()
        await until(lambda: not watch.connected, "the watch to notice the cut")
        # While it is down: updates, deletes, creations, and a key that comes and goes.
        for i in range(5):
            await direct.put(prefix + f"n{i}".encode(), b"v1")
        await direct.delete(prefix + b"n0")
        await direct.put(prefix + b"gone", b"x")
        await direct.delete(prefix + b"gone")
        await direct.put(prefix + b"new", b"y")
        expected, last = await _range(direct, prefix)
        assert not watch.connected and watch.revision < last
        await proxy.open()
        await until(lambda: watch.revision >= last, "the watch to resume", timeout=15)
        assert dict(watch.view) == expected
        assert watch.rereads == 0, "resumed from its revision, not re-read"
        assert seen.view == expected
    finally:
        await watch.close()
        await client.close()
        await proxy.cut()


async def test_compaction_while_cut_means_a_full_re_read(
    etcd_server: EtcdServer, direct: aetcd.Client, cluster_name: str
) -> None:
    prefix = f"/hapax/{cluster_name}/keys/".encode()
    proxy = Proxy(etcd_server.port)
    await proxy.open()
    await direct.put(prefix + b"old", b"1")
    seen = Seen()
    client = _client(proxy.port)
    watch = PrefixWatch(client, prefix, on_change=seen, timeout=2.0)
    try:
        await watch.start()
        await until(lambda: watch.connected, "the watch stream")
        await proxy.cut()
        await until(lambda: not watch.connected, "the watch to notice the cut")
        await direct.delete(prefix + b"old")
        await direct.put(prefix + b"k1", b"a")
        put = await direct.put(prefix + b"k2", b"b")
        # Compact past the watch's revision: the events it would resume from are gone.
        await direct.compact(put.header.revision)
        expected, last = await _range(direct, prefix)
        await proxy.open()
        await until(lambda: watch.rereads == 1 and watch.revision >= last, "the re-read", timeout=15)
        assert dict(watch.view) == expected == {prefix + b"k1": b"a", prefix + b"k2": b"b"}
        assert seen.view == expected
        await until(lambda: watch.connected, "the watch to go on after the re-read")
        await direct.put(prefix + b"k3", b"c")
        await until(lambda: prefix + b"k3" in watch.view, "an event after the re-read")
    finally:
        await watch.close()
        await client.close()
        await proxy.cut()


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd this test may stop: the session's serves every other test."""
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.remove()


async def _off_loop(fn: Callable[[], None]) -> None:
    await asyncio.to_thread(fn)


async def test_etcd_stopped_and_started_mid_watch(own_etcd: EtcdServer) -> None:
    prefix = b"/hapax/restart/config/"
    writer = aetcd.Client(port=own_etcd.port, timeout=5)
    for i in range(3):
        await writer.put(prefix + f"k{i}".encode(), b"before")
    seen = Seen()
    client = _client(own_etcd.port)
    watch = PrefixWatch(client, prefix, on_change=seen, timeout=2.0)
    try:
        await watch.start()
        await until(lambda: watch.connected, "the watch stream")
        before = watch.revision
        await _off_loop(own_etcd.stop)
        await until(lambda: not watch.connected, "the watch to notice etcd is gone")
        await _off_loop(own_etcd.start)
        # Writes right after etcd is back, racing the watch's reconnect.
        await writer.close()
        writer = aetcd.Client(port=own_etcd.port, timeout=5)
        await put_once_up(writer, prefix + b"k0", b"after")
        await writer.delete(prefix + b"k1")
        await writer.put(prefix + b"k9", b"new")
        expected, last = await _range(writer, prefix)
        await until(lambda: watch.revision >= last and watch.connected, "the watch to resume", timeout=15)
        assert dict(watch.view) == expected == {prefix + b"k0": b"after", prefix + b"k2": b"before",
                                                prefix + b"k9": b"new"}
        assert watch.rereads == 0
        assert watch.revision > before
        assert seen.revisions == sorted(set(seen.revisions))
    finally:
        await watch.close()
        await client.close()
        await writer.close()



