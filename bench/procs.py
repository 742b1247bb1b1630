"""Starting, pinning, probing and stopping the processes of one benchmark run."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned_redis() -> RedisServer:
    """A redis-server of its own on a free loopback port, on core 1, and this process on core 0:
    on a shared core Redis's wake-ups would be billed to the client under test."""
    server = RedisServer().start()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1 and server.proc is not None:
        os.sched_setaffinity(server.proc.pid, {1})
        os.sched_setaffinity(0, {0})
    return server


def _stat(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User+system CPU of the whole process (all threads), from /proc/<pid>/stat."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (a node's workers), from every /proc/<n>/stat's ppid."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(_stat(int(name))[1]) == pid:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
    return out


def tree_cpu_seconds(pid: int) -> float:
    """``cpu_seconds`` of ``pid`` plus its live children: a supervisor and its workers."""
    total = cpu_seconds(pid)
    for child in children(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue
    return total


def preemptions(pid: int) -> int:
    """Involuntary context switches of ``pid`` and its live children (all threads), from /proc."""
    total = 0
    for p in (pid, *children(pid)):
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith("nonvoluntary_ctxt_switches:"):
                            total += int(line.split()[1])
        except OSError:
            continue  # exited meanwhile
    return total


class Proc:
    """A child process, optionally pinned with taskset (which execs, so the pid is the server's)."""

    def __init__(
        self, name: str, cmd: list[str], log_dir: Path, *, cpus: str | None, env: dict[str, str],
        preexec_fn: Callable[[], None] | None = None, cwd: Path = ROOT,
    ) -> None:
        self.name = name
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        self.cmd = cmd
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        """CPU of the process and its children (a node's workers, when it has several)."""
        return tree_cpu_seconds(self.pid)

    def preemptions(self) -> int:
        """Times the scheduler took a core from the process (and its workers) while it could run."""
        return preemptions(self.pid)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def wait_http(self, url: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self.check()
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout}s: {last}")

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {port} within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


_PROBE = r"""
import json, os, sys, sysconfig
args = sysconfig.get_config_var("CONFIG_ARGS") or ""
real = os.path.realpath(sys.executable)
base = os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3"))
kind = "pyenv" if ".pyenv" in real or ".pyenv" in sys.base_prefix else (
    "debian" if sys.base_prefix == "/usr" else "other")
mods = {}
for m in ("aiohttp", "uvloop", "orjson", "pydantic"):
    try:
        mods[m] = __import__(m).__version__
    except Exception as exc:
        mods[m] = "missing: " + type(exc).__name__
print(json.dumps({"executable": sys.executable, "realpath": real, "base_prefix": sys.base_prefix,
    "base_python": base, "version": sys.version, "kind": kind,
    "pgo": "--enable-optimizations" in args, "lto": "--with-lto" in args, "modules": mods}))
"""


def interpreter_info(python: str) -> dict[str, object]:
    out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=30, check=True)
    info: dict[str, object] = json.loads(out.stdout)
    return info


def wait_workers(port: int, n: int, timeout: float = 30.0) -> None:
    """Until a scrape of the node on ``port`` includes all ``n`` of its workers."""
    deadline = time.monotonic() + timeout
    while n > 1:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            seen = sum(1 for line in r.read().decode().splitlines() if line.startswith("hapax_worker_info{"))
        if seen >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {seen} of {n} workers came up on port {port}")
        time.sleep(0.1)


def listeners(port: int) -> int:
    """Sockets listening on TCP ``port`` of 127.0.0.1 (one per worker with ``SO_REUSEPORT``), from /proc."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f if (cols := line.split())[1] == want and cols[3] == "0A")


def wait_listeners(port: int, n: int, timeout: float = 30.0) -> None:
    """Until ``n`` sockets listen on ``port``: every worker of a ``SO_REUSEPORT`` server takes connections."""
    deadline = time.monotonic() + timeout
    while (seen := listeners(port)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {seen} of {n} workers listen on port {port}")
        time.sleep(0.05)


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy (not idle/iowait), from the ``cpu`` line of /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def steal_seconds() -> float:
    """CPU seconds the hypervisor ran something else while this VM's CPUs wanted to run
    (``steal`` on the ``cpu`` line of /proc/stat): time every process here lost at once."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return int(parts[8]) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of waited-for children (wrk), user+system."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
