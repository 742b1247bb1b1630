"""Start a real ``hapax serve`` process for a test, and stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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
    ) -> None:
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

    def start(self) -> GatewayProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(self.config_path)],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health/live", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not come up:\n{self.logs()}")

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
