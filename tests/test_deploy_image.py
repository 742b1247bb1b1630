"""The image from docker/Dockerfile, built and run for real with podman (issue [7]).

CI has no Docker daemon and no registry: ``.ci/podman-base`` makes the base image offline from
Debian's packages, and the build takes it as ``BASE`` (``python:3.11-slim`` for users). The
containers run as the chart runs the pod: non-root, read-only root filesystem with a writable
/tmp, every capability dropped, on a user-defined network whose DNS resolves container names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from tests.deploy_podman import (
    answers,
    build_image,
    ci_images,
    container_logs,
    podman,
    published_port,
    remove,
    wait_for,
    write_file,
)

TAG = f"t{os.getpid()}"
#: What the chart's securityContext asks of the pod, as podman flags.
AS_THE_CHART_RUNS_IT = ("--read-only", "--tmpfs", "/tmp", "--user", "10001:10001", "--cap-drop", "ALL",
                        "--security-opt", "no-new-privileges")
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def image() -> str:
    return build_image(ci_images()["base"])


@pytest.fixture
def network() -> Iterator[str]:
    name = f"hapax-{TAG}"
    podman("network", "create", name)
    made: list[str] = []
    try:
        yield name
    finally:
        out = podman("ps", "--all", "--filter", f"network={name}", "--format", "{{.Names}}", check=False).stdout
        made = out.split()
        remove(*made)
        podman("network", "rm", "--force", name, check=False)


def _run(image: str, network: str, name: str, *args: str, volumes: tuple[str, ...] = ()) -> tuple[str, str]:
    """Start a container; returns its name and the base URL of its published port on loopback."""
    vols = [a for v in volumes for a in ("--volume", v)]
    podman("run", "--detach", "--name", name, "--network", network, "--publish", "127.0.0.1::8080",
           *AS_THE_CHART_RUNS_IT, *vols, image, *args)
    url = f"http://127.0.0.1:{published_port(name)}"
    wait_for(answers(url + "/health/ready"), 90, f"{name} /health/ready", logs=lambda: container_logs(name))
    return name, url


def _stream(url: str, model: str) -> tuple[str, str | None]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-anything", max_retries=0, timeout=30)
    with client:
        text, finish = "", None
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], stream=True
        ):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    return text, finish


def test_image_is_non_root_with_no_compiler_and_the_documented_entrypoint(image: str) -> None:
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    cfg = info["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["hapax"]
    assert cfg["Cmd"] == ["serve", "--config", "/etc/hapax/hapax.yaml"]
    assert "8080/tcp" in cfg["ExposedPorts"]
    assert "/health/live" in " ".join(info["Healthcheck"]["Test"])
    assert cfg["StopSignal"] == "SIGTERM"
    found = podman("run", "--rm", "--entrypoint", "/bin/sh", image, "-c",
                   "for c in gcc cc g++ make ld; do command -v $c; done; ls /src /wheels 2>/dev/null; id -u").stdout
    # No compiler, no build tree, no wheels: only the user's id is printed.
    assert found.split() == ["10001"]


def test_container_is_ready_streams_reports_healthy_and_stops_cleanly(image: str, network: str) -> None:
    name, url = _run(image, network, f"hapax-{TAG}-node")
    text, finish = _stream(url, "hapax-demo")
    assert len(text.split()) > 3, text
    assert finish == "stop"
    # The image's own HEALTHCHECK, run the way the engine runs it: exit 0 means healthy.
    assert podman("healthcheck", "run", name, check=False).returncode == 0, container_logs(name)
    # `docker stop` / Kubernetes: SIGTERM to the first process, which is hapax itself; it drains
    # (server.drain_delay, then shutdown) and exits 0, well inside the 40 s before SIGKILL.
    podman("stop", "--time", "40", name, timeout=60)
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, container_logs(name)
    logs = container_logs(name)
    assert '"msg":"draining"' in logs and '"abandoned_requests":0' in logs, logs


def test_a_gateway_container_reaches_its_upstream_by_container_name(
    image: str, network: str, tmp_path: Path
) -> None:
    """Container DNS on a user-defined network: a gateway whose OpenAI provider is another
    container, named in base_url as it would be in compose or a Kubernetes Service."""
    upstream, upstream_url = _run(image, network, f"hapax-{TAG}-upstream")
    config = {
        "server": {"host": "0.0.0.0", "port": 8080},
        "providers": {"upstream": {"type": "openai", "base_url": f"http://{upstream}:8080/v1",
                                   "api_key": "sk-upstream"}},
        "models": [{"name": "relayed", "provider": "upstream", "model": "hapax-demo"}],
    }
    path = write_file(tmp_path / "gateway.yaml", yaml.safe_dump(config))
    _, gateway_url = _run(image, network, f"hapax-{TAG}-gateway", "serve", "--config", "/etc/hapax/gateway.yaml",
                          volumes=(f"{path}:/etc/hapax/gateway.yaml:ro",))
    direct = _stream(upstream_url, "hapax-demo")
    relayed = _stream(gateway_url, "relayed")
    assert relayed == direct
    assert relayed[1] == "stop"
