"""The Dockerfile, the compose file, the chart and the default config agree (issue [7]).

Each file names the same things (the port, the config's path, the commands, the environment, the
user, the drain times, the health and metrics paths) and a change to one of them must reach the
others. These tests read every file as its tool would (the Dockerfile's instructions, compose's
YAML, the chart rendered by ``helm template``, the config parsed by Hapax itself) and compare.
The health and metrics paths are asked of a real node running the image's default config.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hapax import load_config
from hapax.config import Config
from tests.deploy_support import CHART, ROOT, helm_template
from tests.gateway_process import GatewayProcess

DOCKER = ROOT / "docker"
VALUE_FILES = [[], [CHART / "ci" / "external-values.yaml"], [CHART / "ci" / "http3-values.yaml"]]


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, one entry per occurrence (continuation lines joined)."""
    text = (DOCKER / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out: dict[str, list[str]] = {}
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.setdefault(word.upper(), []).append(rest.strip())
    return out


def exec_form(arg: str) -> list[str]:
    parsed = json.loads(arg)
    assert isinstance(parsed, list), arg
    return [str(a) for a in parsed]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for arg in dockerfile()["ENV"]:
        for pair in shlex.split(arg):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def nodes(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in c["services"].items() if name.startswith("hapax-")}


def chart(values: list[Path] | None = None, sets: tuple[str, ...] = ()) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in helm_template(values or [], sets=sets)}


def pod(objects: dict[tuple[str, str], dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = objects[(kind, name)]["spec"]["template"]["spec"]
    return spec


def chart_config(objects: dict[tuple[str, str], dict[str, Any]]) -> str:
    text: str = objects[("ConfigMap", "hapax-config")]["data"]["hapax.yaml"]
    return text


def values() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return data


def parses(argv: list[str]) -> argparse.Namespace:
    """``argv`` as ``hapax`` parses it; its usage error as the failure otherwise."""
    from node.cli import _parser  # the CLI's own parser: the commands must be ones it accepts

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"hapax {' '.join(argv)}: {err.getvalue().strip()}") from None


# --- The port. --------------------------------------------------------------------------------

def test_one_port_in_the_image_its_config_compose_prometheus_and_the_chart() -> None:
    port = load_config(DOCKER / "hapax.yaml").server.port
    d = dockerfile()
    assert d["EXPOSE"] == [f"{port}/tcp"]
    assert f"127.0.0.1:{port}/health/live" in d["HEALTHCHECK"][0]
    assert load_config(DOCKER / "cluster.yaml").server.port == port
    for name, node in nodes(compose()).items():
        assert [p.rsplit(":", 1)[1] for p in node["ports"]] == [str(port)], name
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"{n}:{port}" for n in nodes(compose())]
    assert values()["server"]["port"] == port
    for files in VALUE_FILES:
        objects = chart(files)
        container = pod(objects, "Deployment", "hapax")["containers"][0]
        assert {p["containerPort"] for p in container["ports"]} == {port}
        assert yaml.safe_load(chart_config(objects))["server"]["port"] == port


# --- Paths and commands. ----------------------------------------------------------------------

def test_the_config_path_is_where_each_file_puts_the_config() -> None:
    d = dockerfile()
    image_config = next(a.split()[-1] for a in d["COPY"] if a.startswith("docker/hapax.yaml"))
    cmd = exec_form(d["CMD"][0])
    assert cmd[cmd.index("--config") + 1] == image_config
    # Compose nodes start on the image's own file; config-push reads the file it mounts.
    for name, node in nodes(compose()).items():
        assert node["command"][node["command"].index("--config") + 1] == image_config, name
    push = compose()["services"]["config-push"]
    mounted = {v.split(":")[1] for v in push["volumes"]}
    assert push["command"][2] in mounted
    # The chart mounts its ConfigMap where the image keeps its config, for the nodes and the Job.
    objects = chart()
    for kind, name in (("Deployment", "hapax"), ("Job", "hapax-config-push")):
        container = pod(objects, kind, name)["containers"][0]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert image_config in mounts, (kind, name)
        args = container["args"]
        path = args[args.index("--config") + 1] if "--config" in args else args[2]
        assert path == image_config, (kind, name)


def test_every_serve_command_is_one_the_cli_accepts() -> None:
    d = dockerfile()
    entry = exec_form(d["ENTRYPOINT"][0])
    assert entry == ["hapax"]
    commands = {"Dockerfile CMD": exec_form(d["CMD"][0])}
    commands |= {f"compose {n}": s["command"] for n, s in nodes(compose()).items()}
    for files in VALUE_FILES:
        commands[f"chart {files}"] = pod(chart(files), "Deployment", "hapax")["containers"][0]["args"]
    for where, argv in commands.items():
        args = parses(argv)
        assert args.command == "serve", where
    chart_args = parses(pod(chart(sets=("workers=3",)), "Deployment", "hapax")["containers"][0]["args"])
    assert str(chart_args.workers) == "3"
    preStop = pod(chart(), "Deployment", "hapax")["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert preStop[0] == "/opt/hapax/bin/python", "the image's python: the venv the Dockerfile builds"
    assert "/opt/hapax" in " ".join(d["COPY"]) and "/opt/hapax/bin" in dockerfile_env()["PATH"]


# --- Environment. -----------------------------------------------------------------------------

def _read_by_hapax() -> set[str]:
    """Every HAPAX_* name Hapax's own code mentions (what it can read from the environment)."""
    names: set[str] = set()
    for package in ("hapax", "node", "coordinator"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"\bHAPAX_[A-Z0-9_]+\b", path.read_text()))
    return names


