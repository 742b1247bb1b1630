"""The config watcher under hostile files: it rejects them, keeps serving, and never dies.

Each test runs a real ``hapax serve`` with a fast poll, keeps requests going on
the old config from a thread while bad files land, then writes a good file and
sees it applied (so the watcher is still alive).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.gateway_process import GatewayProcess


def _config(model: str, port: int | None = None) -> dict[str, Any]:
    server: dict[str, Any] = {"reload_interval": 0.1, "host": "127.0.0.1"}
    if port is not None:
        server["port"] = port
    return {
        "server": server,
        "providers": {"m": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": model, "provider": "m"}],
    }


def _wait(pred: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"not seen in time: {what}")


def _failures(gw: GatewayProcess) -> int:
    m = re.search(r'hapax_config_reloads_total\{result="failure"\} (\d+)', httpx.get(gw.url + "/metrics").text)
    return int(m.group(1)) if m else 0


def _models(gw: GatewayProcess) -> list[str]:
    return [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]]


@contextmanager
def _load(gw: GatewayProcess, model: str, clients: int = 4) -> Iterator[dict[str, Any]]:
    """Calls to ``model`` in a loop from ``clients`` threads at once; yields what they got."""
    seen: dict[str, Any] = {"ok": 0, "bad": []}
    stop = threading.Event()
    lock = threading.Lock()

    def run() -> None:
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            while not stop.is_set():
                r = c.post("/v1/chat/completions",
                           json={"model": model, "messages": [{"role": "user", "content": "x"}]})
                with lock:
                    if r.status_code == 200:
                        seen["ok"] += 1
                    else:
                        seen["bad"].append((r.status_code, r.text[:200]))

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join(15)


def _in_place(path: Path, data: bytes) -> None:
    """Write like an editor that truncates and rewrites the same inode."""
    with path.open("wb") as f:
        f.write(data)


BAD_FILES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("only comments", b"# nothing here yet\n\n"),
    ("not UTF-8", b"models:\n  - name: \xff\xfe\x80\n"),
    ("nested 5,000 deep", b"models: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("truncated mid-write", b"providers:\n  m: {type: mock}\nmodels:\n  - {name: half, provid"),
]


def test_bad_files_under_load_keep_the_last_good_config_and_the_watcher_alive(
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(_config("old"))
    with _load(gw, "old") as seen:
        _wait(lambda: seen["ok"] > 0, "first answer")
        for i, (what, data) in enumerate(BAD_FILES, start=1):
            _in_place(gw.config_path, data)
            _wait(lambda i=i: _failures(gw) >= i, f"{what} rejected")  # type: ignore[misc]
            assert _models(gw) == ["old"], what
            before = seen["ok"]
            _wait(lambda before=before: seen["ok"] > before, f"calls still answered after {what}")  # type: ignore[misc]
        assert seen["bad"] == []
    assert _failures(gw) == len(BAD_FILES)
    logs = gw.logs()
    for needle in ("the file is empty", "only comments", "not UTF-8", "nested too deep",
                   "line 4, column 24: a '{' is never closed"):
        assert needle in logs, needle
    assert "Traceback" not in logs
    # The watcher survived all of it: a good file is applied.
    gw.write_config(_config("new"))
    _wait(lambda: _models(gw) == ["new"], "good config applied")


def test_sighup_after_bad_files_still_reloads(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway({**_config("old"), "server": {"reload_interval": 3600}})
    import signal

    _in_place(gw.config_path, b"\xff\xff\xff")
    gw.signal(signal.SIGHUP)
    _wait(lambda: _failures(gw) == 1, "non-UTF-8 rejected on SIGHUP")
    gw.write_config({**_config("new"), "server": {"reload_interval": 3600}})
    gw.signal(signal.SIGHUP)
    _wait(lambda: _models(gw) == ["new"], "good config applied on SIGHUP")


def test_configmap_symlink_swap_is_seen(gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as ``hapax.yaml -> ..data/hapax.yaml`` and
    ``..data -> ..<timestamp>``; an update swaps ``..data`` in one rename."""
    mount = tmp_path / "mount"
    mount.mkdir()
    gw = GatewayProcess(_config("first"), tmp_path)
    port = gw.port

    def publish(version: str, model: str) -> None:
        d = mount / f"..{version}"
        d.mkdir()
        # Same size and mtime in both versions: only the symlink target tells them apart.
        (d / "hapax.yaml").write_text(yaml.safe_dump(_config(model, port)))
        os.utime(d / "hapax.yaml", ns=(1_000_000_000, 1_000_000_000))
        tmp = mount / "..data_tmp"
        tmp.symlink_to(d.name)
        tmp.replace(mount / "..data")

    publish("v1", "aaaaa")
    link = mount / "hapax.yaml"
    link.symlink_to("..data/hapax.yaml")
    gw.config_path = link
    gw.start()
    try:
        assert _models(gw) == ["aaaaa"]
        assert httpx.get(gw.url + "/health/ready").json()["config"]["revision"] == 1
        publish("v2", "bbbbb")
        _wait(lambda: _models(gw) == ["bbbbb"], "swapped ConfigMap applied")
        assert httpx.get(gw.url + "/health/ready").json()["config"]["revision"] == 2
    finally:
        gw.stop()
