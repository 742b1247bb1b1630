"""A real redis-server on a free loopback port, for the shared-state tests.

No fake: the Redis backends are tested against the server they run against in
production. Each server is started with persistence off (nothing written to disk)
and stopped, with its process, when the test or session ends. As managed Redis
services are reached, it can also require a password (``requirepass``), speak
only TLS on its port (``tls``: certificate and key files, clients not asked for
one), and listen on a unix socket as well.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, tls: ssl.SSLContext | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as raw:
            if tls is None:
                return _answers(raw)
            with tls.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return _answers(s)
    except OSError:
        return False


def _answers(s: socket.socket) -> bool:
    s.sendall(b"PING\r\n")
    # A server with a password answers NOAUTH: it is up all the same.
    return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))


@dataclass(frozen=True)
class TLSFiles:
    """A server's certificate and key, and the CA that signed the certificate (PEM files)."""

    cert: Path
    key: Path
    ca: Path


@dataclass
class RedisServer:
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    password: str | None = None
    #: Speak TLS only on ``port``.
    tls: TLSFiles | None = None
    #: Listen on this unix socket too.
    unix_socket: Path | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _tls_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls is not None else None

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        workdir = tempfile.mkdtemp(prefix="hapax-redis-")
        args = [exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        tls = self._tls_context()
        while not _ping(self.port, tls):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)  # bounded poll for the listener
        return self

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(16).startswith(b"+OK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port: what a Redis outage looks like to the node."""
        self.stop()
        self.start()
