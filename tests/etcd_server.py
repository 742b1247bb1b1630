"""A real etcd on free loopback ports, for the cluster tests.

Like tests/redis_server.py: no fake. One member with its data in a temporary
directory, started and stopped as a process. ``stop`` then ``start`` keeps the
data directory and ports, so it is what an etcd outage looks like to a node:
the same endpoint comes back with every key and revision it had.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from tests.redis_server import free_port


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return b'"health":"true"' in r.read()
    except OSError:
        return False


@dataclass
class EtcdServer:
    port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    data_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="hapax-etcd-"))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EtcdServer:
        exe = shutil.which("etcd")
        if exe is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server; .ci/run does)")
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [exe, "--name", "hapax-test", "--data-dir", self.data_dir,
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"hapax-test={peer}", "--log-level", "error",
             # Tests measure propagation in milliseconds: no batching delay on commits.
             "--heartbeat-interval", "50", "--election-timeout", "500"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not _healthy(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not start on port {self.port}")
            time.sleep(0.05)  # bounded poll for the listener
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, as when the etcd host dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
