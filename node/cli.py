"""The ``hapax`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from hapax import ConfigError, __version__, config_schema, default_config, load_config

from . import access_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hapax", description="Hapax LLM gateway")
    p.add_argument("--version", action="version", version=f"hapax {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a gateway node")
    s.add_argument("--config", "-c", type=Path, help="YAML config; the embedded demo if omitted")
    s.add_argument("--host", help="override server.host")
    s.add_argument("--port", type=int, help="override server.port")
    c = sub.add_parser("config", help="config tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="check a config file; exit 1 naming the bad key")
    v.add_argument("file", type=Path)
    csub.add_parser("schema", help="print the config's JSON Schema")
    access_cli.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("keys", "audit"):
        return access_cli.run(args)
    if args.command == "config":
        if args.config_command == "schema":
            sys.stdout.write(orjson.dumps(config_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        try:
            cfg = load_config(args.file)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"ok: {len(cfg.providers)} providers, {len(cfg.models)} models")
        return 0
    if args.command == "serve":
        from .server import serve

        try:
            cfg = load_config(args.config) if args.config else default_config()
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        overrides = {}
        if args.host:
            overrides["host"] = args.host
        if args.port is not None:
            overrides["port"] = args.port
        if overrides:
            cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update=overrides)})
        serve(cfg, config_path=args.config)
        return 0
    return 2
