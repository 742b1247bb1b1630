"""Config snapshots with revisions, through a running ``hapax serve``.

A request runs on the snapshot it started with until it settles (a stream
that outlives a price change is charged the old price), and the revision the
node reports (readiness, ``hapax_config_revision``, ``x-hapax-config-revision``)
counts applied changes: not a rejected file, not a touch, not a rewrite that
parses to the same config.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.gateway_process import GatewayProcess
from tests.upstreams import openai_api
from tests.upstreams.server import UpstreamServer, UpstreamState

ADMIN_KEY = "hpx_admin_" + "R" * 40
ENV = {"HAPAX_ADMIN_KEY": ADMIN_KEY}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
OLD = {"input": 1000.0, "output": 2000.0}  # USD per million tokens: $0.001 and $0.002 per token
NEW = {"input": 3000.0, "output": 5000.0}


def _wait(pred: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen in time: {what}")
        time.sleep(0.05)


def _revision(gw: GatewayProcess) -> int:
    return int(httpx.get(gw.url + "/health/ready", timeout=10).json()["config"]["revision"])


def _metric(gw: GatewayProcess, sample: str) -> float:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", httpx.get(gw.url + "/metrics", timeout=10).text, re.M)
    return float(m.group(1)) if m else 0.0


def _cost(price: dict[str, float], prompt: int, completion: int) -> float:
    return (prompt * price["input"] + completion * price["output"]) / 1_000_000


@pytest.fixture
def upstream() -> Iterator[tuple[UpstreamServer, UpstreamState]]:
    state = UpstreamState()
    server = UpstreamServer(openai_api.make_app(state)).start()
    try:
        yield server, state
    finally:
        state.release.set()
        server.stop()


def _priced(url: str, price: dict[str, float]) -> dict[str, Any]:
    return {
        "server": {"reload_interval": 0.1},
        "auth": {"mode": "keys", "admin_key": "${HAPAX_ADMIN_KEY}", "state_dir": "state"},
        "providers": {"up": {"type": "openai", "base_url": url + "/v1", "api_key": "k"}},
        "models": [{"name": "m", "provider": "up"}],
        "pricing": {"m": price},
    }


def test_a_stream_keeps_the_price_it_started_with(
    gateway: Callable[..., GatewayProcess], upstream: tuple[UpstreamServer, UpstreamState]
) -> None:
    server, state = upstream
    state.reply = "one two three four"  # 10 prompt tokens, 4 completion tokens (the upstream's count)
    cfg = _priced(server.url, OLD)
    gw = gateway(cfg, env=ENV)

    def key(name: str) -> tuple[str, str]:
        r = httpx.post(gw.url + "/admin/keys", headers=ADMIN, json={"name": name}, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()["key"], r.json()["id"]

    (streamer, streamer_id), (later, later_id) = key("streamer"), key("later")
    state.faults.append({"pause_after": 2})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=streamer, timeout=30, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-hapax-config-revision"] == "1"
    chunks = iter(raw.parse())
    first = next(chunks)  # the stream is open, and the upstream holds it mid-way
    assert first.choices[0].delta.role == "assistant"

    gw.write_config(_priced(server.url, NEW))
    _wait(lambda: _revision(gw) == 2, "the new prices applied")
    after = openai.OpenAI(base_url=gw.url + "/v1", api_key=later, timeout=30, max_retries=0)
    r = after.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert r.headers["x-hapax-config-revision"] == "2"
    assert float(r.headers["x-hapax-cost-usd"]) == pytest.approx(_cost(NEW, 10, 4))

    state.release.set()
    rest = list(chunks)
    usage = next(c.usage for c in rest if c.usage is not None)
    assert (usage.prompt_tokens, usage.completion_tokens) == (10, 4)

    def row(key_id: str) -> dict[str, Any] | None:
        rows = httpx.get(gw.url + "/admin/usage", headers=ADMIN, params={"key": key_id}, timeout=10).json()["data"]
        return rows[0] if rows and rows[0]["requests"] == 1 else None

    _wait(lambda: row(streamer_id) is not None, "the stream settled")
    assert row(streamer_id)["cost_usd"] == pytest.approx(_cost(OLD, 10, 4))  # type: ignore[index]
    assert row(later_id)["cost_usd"] == pytest.approx(_cost(NEW, 10, 4))  # type: ignore[index]


def _demo(model: str) -> dict[str, Any]:
    return {
        "server": {"reload_interval": 0.1},
        "providers": {"m": {"type": "mock", "mock": {"reply": "ok"}}},
        "models": [{"name": model, "provider": "m"}],
    }


def test_the_revision_counts_applied_changes_only(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_demo("first"))
    path = gw.config_path

    def unchanged(why: str) -> int:
        return sum(1 for line in gw.logs().splitlines()
                   if "config file unchanged" in line and f'"why":"{why}"' in line)

    assert _revision(gw) == 1
    r = httpx.get(gw.url + "/v1/models", timeout=10)
    assert r.headers["x-hapax-config-revision"] == "1"

    os.utime(path)  # a touch: new mtime, same bytes
    _wait(lambda: unchanged("same bytes") == 1, "the touch looked at")
    assert _revision(gw) == 1

    path.write_text("# reformatted by a person\n" + path.read_text())  # new bytes, same config
    _wait(lambda: unchanged("same config") == 1, "the same config seen")
    assert _revision(gw) == 1

    path.write_text("models: [{name: broken\n")
    _wait(lambda: _metric(gw, 'hapax_config_reloads_total{result="failure"}') == 1, "the bad file rejected")
    assert _revision(gw) == 1

    gw.write_config(_demo("second"))
    _wait(lambda: _revision(gw) == 2, "the change applied")
    assert [m["id"] for m in httpx.get(gw.url + "/v1/models", timeout=10).json()["data"]] == ["second"]
    gw.write_config(_demo("second"))  # a new inode with the same bytes
    _wait(lambda: unchanged("same bytes") == 2, "the rewrite looked at")
    gw.signal(signal.SIGHUP)  # look now: parsed again, the same config
    _wait(lambda: unchanged("same config") == 2, "SIGHUP looked")

    ready = httpx.get(gw.url + "/health/ready", timeout=10).json()
    assert ready["config"] == {"revision": 2, "source": f"file:{path}",
                               "digest": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert _metric(gw, "hapax_config_revision") == 2
    assert _metric(gw, 'hapax_config_reloads_total{result="success"}') == 1
    assert _metric(gw, 'hapax_config_reloads_total{result="failure"}') == 1
    assert httpx.get(gw.url + "/v1/models", timeout=10).headers["x-hapax-config-revision"] == "2"
    assert yaml.safe_load(path.read_text())["models"][0]["name"] == "second"


def test_command_line_overrides_survive_a_reload(gateway: Callable[..., GatewayProcess]) -> None:
    """``HAPAX_CLUSTER`` (like ``--cluster``, ``--redis``, ``--port``) beats the file on every reload too."""
    cfg = {**_demo("first"), "auth": {"mode": "none", "admin_key": "${HAPAX_ADMIN_KEY}"}}
    gw = gateway(cfg, env={**ENV, "HAPAX_CLUSTER": "from-env"})

    def shown() -> dict[str, Any]:
        r = httpx.get(gw.url + "/admin/config", headers=ADMIN, timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())

    assert shown()["state"]["cluster"] == "from-env"
    gw.write_config({**cfg, "models": [{"name": "second", "provider": "m"}]})
    _wait(lambda: _revision(gw) == 2, "the change applied")
    after = shown()
    assert [m["name"] for m in after["models"]] == ["second"]
    assert after["state"]["cluster"] == "from-env"


def test_revisions_keep_the_last_good_and_count_changes_only() -> None:
    """The keep-last-good rules every source shares (the etcd source brings its own numbers)."""
    from hapax import ConfigError, parse_config
    from hapax.config import ConfigRejected, ConfigSnapshot, Revisions

    a, b = (parse_config({"providers": {"m": {"type": "mock"}}, "models": [{"name": n, "provider": "m"}]})
            for n in ("a", "b"))
    rev = Revisions(ConfigSnapshot(a, 1, "file:x", "d1"))
    assert rev.unchanged("d1") and not rev.unchanged("d2")
    assert rev.offer(a.model_copy(), digest="d2") is None  # new bytes, same config
    bad = rev.offer(ConfigError("nope"), digest="d3")
    assert isinstance(bad, ConfigRejected) and rev.current.revision == 1 and rev.current.config == a
    new = rev.offer(b, digest="d4")
    assert isinstance(new, ConfigSnapshot) and (new.revision, new.digest, new.config) == (2, "d4", b)
    assert rev.current is new
    jump = rev.offer(a, digest="d5", revision=40)  # a source's own numbering: increasing, gaps allowed
    assert isinstance(jump, ConfigSnapshot) and jump.revision == 40
    stale = rev.offer(b, digest="d6", revision=39)
    assert isinstance(stale, ConfigRejected) and rev.current.revision == 40