def test_every_hapax_variable_set_anywhere_is_one_hapax_reads_or_the_config_uses() -> None:
    known = _read_by_hapax()
    sets: dict[str, set[str]] = {"Dockerfile": {n for n in dockerfile_env() if n.startswith("HAPAX_")}}
    for name, s in compose()["services"].items():
        sets[f"compose {name}"] = {n for n in (s.get("environment") or {}) if n.startswith("HAPAX_")}
    for files in VALUE_FILES:
        objects = chart(files)
        referenced = set(re.findall(r"\$\{([A-Z0-9_]+)\}", chart_config(objects)))
        for kind, name in (("Deployment", "hapax"), ("Job", "hapax-config-push")):
            env = {e["name"] for e in pod(objects, kind, name)["containers"][0]["env"]}
            assert referenced <= env, f"{kind}/{name} {files}: ${{VAR}} in the config but not set: {referenced - env}"
            sets[f"{kind}/{name} {files}"] = {n for n in env if n.startswith("HAPAX_")} - referenced
    unknown = {where: names - known for where, names in sets.items() if names - known}
    assert not unknown, f"variables Hapax never reads: {unknown}"
    # And the ones every deployment sets, with the same cluster name everywhere.
    cluster = values()["clusterName"]
    assert dockerfile_env()["HAPAX_CLUSTER"] == cluster
    for name, node in nodes(compose()).items():
        assert node["environment"]["HAPAX_CLUSTER"] == cluster, name
        assert {"HAPAX_ETCD_ENDPOINTS", "HAPAX_REDIS_URL"} <= set(node["environment"]), name
    push = compose()["services"]["config-push"]["command"]
    assert push[push.index("--cluster") + 1] == cluster
    assert push[push.index("--etcd") + 1] == nodes(compose())["hapax-1"]["environment"]["HAPAX_ETCD_ENDPOINTS"]
    env = {e["name"]: e.get("value") for e in pod(chart(), "Deployment", "hapax")["containers"][0]["env"]}
    assert env["HAPAX_CLUSTER"] == cluster


# --- The user and the drain. ------------------------------------------------------------------

def test_the_user_and_the_drain_times_agree() -> None:
    d = dockerfile()
    assert d["USER"] == ["10001:10001"]
    security = values()["podSecurityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (10001, 10001)
    image = load_config(DOCKER / "hapax.yaml").server
    v = values()
    assert (v["server"]["drainDelay"], v["server"]["shutdownGrace"]) == (image.drain_delay, image.shutdown_grace)
    rendered = yaml.safe_load(chart_config(chart()))["server"]
    assert (rendered["drain_delay"], rendered["shutdown_grace"]) == (image.drain_delay, image.shutdown_grace)
    assert v["terminationGracePeriodSeconds"] > v["preStopSleepSeconds"] + image.drain_delay + image.shutdown_grace
    for name, node in nodes(compose()).items():
        grace = int(str(node["stop_grace_period"]).rstrip("s"))
        assert grace > image.drain_delay + image.shutdown_grace, name
    pushed = load_config(DOCKER / "cluster.yaml").server
    assert (pushed.drain_delay, pushed.shutdown_grace) == (image.drain_delay, image.shutdown_grace)


def chart_config_as_hapax_loads_it(files: list[Path], tmp_path: Path) -> Config:
    text = chart_config(chart(files))
    path = tmp_path / "chart.yaml"
    path.write_text(text)
    # What the pod's env gives each ${VAR} (secrets; the admin key is at least 32 characters).
    env = {name: "s" * 48 for name in re.findall(r"\$\{([A-Z0-9_]+)\}", text)}
    return load_config(path, env=env)


@pytest.mark.parametrize("files", VALUE_FILES[:2], ids=["default", "external"])
def test_the_chart_config_is_one_hapax_accepts(files: list[Path], tmp_path: Path) -> None:
    """The HTTP/3 values' config is checked in tests/test_deploy_merged.py (server.http3 arrives
    with issue [11]'s branch)."""
    cfg = chart_config_as_hapax_loads_it(files, tmp_path)
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.port == values()["server"]["port"]
    if files:
        assert cfg.cluster.etcd.ca_file == "/etc/hapax/etcd-tls/ca.crt"


# --- Health and metrics paths, asked of a node on the image's default config. ----------------

@pytest.fixture
def default_node(tmp_path: Path, gateway: Callable[..., GatewayProcess]) -> Iterator[GatewayProcess]:
    config = yaml.safe_load((DOCKER / "hapax.yaml").read_text())
    # Loopback and a free port for the test; everything else as the image runs it.
    config["server"] = {k: v for k, v in config["server"].items() if k not in ("host", "port")}
    yield gateway(config)


def test_every_health_and_metrics_path_the_deployments_ask_answers(default_node: GatewayProcess) -> None:
    paths: dict[str, str] = {}
    health = dockerfile()["HEALTHCHECK"][0]
    found = re.search(r"http://127\.0\.0\.1:\d+(/[\w/]+)", health)
    assert found, health
    paths["Dockerfile HEALTHCHECK"] = found.group(1)
    objects = chart(sets=("metrics.serviceMonitor.enabled=true",))
    container = pod(objects, "Deployment", "hapax")["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        paths[f"chart {probe}"] = container[probe]["httpGet"]["path"]
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]
    for e in objects[("ServiceMonitor", "hapax")]["spec"]["endpoints"]:
        paths["chart ServiceMonitor"] = e["path"]
    paths["compose prometheus"] = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"][0][
        "metrics_path"]
    assert paths["chart readinessProbe"] == "/health/ready"
    assert paths["Dockerfile HEALTHCHECK"] == paths["chart livenessProbe"]
    for where, path in paths.items():
        r = httpx.get(default_node.url + path, timeout=5)
        assert r.status_code == 200, f"{where}: GET {path} -> {r.status_code}"
