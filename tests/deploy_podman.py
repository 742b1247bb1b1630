"""The image and its containers, for real, with podman (there is no Docker daemon on CI machines).

``.ci/podman-base`` sets podman up (runc, cgroupfs, the ulimits the sandbox accepts) and makes the
base images offline; ``.ci/run`` calls it before the tests and exports what it printed as
``HAPAX_CI_BASE_IMAGE`` and ``HAPAX_CI_SERVICES_IMAGE``. Run alone, the tests call it themselves
(it is idempotent and cached under /var/cache/hapax-ci). The image is then built from
docker/Dockerfile with that base as the ``BASE`` build argument, once per test session; podman's
layer cache makes a rebuild with unchanged sources a few seconds.

Every container, network and compose project a test makes carries the test process's id in its
name, and is removed by the test that made it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.deploy_support import ROOT

PODMAN_BASE = ROOT / ".ci" / "podman-base"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
#: The tag the tests build; compose runs it through HAPAX_IMAGE.
IMAGE = "localhost/hapax:ci"
#: Generous: a first build downloads every wheel from the package index, on a loaded machine.
BUILD_TIMEOUT = 900


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which("podman") is None:
        raise RuntimeError("podman not found: .ci/podman-base installs it (Debian's podman, with runc)")
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def ci_images() -> dict[str, str]:
    """``{"base": ..., "services": ...}``: from .ci/run's environment, else from .ci/podman-base."""
    base, services = os.environ.get("HAPAX_CI_BASE_IMAGE"), os.environ.get("HAPAX_CI_SERVICES_IMAGE")
    if base and services:
        return {"base": base, "services": services}
    done = subprocess.run([str(PODMAN_BASE)], capture_output=True, text=True, timeout=1200, check=False)
    if done.returncode != 0:
        raise AssertionError(f".ci/podman-base failed:\n{done.stderr[-4000:]}")
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return {"base": found["base"], "services": found["services"]}


def build_image(base: str) -> str:
    """docker/Dockerfile built on ``base``; returns the tag.

    ``--format docker``: the OCI image format has no HEALTHCHECK, and podman drops it when
    building one; Docker's format keeps it, as ``docker build`` does.
    """
    podman("build", "--format", "docker", "--file", str(DOCKERFILE), "--build-arg", f"BASE={base}",
           "--tag", IMAGE, str(ROOT), timeout=BUILD_TIMEOUT)
    return IMAGE


def wait_for(pred: Callable[[], bool], timeout: float, what: str, *, logs: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            extra = f"\n{logs()}" if logs else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(0.2)


def answers(url: str, status: int = 200) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == status
        except httpx.HTTPError:
            return False
    return check


def published_port(container: str, port: int = 8080) -> int:
    """The loopback port podman published ``port/tcp`` of ``container`` on."""
    out = podman("port", container, f"{port}/tcp").stdout.strip().splitlines()[0]
    return int(out.rsplit(":", 1)[1])


def container_logs(container: str) -> str:
    done = podman("logs", "--tail", "40", container, check=False)
    return f"--- {container} logs ---\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def remove(*containers: str) -> None:
    if containers:
        podman("rm", "--force", "--time", "2", *containers, timeout=60, check=False)


def write_file(path: Path, text: str) -> Path:
    path.write_text(text)
    # Read by the container's non-root user.
    path.chmod(0o644)
    return path
