"""docs/deployment.md keeps up with the chart (issue [7]).

Its values reference is values.schema.json's: one row per value, with values.yaml's default and
the schema's description, so a value added, renamed, re-described or given another default fails
here until the guide says so. ``python -m tests.test_deploy_docs`` prints the table to paste.
The quick start's names (Secret, Service, model, the commands' flags) are the chart's.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.deploy_support import CHART, ROOT, helm_template

GUIDE = ROOT / "docs" / "deployment.md"
#: A default longer than this is not repeated in the table: values.yaml has it, commented.
MAX_DEFAULT = 48


def _schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return data


def _values() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return data


def _described(node: dict[str, Any], name: str) -> bool:
    """Has a description of its own: Kubernetes fields passed through only repeat their name."""
    d = node.get("description")
    return bool(d) and d != name


def _rows(node: dict[str, Any], values: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for name, sub in (node.get("properties") or {}).items():
        if name == "global":
            continue
        path = f"{prefix}{name}"
        value = values.get(name) if isinstance(values, dict) else None
        children = sub.get("properties") or {}
        if any(_described(c, n) for n, c in children.items()):
            out += _rows(sub, value, path + ".")
        else:
            out.append((path, _default(value), sub.get("description", "")))
    return out


def _default(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    return f"`{text}`" if len(text) <= MAX_DEFAULT else "see values.yaml"


def reference_rows() -> list[tuple[str, str, str]]:
    """(value, default, description) for every value the schema describes, in schema order."""
    return _rows(_schema(), _values())


def reference_table() -> str:
    lines = ["| value | default | description |", "|---|---|---|"]
    lines += [f"| `{p}` | {d} | {desc.replace('|', '/')} |" for p, d, desc in reference_rows()]
    return "\n".join(lines)


def _section(title: str) -> str:
    text = GUIDE.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else len(text)]


def test_values_reference_is_the_schema_with_the_defaults() -> None:
    section = _section("Values reference")
    documented = [line for line in section.splitlines() if line.startswith("| `")]
    expected = reference_table().splitlines()[2:]
    missing = sorted(set(expected) - set(documented))
    stale = sorted(set(documented) - set(expected))
    assert not missing and not stale, (
        "docs/deployment.md's values reference is out of step with values.schema.json / values.yaml "
        "(python -m tests.test_deploy_docs prints the table):\n"
        + "\n".join([*(f"missing: {m}" for m in missing), *(f"stale:   {s}" for s in stale)]))
    assert documented == expected, "rows in schema order"


def test_every_schema_value_has_a_description() -> None:
    """A value the reference could not explain: the schema describes every one."""
    assert all(desc for _, _, desc in reference_rows())


def test_the_quick_start_names_what_the_chart_makes() -> None:
    quick = _section("Quick start with Helm")
    objects = {(o["kind"], o["metadata"]["name"]): o for o in helm_template()}
    values = _values()
    # The admin key Secret and its key, the Service and its port, the first model.
    assert ("Secret", "hapax-admin") in objects
    assert f"secret hapax-admin -o jsonpath='{{.data.{values['adminKey']['secretKey']}}}'" in quick
    service = objects[("Service", "hapax")]
    assert f"port-forward svc/hapax 8080:{service['spec']['ports'][0]['port']}" in quick
    config = yaml.safe_load(objects[("ConfigMap", "hapax-config")]["data"]["hapax.yaml"])
    models = {m["name"] for m in config["models"]}
    assert re.findall(r'"model": ?"([\w-]+)"', quick) and set(re.findall(r'"model": ?"([\w-]+)"', quick)) <= models
    assert ("Job", "hapax-config-push") in objects and "job/hapax-config-push" in quick
    # Every --set in the guide names a value the schema knows.
    known = {p for p, _, _ in reference_rows()}
    text = GUIDE.read_text()
    for key in re.findall(r"--set(?:-string)? ([\w.]+)=", text):
        assert any(key == k or key.startswith(k + ".") for k in known), key


if __name__ == "__main__":
    print(reference_table())
