"""The ``hapax`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import orjson
from pydantic import ValidationError

from hapax import ConfigError, HapaxError, __version__, config_schema, default_config, load_config
from hapax.config import ClusterConfig, Config, StateConfig, config_findings, config_from_bytes

from . import access_cli, cluster_cli, config_cli, logs, reload_cli
from .workers import Supervisor, WorkerIdentity, check_shared_state, parse_workers, resolve_workers, stop_timeout


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hapax", description="Hapax LLM gateway")
    p.add_argument("--version", action="version", version=f"hapax {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a gateway node")
    s.add_argument("--config", "-c", type=Path, help="YAML config; the embedded demo if omitted")
    s.add_argument("--host", help="override server.host")
    s.add_argument("--port", type=int, help="override server.port")
    s.add_argument("--redis", metavar="URL",
                   help="share state through this Redis (state.redis.url; env HAPAX_REDIS_URL)")
    s.add_argument("--cluster", metavar="NAME",
                   help="namespace of the shared state (state.cluster; env HAPAX_CLUSTER, default hapax)")
    s.add_argument("--etcd", metavar="URL[,URL...]",
                   help="join the cluster whose config, keys and members live in this etcd "
                   "(cluster.etcd.endpoints; env HAPAX_ETCD_ENDPOINTS)")
    s.add_argument("--workers", metavar="N", type=_workers_arg,
                   help="processes serving the port (server.workers; default 1; 'auto': one per core); "
                   "above 1 needs --redis")
    c = sub.add_parser("config", help="config tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="check a config file; print every problem, exit 1 if any")
    v.add_argument("file", type=Path)
    v.add_argument("--strict", action="store_true", help="fail on warnings too (no models, auth off, ...)")
    v.add_argument(
        "--probe", action="store_true",
        help="also call each provider once (a token-free GET, e.g. {base_url}/models); exit 1 if one is "
        "misconfigured or unreachable",
    )
    v.add_argument("--probe-timeout", type=float, default=5.0, help="seconds per provider (5)")
    csub.add_parser("schema", help="print the config's JSON Schema")
    config_cli.add_parsers(csub)  # push, get, diff, history, rollback: the cluster's config in etcd
    access_cli.add_parsers(sub)
    cl = sub.add_parser("cluster", help="cluster tools (etcd)")
    clsub = cl.add_subparsers(dest="cluster_command", required=True)
    cluster_cli.add_parser(clsub)  # status
    reload_cli.add_parser(clsub)
    ce = sub.add_parser("certs", help="TLS certificates for the HTTP/3 door")
    cesub = ce.add_subparsers(dest="certs_command", required=True)
    dev = cesub.add_parser("dev", help="write a self-signed certificate and key for local use")
    dev.add_argument("--dir", type=Path, default=Path("certs"), help="where to write cert.pem and key.pem (./certs)")
    dev.add_argument("--name", action="append", metavar="HOST",
                     help="a DNS name or IP the certificate covers (repeatable; localhost, 127.0.0.1, ::1)")
    dev.add_argument("--days", type=int, default=90, help="validity in days (90)")
    return p


def _workers_arg(text: str) -> int | str:
    try:
        return parse_workers(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a count of at least 1 or 'auto', not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one ``error: ...`` line on stderr and exit 1."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        return _run(args)
    except ConfigError as exc:
        for line in _problem_lines(exc):
            print(f"error: {line}", file=sys.stderr)
    except HapaxError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
    except OSError as exc:
        print(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one line, with the traceback on request
        if os.environ.get("HAPAX_DEBUG"):
            raise
        print(f"error: internal error ({type(exc).__name__}: {exc}); set HAPAX_DEBUG=1 for the traceback",
              file=sys.stderr)
    return 1


def _problem_lines(exc: ConfigError) -> list[str]:
    return [f"{p}: {m}" if p else m for p, m in exc.problems]


def _run(args: argparse.Namespace) -> int:
    if args.command in ("keys", "audit", "usage"):
        return access_cli.run(args)
    if args.command == "cluster":
        return reload_cli.run(args) if args.cluster_command == "reload" else cluster_cli.run(args)
    if args.command == "certs":
        from .certs import DEV_NAMES, write_dev_pair

        cert, key = write_dev_pair(args.dir, names=tuple(args.name or DEV_NAMES), days=args.days)
        print(f"wrote {cert} and {key} (self-signed; for development only)")
        print(f"server.http3: {{enabled: true, certificate_file: {cert}, key_file: {key}}}")
        return 0
    if args.command == "config":
        if args.config_command == "schema":
            sys.stdout.write(orjson.dumps(config_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        if args.config_command in config_cli.COMMANDS:
            return config_cli.run(args)
        return _validate(args.file, strict=args.strict, probe=args.probe, probe_timeout=args.probe_timeout)
    if args.command == "serve":
        from .server import serve

        overrides = {}
        if args.host:
            overrides["host"] = args.host
        if args.port is not None:
            overrides["port"] = args.port

        def prepare(cfg: Config) -> Config:
            # The command line wins over the file, on every reload as at start-up.
            if overrides:
                cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update=overrides)})
            return with_state_overrides(cfg, redis=args.redis, cluster=args.cluster, env=os.environ,
                                        etcd=args.etcd)

        cfg = prepare(load_config(args.config) if args.config else default_config())
        identity = WorkerIdentity.from_env(os.environ)
        if identity is not None:  # started by a supervisor: serve as its worker
            serve(cfg, config_path=args.config, prepare=prepare, identity=identity)
            return 0
        count = resolve_workers(args.workers if args.workers is not None else cfg.server.workers)
        check_shared_state(cfg, count, os.environ)
        if count == 1:
            serve(cfg, config_path=args.config, prepare=prepare)
            return 0
        logs.configure(cfg.logging)
        logs.WRITER.shared()  # the workers write to the same stderr
        try:
            h3 = cfg.server.http3
            # One UDP socket per worker, held by the supervisor and steered by connection id.
            udp = (h3.host or cfg.server.host, h3.port if h3.port is not None else cfg.server.port) \
                if h3.enabled else None
            return Supervisor(args.argv, count, stop_timeout=stop_timeout(cfg), udp=udp).run()
        finally:
            logs.flush()
    return 2


def with_state_overrides(cfg: Config, *, redis: str | None, cluster: str | None,
                         env: Mapping[str, str], etcd: str | None = None) -> Config:
    """Flags beat the environment, which beats the config file."""
    url = redis or env.get("HAPAX_REDIS_URL") or None
    name = cluster or env.get("HAPAX_CLUSTER") or None
    endpoints = etcd or env.get("HAPAX_ETCD_ENDPOINTS") or None
    if url is None and name is None and endpoints is None:
        return cfg
    data = cfg.state.model_dump()
    if url is not None:
        data["redis"]["url"] = url
    if name is not None:
        data["cluster"] = name
    cluster_data = cfg.cluster.model_dump()
    if endpoints is not None:
        cluster_data["etcd"]["endpoints"] = tuple(e.strip() for e in endpoints.split(",") if e.strip())
    # Validated like the file's own sections: a bad URL or cluster name is a clear error.
    flag = {"redis": "--redis / HAPAX_REDIS_URL", "cluster": "--cluster / HAPAX_CLUSTER",
            "etcd": "--etcd / HAPAX_ETCD_ENDPOINTS"}
    try:
        state = StateConfig.model_validate(data)
        cluster_cfg = ClusterConfig.model_validate(cluster_data)
    except ValidationError as exc:
        raise ConfigError("bad state override", problems=[
            (flag.get(str(e["loc"][0]), str(e["loc"][0])), e["msg"].removeprefix("Value error, "))
            for e in exc.errors()]) from None
    return cfg.model_copy(update={"state": state, "cluster": cluster_cfg})


def _validate(path: Path, *, strict: bool, probe: bool = False, probe_timeout: float = 5.0) -> int:
    cfg = checked_config(path, strict=strict)
    if cfg is None:
        return 1
    findings = config_findings(cfg)
    print(f"ok: {len(cfg.providers)} providers, {len(cfg.models)} models"
          + (f" ({len(findings)} warning(s))" if findings else ""))
    if probe:
        from .probe import probe_providers

        return probe_providers(cfg, timeout=probe_timeout)
    return 0


def checked_config(path: Path | str, *, strict: bool, raw: bytes | None = None) -> Config | None:
    """``hapax config validate``'s verdict, its problems printed to stderr; ``None`` when refused.

    ``raw`` is the file's bytes when the caller read them already (``config push`` validates
    the bytes it pushes; ``config rollback`` those of an old revision, named by ``path``).
    """
    try:
        cfg = load_config(path) if raw is None else config_from_bytes(raw)
    except ConfigError as exc:
        lines = _problem_lines(exc)
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        print(f"{path}: {len(lines)} error{'s' if len(lines) > 1 else ''}", file=sys.stderr)
        return None
    findings = config_findings(cfg)
    for level, msg in findings:
        print(f"{level}: {msg}", file=sys.stderr)
    errors = sum(1 for level, _ in findings if level == "error")
    if errors or (strict and findings):
        print(f"{path}: {errors} error(s), {len(findings) - errors} warning(s)", file=sys.stderr)
        return None
    return cfg
