"""Start a real ``hapax serve`` process for a test, and stop it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.upstreams.server import free_port

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    def __init__(
        self,
        config: dict[str, Any],
        tmp: Path,
        *,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        workers: int | str | None = None,
        redis: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        #: Extra ``hapax serve`` arguments: ``--workers``, ``--redis``, then ``args``.
        self.args = [*(["--workers", str(workers)] if workers is not None else []),
                     *(["--redis", redis] if redis is not None else []), *args]
        #: Worker processes ``start`` waits for (``auto`` is resolved by the node; see ``wait_workers``).
        self.workers = workers if isinstance(workers, int) else 1
        #: Runs in the child before exec (resource limits, say).
        self.preexec_fn = preexec_fn
        self.port = free_port()
        config = dict(config)
        server = dict(config.get("server", {}))
        server.setdefault("port", self.port)
        server.setdefault("host", "127.0.0.1")
        self.port = server["port"]
        config["server"] = server
        self.config_path = tmp / "hapax.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "hapax.log"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, config: dict[str, Any]) -> None:
        config = dict(config)
        server = dict(config.get("server", {}))
        server.setdefault("port", self.port)
        server.setdefault("host", "127.0.0.1")
        config["server"] = server
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        tmp.replace(self.config_path)

    def start(self, *, wait: bool = True) -> GatewayProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(self.config_path), *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn,
        )
        if not wait:
            return self
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health/live", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"gateway did not come up:\n{self.logs()}")
        if self.workers > 1:
            self.wait_workers(self.workers)
        return self

    def worker_pids(self) -> dict[int, int]:
        """{worker index: pid} of the workers whose metrics a ``/metrics`` scrape included."""
        text = httpx.get(self.url + "/metrics", timeout=5, headers={"connection": "close"}).text
        found = re.findall(r'^hapax_worker_info\{pid="(\d+)",worker="(\d+)"\} 1', text, re.MULTILINE)
        return {int(w): int(pid) for pid, w in found}

    def wait_workers(self, n: int, *, timeout: float = 20, exclude: Sequence[int] = ()) -> dict[int, int]:
        """Wait until ``n`` workers (none of whose pids is in ``exclude``) answer a scrape."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.logs()}")
            try:
                pids = self.worker_pids()
            except httpx.HTTPError:
                pids = {}
            if len(pids) == n and not set(pids.values()) & set(exclude):
                return pids
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} workers did not come up (saw {pids}):\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:
            self._log.close()
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._log.close()
