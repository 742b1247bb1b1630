"""Worker processes: N copies of the node on one port, and the supervisor that keeps them.

Theory of operation:

- ``hapax serve --workers N`` (or ``server.workers``) with N > 1 makes the process a
  supervisor. It serves nothing itself: it starts N workers, each ``hapax serve`` with
  the same arguments and ``HAPAX_WORKER`` (its index), ``HAPAX_WORKERS`` (N) and
  ``HAPAX_RUNTIME_DIR`` (a private directory for this node's run) in its environment.
- Each worker binds its own listening socket with ``SO_REUSEPORT`` (and the configured
  backlog), so the kernel spreads new connections over the live workers; one that dies
  takes only its own connections with it, and the others keep answering.
- A worker that exits while the node is not stopping is started again after a backoff:
  ``RESTART_DELAY`` at first, doubled for each death that follows a short life (under
  ``HEALTHY_UPTIME``) up to ``MAX_RESTART_DELAY``, so a worker that cannot start (a port
  taken, a broken config) is retried a few times a minute, never in a spin.
- SIGTERM or SIGINT: the supervisor stops restarting and sends SIGTERM to every worker;
  each drains on its own (``server.shutdown_grace``); the supervisor exits 0 once all have
  (and kills any still running ``STOP_MARGIN`` seconds after their grace). SIGHUP is
  passed on: every worker reloads its config now. Each worker also polls the config
  file itself, as a single node does.
- Every worker holds the read end of a pipe whose write end only the supervisor has:
  when the supervisor dies, even by SIGKILL, the pipe reads EOF and the worker drains
  and exits, so no orphan keeps serving the port.
- Limits, budgets and slots live in each process unless Redis holds them, so more than
  one worker without ``state.redis.url`` is refused (``check_shared_state``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hapax import Config, ConfigError

from . import quic_steering

log = logging.getLogger("hapax.node")

#: Environment of a worker: its index (0-based), the node's worker count, the node's run dir.
ENV_WORKER: Final = "HAPAX_WORKER"
ENV_WORKERS: Final = "HAPAX_WORKERS"
ENV_RUNTIME_DIR: Final = "HAPAX_RUNTIME_DIR"
#: The fd of the pipe that reads EOF when the supervisor is gone.
ENV_SUPERVISOR_FD: Final = "HAPAX_SUPERVISOR_FD"
#: Benchmarks only: allow workers without Redis (each then enforces its own limits).
ENV_ALLOW_UNSHARED: Final = "HAPAX_BENCH_UNSHARED_WORKERS"

#: Seconds before the first restart of a worker that died.
RESTART_DELAY: Final = 0.25
#: The most a crash-looping worker waits between attempts, seconds.
MAX_RESTART_DELAY: Final = 30.0
#: A worker that lived this long was healthy: its next death restarts after RESTART_DELAY again.
HEALTHY_UPTIME: Final = 10.0
#: Seconds past ``shutdown_grace`` (plus the cut streams' wait) before a draining worker is killed.
STOP_MARGIN: Final = 10.0


class WorkersRefused(ConfigError):
    """``--workers`` that cannot be run: below 1, or above 1 without shared state."""


@dataclass(frozen=True)
class WorkerIdentity:
    """Which worker this process is; ``index`` 0 of 1 for a node without workers."""

    index: int = 0
    count: int = 1
    runtime_dir: Path | None = None
    supervisor_fd: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerIdentity | None:
        """The identity a supervisor gave this process, or ``None`` when it has none."""
        index = env.get(ENV_WORKER)
        if index is None:
            return None
        run_dir = env.get(ENV_RUNTIME_DIR)
        fd = env.get(ENV_SUPERVISOR_FD)
        return cls(
            index=int(index),
            count=int(env.get(ENV_WORKERS, "1")),
            runtime_dir=Path(run_dir) if run_dir else None,
            supervisor_fd=int(fd) if fd else None,
        )


def resolve_workers(value: int | str) -> int:
    """``auto`` is one worker per core this process may run on (its CPU affinity)."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1
    n = int(value)
    if n < 1:
        raise WorkersRefused(f"--workers must be at least 1 or 'auto', not {value}")
    return n


