"""The Helm chart and the plain manifests, checked as CI must (issue [7]).

``helm lint``; ``helm template`` with the default values and four other value files (HTTP/3 on,
external etcd and Redis, autoscaling, production); every rendered object, every file in k8s/ and
the built kustomize overlay validated offline against the Kubernetes schemas; k8s/base and the
production overlay shown to be the chart's objects for the matching values; bad values refused by
values.schema.json at install time.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_support import (
    CHART,
    K8S,
    KUBE_VERSION,
    NAMESPACE,
    for_plain_manifests,
    helm,
    helm_template,
    kustomize,
    load_all,
    validate,
)

VALUE_FILES = {
    "default": [],
    "http3": [CHART / "ci" / "http3-values.yaml"],
    "external": [CHART / "ci" / "external-values.yaml"],
    "autoscaling": [CHART / "ci" / "autoscaling-values.yaml"],
    "production": [CHART / "ci" / "production-values.yaml"],
}


def _by_kind(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def _gateway(objects: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = _by_kind(objects)[("Deployment", "hapax")]["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(_by_kind(objects)[("ConfigMap", "hapax-config")]["data"]["hapax.yaml"])
    return cfg


def test_helm_lint_passes_with_every_value_file() -> None:
    for name, files in VALUE_FILES.items():
        args = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
        for f in files:
            args += ["--values", str(f)]
        done = helm(*args)
        assert done.returncode == 0, f"{name}:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("name", list(VALUE_FILES))
def test_rendered_objects_are_valid_kubernetes(name: str) -> None:
    objects = helm_template(VALUE_FILES[name])
    assert objects
    assert validate(objects) == []


def test_validation_catches_a_bad_object() -> None:
    """The validator is strict: a misspelt field or a wrong type is a problem, not ignored."""
    objects = helm_template()
    bad = copy.deepcopy(_by_kind(objects)[("Deployment", "hapax")])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = bad["spec"]["template"]["spec"][
        "containers"][0].pop("readinessProbe")
    wrong_type = copy.deepcopy(_by_kind(objects)[("Service", "hapax")])
    wrong_type["spec"]["ports"][0]["port"] = "eighty"
    problems = validate([bad, wrong_type])
    assert len(problems) == 2, problems
    assert "readinessProbes" in problems[0]


def test_default_values_make_a_cluster_that_drains() -> None:
    objects = helm_template()
    kinds = _by_kind(objects)
    dep = kinds[("Deployment", "hapax")]
    pod = dep["spec"]["template"]["spec"]
    c = _gateway(objects)
    assert dep["spec"]["replicas"] == 3
    assert c["args"] == ["serve", "--config", "/etc/hapax/hapax.yaml", "--workers", "2"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    # Kubernetes' budget covers the preStop wait, the drain delay and the shutdown grace.
    cfg = _config(objects)
    assert pod["terminationGracePeriodSeconds"] > 5 + cfg["server"]["drain_delay"] + cfg["server"]["shutdown_grace"]
    assert "time.sleep(5)" in c["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    # Bundled etcd and Redis, named in the nodes' environment; the admin key from a Secret.
    assert ("StatefulSet", "hapax-etcd") in kinds and ("StatefulSet", "hapax-redis") in kinds
    env = _env(c)
    assert env["HAPAX_ETCD_ENDPOINTS"] == "http://hapax-etcd-0.hapax-etcd-headless.hapax.svc:2379"
    assert env["HAPAX_REDIS_URL"] == "redis://hapax-redis.hapax.svc:6379/0"
    assert env["HAPAX_CLUSTER"] == "hapax"
    assert env["HAPAX_ADMIN_KEY"] == {"secretKeyRef": {"name": "hapax-admin", "key": "admin-key"}}
    assert ("Secret", "hapax-admin") in kinds
    assert cfg["auth"] == {"mode": "keys", "admin_key": "${HAPAX_ADMIN_KEY}"}
    # The push Job is a hook on install, upgrade and rollback, with the same environment.
    job = kinds[("Job", "hapax-config-push")]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade,post-rollback"
    push = job["spec"]["template"]["spec"]["containers"][0]
    assert push["args"][:3] == ["config", "push", "/etc/hapax/hapax.yaml"]
    assert _env(push) == env
    assert [p["protocol"] for p in kinds[("Service", "hapax")]["spec"]["ports"]] == ["TCP"]
    assert ("PodDisruptionBudget", "hapax") in kinds
    assert not {k for k, _ in kinds} & {"Ingress", "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor"}


def test_http3_values_open_a_udp_port_and_mount_the_certificate() -> None:
    objects = helm_template(VALUE_FILES["http3"])
    kinds = _by_kind(objects)
    ports = {(p["name"], p["protocol"]) for p in kinds[("Service", "hapax")]["spec"]["ports"]}
    assert ports == {("http", "TCP"), ("http3", "UDP")}
    c = _gateway(objects)
    assert {(p["containerPort"], p["protocol"]) for p in c["ports"]} == {(8080, "TCP"), (8080, "UDP")}
    h3 = _config(objects)["server"]["http3"]
    assert h3 == {"enabled": True, "port": 8080, "certificate_file": "/etc/hapax/tls/tls.crt",
                  "key_file": "/etc/hapax/tls/tls.key"}
    assert {"name": "tls", "mountPath": "/etc/hapax/tls", "readOnly": True} in c["volumeMounts"]
    for kind in ("Ingress", "ServiceMonitor", "PrometheusRule"):
        assert any(k == kind for k, _ in kinds), kind
    rules = kinds[("PrometheusRule", "hapax")]["spec"]["groups"][0]["rules"]
    assert [r["alert"] for r in rules] == ["HapaxNoLeader", "HapaxConfigDivergence", "HapaxRedisDegraded",
                                          "HapaxEtcdDegraded", "HapaxHighErrorRatio", "HapaxBudgetExhausted"]
    policies = {name for kind, name in kinds if kind == "NetworkPolicy"}
    assert policies == {"hapax", "hapax-etcd", "hapax-redis"}


def test_external_values_use_your_etcd_and_redis_with_tls_and_auth() -> None:
    objects = helm_template(VALUE_FILES["external"])
    kinds = _by_kind(objects)
    assert not any(k == "StatefulSet" for k, _ in kinds)
    assert ("Secret", "hapax-admin") not in kinds  # the existing one is used
    env = _env(_gateway(objects))
    assert env["HAPAX_ETCD_ENDPOINTS"] == "https://etcd-0.etcd.example.com:2379,https://etcd-1.etcd.example.com:2379"
    assert env["HAPAX_REDIS_URL"] == "rediss://redis.example.com:6380/0"
    assert env["HAPAX_ETCD_PASSWORD"] == {"secretKeyRef": {"name": "hapax-etcd", "key": "password"}}
    assert env["HAPAX_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "hapax-redis", "key": "password"}}
    assert env["OPENAI_API_KEY"] == {"secretKeyRef": {"name": "openai", "key": "api-key"}}
    assert env["HAPAX_ADMIN_KEY"] == {"secretKeyRef": {"name": "hapax-admin", "key": "admin-key"}}
    cfg = _config(objects)
    assert cfg["cluster"]["etcd"] == {"username": "hapax", "password": "${HAPAX_ETCD_PASSWORD}",
                                      "ca_file": "/etc/hapax/etcd-tls/ca.crt",
                                      "cert_file": "/etc/hapax/etcd-tls/tls.crt",
                                      "key_file": "/etc/hapax/etcd-tls/tls.key"}
    assert cfg["state"]["redis"] == {"password": "${HAPAX_REDIS_PASSWORD}",
                                     "tls_ca_file": "/etc/hapax/redis-tls/ca.crt"}
    assert set(cfg["providers"]) == {"openai"}
    # No secret value is written into the ConfigMap: only references to the environment.
    text = kinds[("ConfigMap", "hapax-config")]["data"]["hapax.yaml"]
    assert "api_key: ${OPENAI_API_KEY}" in text


def test_autoscaling_values_hand_replicas_to_the_hpa() -> None:
    objects = helm_template(VALUE_FILES["autoscaling"])
    kinds = _by_kind(objects)
    assert "replicas" not in kinds[("Deployment", "hapax")]["spec"]
    hpa = kinds[("HorizontalPodAutoscaler", "hapax")]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    assert _gateway(objects)["args"][-1] == "auto"
    etcd = kinds[("StatefulSet", "hapax-etcd")]["spec"]
    assert etcd["replicas"] == 3
    endpoints = _env(_gateway(objects))["HAPAX_ETCD_ENDPOINTS"].split(",")
    assert endpoints == [f"http://hapax-etcd-{i}.hapax-etcd-headless.hapax.svc:2379" for i in range(3)]
    peers = next(a for a in etcd["template"]["spec"]["containers"][0]["command"] if a.startswith("--initial-cluster="))
    assert peers.count("=http://") == 3


@pytest.mark.parametrize(("sets", "complaint"), [
    (["replicaCount=0"], "replicaCount"),
    (["workers=lots"], "workers"),
    (["replicas=3"], "replicas"),  # a misspelt key: additionalProperties
    (["etcd.enabled=false"], "endpoints"),
    (["redis.enabled=false"], "url"),
    (["http3.enabled=true"], "tlsSecret"),
    (["podAntiAffinity=always"], "podAntiAffinity"),
    (["redis.external.url=http://redis:6379"], "url"),
    (["terminationGracePeriodSeconds=20"], "terminationGracePeriodSeconds"),
])
def test_bad_values_fail_at_install_time(sets: list[str], complaint: str) -> None:
    args = ["template", "hapax", str(CHART), "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    done = helm(*args)
    assert done.returncode != 0, done.stdout[:500]
    assert complaint in done.stderr, done.stderr


def _comparable(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for o in objects:
        if o["kind"] == "Namespace":
            continue
        o = copy.deepcopy(o)
        o["metadata"].pop("namespace", None)
        out[(o["kind"], o["metadata"]["name"])] = o
    return out


def test_k8s_base_is_the_chart_with_default_values() -> None:
    """k8s/base is generated from the chart (python -m tests.deploy_support): no drift."""
    built = kustomize(K8S / "base")
    assert _comparable(built) == _comparable(for_plain_manifests(helm_template()))
    assert all(o["metadata"].get("namespace") == NAMESPACE for o in built if o["kind"] != "Namespace")


def test_production_overlay_is_the_chart_with_production_values() -> None:
    built = kustomize(K8S / "overlays" / "production")
    assert _comparable(built) == _comparable(for_plain_manifests(helm_template(VALUE_FILES["production"])))


def test_every_file_in_k8s_and_the_built_overlays_validate() -> None:
    files = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    assert len(files) > 10
    problems = []
    for path in files:
        objects = load_all(path.read_text())
        # Patches are fragments of an object, checked once applied (the built overlay below).
        if path.parent.name != "production" or path.name != "gateway.yaml":
            problems += [f"{path.relative_to(K8S)}: {p}" for p in validate(objects)]
    for overlay in (K8S / "base", K8S / "overlays" / "production"):
        problems += [f"{overlay.relative_to(K8S)} (built): {p}" for p in validate(kustomize(overlay))]
    assert problems == []


def test_notes_say_how_to_reach_the_gateway_and_make_the_first_key() -> None:
    notes = _render_notes()
    assert "kubectl -n hapax port-forward svc/hapax 8080:80" in notes
    assert "get secret hapax-admin" in notes
    assert "/admin/keys" in notes and "/v1/chat/completions" in notes


def _render_notes() -> str:
    # `helm template` does not render NOTES.txt (install does, against a cluster): render it as
    # a template of a copy of the chart, with the same values.
    with tempfile.TemporaryDirectory() as tmp:
        copy_dir = Path(tmp) / "hapax"
        shutil.copytree(CHART, copy_dir)
        (copy_dir / "templates" / "notes.yaml").write_text(
            "{{- define \"notes\" -}}\n" + (CHART / "templates" / "NOTES.txt").read_text() + "\n{{- end -}}\n"
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n"
            "    {{- include \"notes\" . | nindent 4 }}\n")
        done = helm("template", "hapax", str(copy_dir), "--kube-version", KUBE_VERSION, "-n", "hapax",
                    "--show-only", "templates/notes.yaml")
        assert done.returncode == 0, done.stderr
        notes: str = yaml.safe_load(done.stdout)["data"]["notes"]
        return notes
