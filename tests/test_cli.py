"""The ``hapax`` command as an operator meets it: run as a process, read what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.gateway_process import ROOT


def hapax(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HAPAX_ADMIN_KEY", "HAPAX_DEBUG")}
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


def _validate(tmp_path: Path, text: str | bytes, *extra: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "hapax.yaml"
    if isinstance(text, bytes):
        f.write_bytes(text)
    else:
        f.write_text(text)
    return hapax("config", "validate", str(f), *extra)


def test_validate_reports_every_error_with_suggestions(tmp_path: Path) -> None:
    r = _validate(tmp_path, """\
providers:
  p: {type: mock, bogus: 1}
  q: {type: openai, base_url: 'not a url'}
models:
  - {name: a, provider: p, alias: [x]}
  - {name: b, provider: p, strategy: weird}
server:
  port: -1
  reload_intervl: 3
""")
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert "error: models[0].alias: unknown key; did you mean 'aliases'?" in errors
    assert "error: server.reload_intervl: unknown key; did you mean 'reload_interval'?" in errors
    assert "error: providers.p.bogus: unknown key" in errors
    assert any(e.startswith("error: providers.q: base_url must be") for e in errors)
    assert any(e.startswith("error: models[1].strategy: unknown strategy 'weird'") for e in errors)
    assert any(e.startswith("error: server.port:") for e in errors)
    assert len(errors) == 6 and r.stderr.rstrip().endswith("6 errors")
    assert "Traceback" not in r.stderr


def test_validate_cross_checks_and_env_all_at_once(tmp_path: Path) -> None:
    r = _validate(tmp_path, """\
providers:
  p: {type: openai, api_key: '${HAPAX_TEST_UNSET_A}', base_url: '${HAPAX_TEST_UNSET_B}'}
models:
  - {name: a, provider: nope}
  - {name: a, provider: p}
""")
    assert r.returncode == 1
    assert "error: providers.p.api_key: environment variable HAPAX_TEST_UNSET_A is not set" in r.stderr
    assert "error: providers.p.base_url: environment variable HAPAX_TEST_UNSET_B is not set" in r.stderr
    # Cross-checks (they run once every key is valid) are reported all at once too.
    assert "models[0] (a): unknown provider 'nope'" in r.stderr
    assert "models[1]: name 'a' is already used by 'a'" in r.stderr


def test_validate_rewords_yaml_errors_with_line_and_column(tmp_path: Path) -> None:
    r = _validate(tmp_path, "providers:\n  p: {type: mock}\nmodels:\n\t- {name: a, provider: p}\n")
    assert r.returncode == 1
    assert "error: invalid YAML: line 4, column 1: a tab: YAML indents with spaces" in r.stderr
    r = _validate(tmp_path, "server:\n  host: a: b\n")
    assert "line 2, column 10: a ':' where no key can start" in r.stderr
    assert "a: b" not in r.stderr  # PyYAML's quote of the line (it may hold a secret) is left out


def test_validate_refuses_empty_undecodable_and_useless_configs(tmp_path: Path) -> None:
    for text, needle in (
        ("", "error: the file is empty"),
        ("# just a comment\n", "error: the file holds no settings"),
        (b"models: \xff\n", "error: the file is not UTF-8"),
        ("models: " + "[" * 3000 + "]" * 3000 + "\n", "error: invalid YAML: nested too deep"),
        ("- a\n- b\n", "error: the config must be a mapping"),
        ("providers: {p: {type: mock}}\n", "error: models: none configured"),
        ("auth: {mode: keys}\nproviders: {p: {type: mock}}\nmodels: [{name: a, provider: p}]\n",
         "auth: mode keys needs auth.admin_key or auth.state_dir"),
    ):
        r = _validate(tmp_path, text)
        assert r.returncode == 1 and needle in r.stderr, (text, r.stderr)
        assert "ok" not in r.stdout and "Traceback" not in r.stderr


def test_validate_warnings_pass_unless_strict(tmp_path: Path) -> None:
    text = "providers: {p: {type: mock}}\nmodels: [{name: a, provider: p}]\n"
    r = _validate(tmp_path, text)
    assert r.returncode == 0 and r.stdout.startswith("ok: 1 providers, 1 models (1 warning(s))")
    assert "warning: auth.mode: none" in r.stderr
    assert _validate(tmp_path, text, "--strict").returncode == 1