def parse_workers(text: str) -> int | str:
    """argparse type of ``--workers``: a positive count or ``auto``."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise ValueError(text) from None
    if n < 1:
        raise ValueError(text)
    return n


def check_shared_state(cfg: Config, count: int, env: Mapping[str, str]) -> None:
    """Refuse N > 1 workers that would each enforce the whole of every limit."""
    if count <= 1 or cfg.state.redis.url is not None or env.get(ENV_ALLOW_UNSHARED) == "1":
        return
    raise WorkersRefused(
        f"--workers {count} needs shared state: without Redis (--redis URL, HAPAX_REDIS_URL or "
        f"state.redis.url) each worker keeps its own rate limits, budgets and concurrency slots, "
        f"so {count} workers would admit {count} times every limit"
    )


class Supervisor:
    """Starts ``count`` workers, restarts those that die, and stops them all on a signal."""

    def __init__(
        self, argv: Sequence[str], count: int, *, stop_timeout: float, udp: tuple[str, int] | None = None
    ) -> None:
        #: The worker's command: this same ``hapax`` invocation, run as a worker by its env.
        self.cmd = [sys.executable, "-m", "node", *argv]
        self.count = count
        self.stop_timeout = stop_timeout
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._stop = asyncio.Event()
        self._run_dir: Path | None = None
        self._pipe_r = -1
        #: The HTTP/3 door's (host, port), when it is on: one socket per worker (node.quic_steering).
        self._udp_addr = udp
        self._udp: list[socket.socket] = []

    def run(self) -> int:
        return asyncio.run(self._run())

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        self._run_dir = Path(tempfile.mkdtemp(prefix="hapax-node-"))  # 0700, this node's only
        self._pipe_r, pipe_w = os.pipe()
        if self._udp_addr is not None and self.count <= quic_steering.MAX_WORKERS:
            self._udp = quic_steering.bind_group(*self._udp_addr, self.count)
        log.info("supervisor started", extra={"fields": {"workers": self.count, "pid": os.getpid()}})
        try:
            keepers = [asyncio.create_task(self._keep(i)) for i in range(self.count)]
            await self._stop.wait()
            log.info("stopping workers", extra={"fields": {"workers": len(self.procs)}})
            self._forward(signal.SIGTERM)
            done, pending = await asyncio.wait(keepers, timeout=self.stop_timeout)
            if pending:
                log.error("workers did not stop in time; killing them",
                          extra={"fields": {"workers": sorted(self.procs)}})
                self._forward(signal.SIGKILL)
                await asyncio.wait(pending)
            for task in done:
                task.result()
        finally:
            os.close(pipe_w)
            os.close(self._pipe_r)
            for sock in self._udp:
                sock.close()
            shutil.rmtree(self._run_dir, ignore_errors=True)
        log.info("supervisor stopped")
        return 0

    def _forward(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _keep(self, index: int) -> None:
        """Run worker ``index`` until the node stops, restarting it each time it dies."""
        delay = RESTART_DELAY
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                proc = await self._spawn(index)
            except OSError as exc:  # no process at all (out of memory, pids): back off likewise
                log.error("could not start a worker; retrying", extra={"fields": {
                    "worker": index, "error": str(exc), "restart_in_s": delay}})
            else:
                self.procs[index] = proc
                log.info("worker started", extra={"fields": {"worker": index, "pid": proc.pid}})
                code = await proc.wait()
                lived = time.monotonic() - started
                if self._stop.is_set():
                    log.info("worker stopped", extra={"fields": {"worker": index, "pid": proc.pid, "exit": code}})
                    return
                delay = RESTART_DELAY if lived >= HEALTHY_UPTIME else delay
                how = _how(code)
                log.error("worker died; restarting it", extra={"fields": {
                    "worker": index, "pid": proc.pid, "how": how, "uptime_s": round(lived, 3),
                    "restart_in_s": delay,
                }})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        assert self._run_dir is not None
        env = {
            **os.environ,
            ENV_WORKER: str(index),
            ENV_WORKERS: str(self.count),
            ENV_RUNTIME_DIR: str(self._run_dir),
            ENV_SUPERVISOR_FD: str(self._pipe_r),
        }
        fds = [self._pipe_r]
        if self._udp:
            fds.append(self._udp[index].fileno())
            env[quic_steering.ENV_UDP_FD] = str(fds[-1])
        return await asyncio.create_subprocess_exec(*self.cmd, env=env, pass_fds=fds)


def _how(code: int) -> str:
    """How a process ended, from its return code (negative: the signal that killed it)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def stop_timeout(cfg: Config) -> float:
    """How long the supervisor waits for draining workers before it kills them."""
    from .server import CUT_WAIT

    return cfg.server.drain_delay + cfg.server.shutdown_grace + CUT_WAIT + STOP_MARGIN
