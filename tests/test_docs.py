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
