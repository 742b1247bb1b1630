"""One aetcd client per node, built from ``cluster.etcd``: several endpoints, TLS, user and password.

aetcd opens a plaintext channel to one host. ``EtcdClient`` keeps aetcd's API
(every call takes the config's timeout) and opens the channel itself:

- several endpoints become one gRPC target, so the channel fails over between
  them (gRPC's pick_first tries them in order): IP literals as an ``ipv4:``/``ipv6:``
  address list; host names are resolved when the channel opens (a single name is
  left to gRPC's DNS resolver, which follows its changes);
- ``https://`` endpoints, or any of ``ca_file``/``cert_file``/``key_file``, make it a
  TLS channel (the client certificate and key, when given, authenticate the node);
  with IP endpoints or several names the server certificate is checked against the
  first endpoint's host name;
- ``username``/``password``: etcd's token authentication, as aetcd does it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import rpc

from hapax.config import EtcdConfig

#: gRPC channel options. grpc's own reconnect backoff grows to 120 s, which would keep a
#: node off etcd long after etcd is back: cap it near the watch's. Keep-alive pings find a
#: dead peer on an idle stream (etcd refuses pings closer than 5 s: --grpc-keepalive-min-time).
CHANNEL_OPTIONS: Final[dict[str, Any]] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
}

DEFAULT_PORT: Final = 2379


def _hosts(cfg: EtcdConfig) -> list[tuple[str, int]]:
    out = []
    for e in cfg.endpoints:
        url = urlsplit(e)
        out.append((url.hostname or "127.0.0.1", url.port or DEFAULT_PORT))
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def uses_tls(cfg: EtcdConfig) -> bool:
    return any(e.startswith("https://") for e in cfg.endpoints) or any(
        f is not None for f in (cfg.ca_file, cfg.cert_file, cfg.key_file))


async def channel_target(cfg: EtcdConfig) -> str:
    """The gRPC target for the endpoints (see the module docstring)."""
    hosts = _hosts(cfg)
    if len(hosts) == 1:
        return _address(*hosts[0])
    loop = asyncio.get_running_loop()
    addrs: list[str] = []
    for host, port in hosts:
        if _is_ip(host):
            addrs.append(_address(host, port))
            continue
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), cfg.timeout)
        addrs.extend(_address(str(info[4][0]), port) for info in infos)
    # One target holds one family; a mixed list keeps the first endpoint's family.
    v6 = addrs[0].startswith("[")
    same = list(dict.fromkeys(a for a in addrs if a.startswith("[") == v6))
    return ("ipv6:" if v6 else "ipv4:") + ",".join(same)


def _read(path: str | None) -> bytes | None:
    return Path(path).expanduser().read_bytes() if path is not None else None


class EtcdClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """aetcd's client on a channel of our own: endpoints, TLS and auth from ``EtcdConfig``."""

    _is_connecting: bool
    _connected: asyncio.Event

    def __init__(self, cfg: EtcdConfig) -> None:
        if not cfg.endpoints:
            raise ValueError("cluster.etcd.endpoints is empty")
        host, port = _hosts(cfg)[0]
        super().__init__(
            host=host, port=port, username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password else None,
            timeout=cfg.timeout,  # aetcd annotates int, but grpc takes float seconds
            options=dict(CHANNEL_OPTIONS),
        )
        self.cfg = cfg

    async def connect(self) -> None:
        """aetcd's ``connect`` (stubs, watcher, token), on our channel."""
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            cfg = self.cfg
            target = await channel_target(cfg)
            options = dict(self._options)
            if uses_tls(cfg):
                ca, cert, key = await asyncio.to_thread(
                    lambda: (_read(cfg.ca_file), _read(cfg.cert_file), _read(cfg.key_file)))
                creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                     certificate_chain=cert)
                if len(cfg.endpoints) > 1:  # an address list: check against the first endpoint's name
                    options.setdefault("grpc.ssl_target_name_override", self._host)
                self.channel = rpc.secure_channel(target, creds, options=list(options.items()))
            else:
                self.channel = rpc.insecure_channel(target, options=list(options.items()))
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                try:
                    resp = await self.auth_stub.Authenticate(
                        rpc.AuthenticateRequest(name=self._username, password=self._password),
                        timeout=self._timeout)
                except rpc.AioRpcError as exc:
                    await self.channel.close()
                    self.channel = None
                    aetcd.exceptions._handle_exception(exc)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def connect(cfg: EtcdConfig) -> aetcd.Client:
    """A client for ``cfg``; the channel opens on first use (or an awaited ``connect()``).

    Every call takes the config's timeout, so no etcd call can hang a node.
    """
    return EtcdClient(cfg)
