"""The docs keep up with the code: every config key is documented."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from hapax import Config

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        ann = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out.extend(_keys(candidate, prefix + name + "."))
    return out


def _documented(key: str, text: str) -> bool:
    """Some dotted suffix of the key (``cors.enabled`` for ``server.cors.enabled``) is in backticks."""
    parts = key.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(re.search("`" + re.escape(s) + r"[`.\[ ]", text) for s in suffixes)


def test_every_config_key_is_documented() -> None:
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    missing = [k for k in _keys(Config) if not _documented(k, text)]
    assert not missing, f"config keys missing from docs/: {missing}"


def test_every_metric_is_documented() -> None:
    from hapax import GatewayMetrics

    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    names = [m.name for m in GatewayMetrics().registry._metrics]
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"metrics missing from docs/: {missing}"


def _error_codes_in_code() -> set[str]:
    """Every error ``code`` a client can get: class codes of the exception tree, and every
    ``code="..."`` an error is raised with, or ``"code": "..."`` body written, in hapax/ and node/."""
    from hapax._errors import HapaxError

    codes: set[str] = set()
    todo: list[type[HapaxError]] = [HapaxError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    root = DOCS.parent
    for path in [*root.glob("hapax/**/*.py"), *root.glob("node/**/*.py")]:
        text = path.read_text()
        codes.update(re.findall(r'\bcode="([a-z0-9_]+)"', text))
        codes.update(re.findall(r'"code": "([a-z0-9_]+)"', text))  # bodies the front door writes itself
    return codes


def _error_codes_in_docs() -> set[str]:
    """The codes in docs/api.md's error table (its second column)."""
    text = (DOCS / "api.md").read_text()
    section = text.split("\n## Errors", 1)[1].split("\n## ", 1)[0]
    codes: set[str] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0][:1].isdigit():
            codes.update(re.findall(r"`([a-z0-9_]+)`", cells[1]))
    return codes


def test_every_error_code_is_documented_and_only_those() -> None:
    in_code, in_docs = _error_codes_in_code(), _error_codes_in_docs()
    assert "missing_api_key" in in_code and "invalid_api_key" in in_code  # the collection works
    assert not in_code - in_docs, f"error codes missing from docs/api.md: {sorted(in_code - in_docs)}"
    assert not in_docs - in_code, f"docs/api.md lists codes the code never sends: {sorted(in_docs - in_code)}"
