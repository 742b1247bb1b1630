"""Render and validate the deployment files: the Helm chart, k8s/ and the kustomize overlay.

``helm`` comes from ``go install helm.sh/helm/v3/cmd/helm@v3.22.0`` (.ci/run puts it on PATH);
``kustomize build`` (its Go module; or ``kubectl kustomize``) builds the overlay. Objects are
validated offline against the Kubernetes JSON schemas the ``kubernetes-validate`` package ships;
the two Prometheus Operator kinds (ServiceMonitor, PrometheusRule) are custom resources those
schemas lack, so they get the checks in ``CRD_REQUIRED`` instead.

``python -m tests.deploy_support`` rewrites k8s/base from the chart's default values; the tests
fail when the checked-in base and the chart drift apart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "hapax"
K8S = ROOT / "k8s"
#: Kubernetes version the objects are validated against: the oldest the chart supports that the
#: schemas carry would be 1.25; validate against a current one, where every API used is GA.
KUBE_VERSION = "1.32.0"
#: The release the k8s/ manifests stand for: `helm template hapax helm/hapax -n hapax`.
RELEASE = "hapax"
NAMESPACE = "hapax"
#: Labels only Helm's bookkeeping needs; the plain manifests leave them out.
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")
#: Objects of the chart k8s/ does not carry: the admin key is the user's to create (no random
#: values in plain manifests), see docs/deployment.md.
NOT_IN_K8S = {("Secret", "hapax-admin")}

CRD_REQUIRED: dict[str, tuple[str, ...]] = {
    "ServiceMonitor": ("selector", "endpoints"),
    "PrometheusRule": ("groups",),
}


def _go_bin() -> Path:
    gobin = os.environ.get("GOBIN")
    if gobin:
        return Path(gobin)
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    return Path(gopath.split(os.pathsep)[0]) / "bin"


def helm_binary() -> str:
    found = shutil.which("helm") or (str(_go_bin() / "helm") if (_go_bin() / "helm").exists() else None)
    if found is None:
        raise RuntimeError("helm not found: go install helm.sh/helm/v3/cmd/helm@v3.22.0 (.ci/run does)")
    return found


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False)


def helm_template(values: Sequence[Path] = (), *, sets: Sequence[str] = ()) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for v in values:
        args += ["--values", str(v)]
    for s in sets:
        args += ["--set", s]
    done = helm(*args)
    if done.returncode != 0:
        raise AssertionError(f"helm template failed:\n{done.stderr}")
    return load_all(done.stdout)


def load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def kustomize_command() -> list[str]:
    """``kustomize build`` (``go install sigs.k8s.io/kustomize/kustomize/v5``, as .ci/run does),
    else the kustomize built into kubectl."""
    found = shutil.which("kustomize") or (str(_go_bin() / "kustomize") if (_go_bin() / "kustomize").exists() else None)
    if found:
        return [found, "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise RuntimeError("kustomize not found: go install sigs.k8s.io/kustomize/kustomize/v5@v5.5.0 (.ci/run does)")


def kustomize(path: Path) -> list[dict[str, Any]]:
    command = [*kustomize_command(), str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stderr}")
    return load_all(done.stdout)


def validate(objects: Iterable[dict[str, Any]]) -> list[str]:
    """Every problem with the objects, as ``Kind/name: message`` lines; [] when all are valid."""
    import kubernetes_validate

    problems = []
    for obj in objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        kind = obj.get("kind", "")
        if kind in CRD_REQUIRED:
            problems += [f"{where}: {p}" for p in _crd_problems(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: no schema: {exc}")
    return problems


def _crd_problems(obj: dict[str, Any]) -> list[str]:
    out = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        out.append(f"apiVersion {obj.get('apiVersion')!r} is not monitoring.coreos.com/v1")
    if not obj.get("metadata", {}).get("name"):
        out.append("metadata.name missing")
    spec = obj.get("spec") or {}
    out += [f"spec.{k} missing" for k in CRD_REQUIRED[obj["kind"]] if not spec.get(k)]
    if obj["kind"] == "PrometheusRule":
        for g in spec.get("groups", []):
            for r in g.get("rules", []):
                if not r.get("alert") or not isinstance(r.get("expr"), str) or not r["expr"].strip():
                    out.append(f"rule {r!r} needs alert and expr")
    if obj["kind"] == "ServiceMonitor":
        out += [f"endpoint {e!r} needs port and path" for e in spec.get("endpoints", [])
                if not e.get("port") or not e.get("path")]
    return out


def for_plain_manifests(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chart's objects as k8s/base carries them: no Helm labels, hooks or generated Secret."""
    out = []
    for obj in objects:
        if (obj["kind"], obj["metadata"]["name"]) in NOT_IN_K8S:
            continue
        _strip(obj)
        out.append(obj)
    return out


def _strip(node: Any) -> None:
    if isinstance(node, dict):
        for key in ("labels", "matchLabels"):
            labels = node.get(key)
            if isinstance(labels, dict):
                for name in HELM_ONLY_LABELS:
                    labels.pop(name, None)
        annotations = node.get("annotations")
        if isinstance(annotations, dict):
            for name in [a for a in annotations if a.startswith("helm.sh/")]:
                del annotations[name]
            if not annotations:
                del node["annotations"]
        for v in node.values():
            _strip(v)
    elif isinstance(node, list):
        for v in node:
            _strip(v)


def base_file_name(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_k8s_base() -> list[str]:
    """Rewrite k8s/base from the chart's defaults; returns the files written."""
    objects = for_plain_manifests(helm_template())
    base = K8S / "base"
    for old in base.glob("*.yaml"):
        old.unlink()
    names = []
    header = ("# Generated from helm/hapax with its default values (python -m tests.deploy_support);\n"
              "# tests/test_deploy_chart.py fails when this file and the chart disagree.\n")
    for obj in objects:
        name = base_file_name(obj)
        (base / name).write_text(header + yaml.safe_dump(obj, sort_keys=False))
        names.append(name)
    # Helm installs into a namespace that exists (or --create-namespace); kubectl needs the object.
    (base / "namespace.yaml").write_text(header + yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}, sort_keys=False))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": ["namespace.yaml", *sorted(names)],
    }
    (base / "kustomization.yaml").write_text(
        "# The chart's defaults as plain manifests, for `kubectl apply -k` without Helm. Create the\n"
        "# admin key Secret first (docs/deployment.md).\n" + yaml.safe_dump(kustomization, sort_keys=False))
    return names


if __name__ == "__main__":
    for written in write_k8s_base():
        print(f"k8s/base/{written}", file=sys.stderr)
