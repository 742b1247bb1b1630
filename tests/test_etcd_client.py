"""coordinator.connect against real etcd servers: several endpoints, TLS with client certificates,
user and password, and a Coordinator on such a client.

The certificates are made per run (``tests.certs``: a throwaway CA, a server certificate for
127.0.0.1 and ``localhost``, a client certificate); the TLS etcd requires the
client certificate (``--client-cert-auth``), so a connection without one fails.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest
from aetcd import rpc

from coordinator import Coordinator, connect
from hapax.config import EtcdConfig
from tests.certs import make_certs
from tests.etcd_server import EtcdServer
from tests.redis_server import free_port


class TlsEtcd(EtcdServer):
    """A real etcd that speaks only TLS and requires a client certificate signed by the test CA."""

    def __init__(self, certs: Path) -> None:
        super().__init__()
        self.certs = certs

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self) -> TlsEtcd:
        exe = shutil.which("etcd")
        if exe is None:
            raise RuntimeError("etcd is not installed")
        c = self.certs
        client, peer = f"https://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [exe, "--name", "hapax-tls", "--data-dir", self.data_dir,
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"hapax-tls={peer}", "--log-level", "error",
             "--cert-file", str(c / "server.pem"), "--key-file", str(c / "server-key.pem"),
             "--client-cert-auth", "--trusted-ca-file", str(c / "ca.pem")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        ctx = ssl.create_default_context(cafile=str(c / "ca.pem"))
        ctx.load_cert_chain(str(c / "client.pem"), str(c / "client-key.pem"))
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"https://localhost:{self.port}/health", timeout=0.5,
                                            context=ctx) as r:
                    if b'"health":"true"' in r.read():
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the TLS etcd did not start on port {self.port}")
            time.sleep(0.05)  # bounded poll for the listener


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("etcd-certs")
    make_certs(d)
    return d


@pytest.fixture(scope="module")
def tls_etcd(certs: Path) -> Iterator[TlsEtcd]:
    server = TlsEtcd(certs).start()
    try:
        yield server
    finally:
        server.remove()


async def _round_trip(cfg: EtcdConfig, key: bytes) -> bytes | None:
    client = connect(cfg)
    try:
        await client.put(key, b"v")
        got = await client.get(key)
        return got.value if got is not None else None
    finally:
        await client.close()


async def test_several_endpoints_fail_over_past_a_dead_one(etcd_server: EtcdServer, cluster_name: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = EtcdConfig(endpoints=(dead, etcd_server.url), timeout=3.0)
    assert await _round_trip(cfg, f"/hapax/{cluster_name}/x".encode()) == b"v"


async def test_tls_with_a_client_certificate(tls_etcd: TlsEtcd, certs: Path, cluster_name: str) -> None:
    key = f"/hapax/{cluster_name}/tls".encode()
    cfg = EtcdConfig(endpoints=(tls_etcd.url,), ca_file=str(certs / "ca.pem"), cert_file=str(certs / "client.pem"),
                     key_file=str(certs / "client-key.pem"), timeout=3.0)
    assert await _round_trip(cfg, key) == b"v"
    # An IP endpoint is checked against the first endpoint's name too: the certificate names 127.0.0.1.
    by_ip = cfg.model_copy(update={"endpoints": (f"https://127.0.0.1:{tls_etcd.port}",)})
    assert await _round_trip(by_ip, key) == b"v"
    # Without the client certificate etcd refuses the connection.
    anonymous = cfg.model_copy(update={"cert_file": None, "key_file": None, "timeout": 1.0})
    with pytest.raises(aetcd.exceptions.ConnectionFailedError):
        await _round_trip(anonymous, key)


@pytest.fixture
async def auth_etcd() -> AsyncIterator[EtcdServer]:
    server = EtcdServer().start()
    try:
        async with aetcd.Client(port=server.port, timeout=5) as c:
            await c.connect()
            stub = rpc.AuthStub(c.channel)
            await stub.UserAdd(rpc.AuthUserAddRequest(name="root", password="s3cret"))
            await stub.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
            await stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
            await stub.AuthEnable(rpc.AuthEnableRequest())
        yield server
    finally:
        server.remove()


async def test_user_and_password_and_a_coordinator_on_them(auth_etcd: EtcdServer, cluster_name: str) -> None:
    cfg = EtcdConfig.model_validate({"endpoints": [auth_etcd.url], "username": "root", "password": "s3cret",
                                     "timeout": 3.0})
    assert await _round_trip(cfg, f"/hapax/{cluster_name}/auth".encode()) == b"v"
    wrong = EtcdConfig.model_validate({"endpoints": [auth_etcd.url], "username": "root", "password": "nope",
                                       "timeout": 3.0})
    with pytest.raises(aetcd.exceptions.ClientError):
        await _round_trip(wrong, b"/x")
    anonymous = EtcdConfig(endpoints=(auth_etcd.url,), timeout=3.0)
    with pytest.raises(aetcd.exceptions.ClientError):
        await _round_trip(anonymous, b"/x")
    # The node's whole part (lease, record, election, watches) works on the authenticated client.
    c = Coordinator(cfg, cluster=cluster_name, node_id="n1", address="127.0.0.1:1", version="t", lease_ttl=2)
    try:
        await c.start()
        deadline = time.monotonic() + 10
        while not (c.is_leader and "n1" in c.nodes):
            assert time.monotonic() < deadline, "the coordinator did not lead on an authenticated client"
            await asyncio.sleep(0.02)
    finally:
        await c.aclose()
