"""Configuration: typed, validated, immutable.

Theory of operation: a config file is YAML. Strings may hold ``${VAR}`` or
``${VAR:-default}``; these are expanded from the environment *after* YAML
parsing, so a value can never change the document's structure. Unknown keys
are errors that name their path. A validated ``Config`` is frozen; a reload
builds a new one and swaps it in whole.

Units are in field names or docstrings: seconds unless ``_ms``/``_bytes``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .._errors import ConfigError
from ._access import AuditConfig, AuthConfig, GlobalLimits, ModelPrice, TeamConfig, UsageConfig
from ._reliability import HealthCheckConfig, ReliabilityConfig, RetryConfig, check_strategy

#: Large enough for multimodal prompts with inline images, small enough to bound memory.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
#: Kubernetes' default terminationGracePeriodSeconds is 30; stay inside it.
DEFAULT_SHUTDOWN_GRACE = 25.0
#: Above the idle timeouts of common load balancers (AWS ALB 60 s; nginx's own default
#: is 75 s), so the balancer, not the node, closes a pooled connection first.
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
#: Generous for any real client's request line and headers; a slowloris holds a socket no longer.
DEFAULT_HEADER_TIMEOUT = 10.0
#: A full 10 MiB body at about 170 KiB/s; slower uploads are an attack or a broken link.
DEFAULT_BODY_TIMEOUT = 60.0
#: A client that reads nothing of its stream for this long has gone; its slots go back.
DEFAULT_STREAM_WRITE_TIMEOUT = 30.0
#: Connections per process; the file-descriptor limit may lower it (node.limits).
DEFAULT_MAX_CONNECTIONS = 10_000
#: Linux's default net.core.somaxconn since 5.4; larger values are capped by the kernel anyway.
DEFAULT_LISTEN_BACKLOG = 4096

#: Request headers no ``forward_headers`` may name: the client's credentials (the gateway's
#: own go upstream instead), cookies, hop-by-hop and framing headers, and the ones adapters set.
NEVER_FORWARDED = frozenset({
    "authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "host", "connection",
    "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "content-length", "content-type",
    "content-encoding", "accept", "accept-encoding", "expect", "x-request-id",
})

ProviderType = Literal["openai", "azure-openai", "anthropic", "gemini", "mock"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Model):
    """Upstream timeouts, in seconds."""

    connect: float = Field(5.0, gt=0, description="TCP+TLS connect, seconds")
    first_byte: float = Field(60.0, gt=0, description="until response headers, seconds")
    total: float = Field(600.0, gt=0, description="whole request incl. stream, seconds")
    stream_idle: float = Field(60.0, gt=0, description="max gap between stream chunks, seconds")


class MockSettings(_Model):
    """Behaviour of a ``mock`` provider: deterministic, for demos and tests."""

    latency_ms: float = Field(0.0, ge=0, description="delay before the first byte")
    chunk_delay_ms: float = Field(0.0, ge=0, description="delay between stream chunks")
    failure_rate: float = Field(0.0, ge=0, le=1, description="share of calls that fail")
    failure_status: int = Field(500, ge=400, le=599)
    #: ``http``: fail like a provider (an error status). ``exception``: raise as a bug would,
    #: to exercise the gateway's panic recovery.
    failure_mode: Literal["http", "exception"] = "http"
    reply: str | None = Field(None, description="fixed reply text; default echoes the prompt")
    embedding_dimensions: int = Field(8, ge=1, le=4096)


class ProviderConfig(_Model):
    type: ProviderType
    base_url: str | None = Field(None, description="upstream base URL; type default if unset")
    api_key: SecretStr | None = None
    #: A file holding the credential instead (a mounted Kubernetes Secret): read at start,
    #: and again on SIGHUP and ``hapax cluster reload``, so a rotated secret needs no restart.
    api_key_file: str | None = Field(None, description="path of a file holding the api_key")
    headers: dict[str, str] = Field(default_factory=dict, description="extra upstream headers")
    #: Client request headers passed on to this provider; unset means the type's default
    #: (``anthropic-beta`` for anthropic, ``openai-beta`` for openai and azure-openai).
    forward_headers: tuple[str, ...] | None = Field(None, description="client headers passed upstream")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    pool_size: int = Field(100, ge=1, le=10000, description="max pooled connections")
    api_version: str | None = Field(None, description="azure-openai api-version")
    anthropic_version: str = "2023-06-01"
    mock: MockSettings = Field(default_factory=MockSettings)
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if names is None:
            return None
        out = tuple(n.strip().lower() for n in names)
        for n in out:
            if n in NEVER_FORWARDED or n.startswith(("x-hapax-", "proxy-")):
                # The client's credential, hop-by-hop and framing headers never go upstream.
                raise ValueError(f"{n!r} cannot be forwarded: credentials, hop-by-hop and framing "
                                 "headers never leave the gateway")
        return out

    @model_validator(mode="after")
    def _check(self) -> ProviderConfig:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set api_key or api_key_file, not both")
        if self.type == "azure-openai" and not self.base_url:
            raise ValueError("azure-openai needs base_url (https://NAME.openai.azure.com)")
        if self.base_url and not re.match(r"^https?://[^\s/]+", self.base_url):
            # The value is not echoed: a key pasted into the wrong field must not reach a log.
            raise ValueError("base_url must be an http(s) URL such as https://api.example.com/v1")
        return self


class Deployment(_Model):
    """One place a public model can be served: a provider and its model name."""

    provider: str
    model: str = Field(description="the model name the provider knows")
    weight: float = Field(1.0, gt=0)
    priority: int = Field(0, ge=0, description="lower is tried first by failover")
    max_concurrency: int | None = Field(None, ge=1, description="calls in flight to this deployment")


class ModelConfig(_Model):
    name: str = Field(min_length=1, description="public model name clients send")
    aliases: tuple[str, ...] = ()
    provider: str | None = Field(None, description="shorthand for a single deployment")
    model: str | None = Field(None, description="upstream name for the shorthand")
    deployments: tuple[Deployment, ...] = ()
    owned_by: str = "hapax"
    #: Which name responses give in their ``model`` field: the public name the client sent
    #: (an alias included), or the upstream's own. ``x-hapax-upstream-model`` always has the latter.
    response_model: Literal["public", "upstream"] = Field(
        "public", description="model name in responses: the client's public name or the upstream's"
    )
    # Reliability (hapax.config._reliability): how deployments are chosen, limited, retried.
    strategy: str = Field("failover", description="load-balancing strategy over the deployments")
    max_concurrency: int | None = Field(None, ge=1, description="calls in flight for this model")
    retry: RetryConfig | None = Field(None, description="overrides reliability.retry for this model")

    _strategy = field_validator("strategy")(check_strategy)

    @model_validator(mode="after")
    def _one_form(self) -> ModelConfig:
        if self.provider and self.deployments:
            raise ValueError("give either provider/model or deployments, not both")
        if not self.provider and not self.deployments:
            raise ValueError("needs provider (and optional model) or deployments")
        if self.provider:
            dep = Deployment(provider=self.provider, model=self.model or self.name)
            object.__setattr__(self, "deployments", (dep,))
        return self


class CORSConfig(_Model):
    enabled: bool = False
    allow_origins: tuple[str, ...] = ("*",)
    allow_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")
    allow_headers: tuple[str, ...] = (
        "authorization",
        "content-type",
        "x-api-key",
        "anthropic-version",
        "x-request-id",
    )
    expose_headers: tuple[str, ...] = ("x-request-id", "server-timing")
    max_age: int = Field(600, ge=0, description="seconds")


#: aioquic's default; below the NAT bindings of common home routers (30 s+ for UDP is rare,
#: so clients send PINGs), above any pause between a client's requests on a busy link.
DEFAULT_HTTP3_IDLE_TIMEOUT = 60.0
#: Stream and connection windows: large enough that a 10 MiB body needs a few round trips,
#: not hundreds; a client can make the node buffer at most this per connection.
DEFAULT_HTTP3_MAX_STREAM_DATA = 1024 * 1024
DEFAULT_HTTP3_MAX_DATA = 4 * 1024 * 1024
#: Fits a 1,280-byte IPv6 minimum MTU path after the IP and UDP headers; larger is only
#: safe where every hop's MTU is known.
DEFAULT_HTTP3_MAX_DATAGRAM_SIZE = 1200


class Http3Config(_Model):
    """The HTTP/3 (QUIC) front door, beside the HTTP/1.1 one (``node.http3``)."""

    enabled: bool = False
    #: Defaults to ``server.host``; the UDP port defaults to ``server.port`` (TCP and UDP
    #: ports are separate, so both doors can share the number, as Alt-Svc's ``h3=":8080"`` says).
    host: str | None = None
    port: int | None = Field(None, ge=0, le=65535)
    #: PEM files; a change to either is picked up without a restart (new connections only).
    certificate_file: str | None = None
    key_file: str | None = None
    idle_timeout: float = Field(DEFAULT_HTTP3_IDLE_TIMEOUT, gt=0, description="seconds")
    #: Concurrent request streams a client may open on one connection (QUIC MAX_STREAMS).
    max_streams: int = Field(128, ge=1, le=100_000)
    #: Flow-control windows, bytes: per stream (``initial_max_stream_data``) and per connection.
    max_stream_data: int = Field(DEFAULT_HTTP3_MAX_STREAM_DATA, ge=16 * 1024)
    max_data: int = Field(DEFAULT_HTTP3_MAX_DATA, ge=16 * 1024)
    max_datagram_size: int = Field(DEFAULT_HTTP3_MAX_DATAGRAM_SIZE, ge=1200, le=65527)
    #: ``Alt-Svc: h3=":port"; ma=...`` on HTTP/1.1 responses; 0 turns the header off.
    alt_svc_max_age: int = Field(86_400, ge=0, description="seconds")
    #: The port Alt-Svc names, when clients reach the UDP port under another number (a
    #: Kubernetes Service mapping 443 to the pod's 8080); defaults to the port bound.
    advertise_port: int | None = Field(None, ge=1, le=65535)
    #: A request that is not safe to replay (anything but GET, HEAD, OPTIONS) arriving in 0-RTT
    #: early data: ``reject`` answers 425 Too Early (RFC 8470; the client retries after the
    #: handshake), ``hold`` waits for the handshake to finish, then serves it.
    early_data: Literal["reject", "hold"] = "reject"
    #: Session tickets are issued for resumption; ``false`` turns 0-RTT and resumption off.
    session_tickets: bool = True

    @model_validator(mode="after")
    def _check(self) -> Http3Config:
        if self.enabled and (self.certificate_file is None or self.key_file is None):
            raise ValueError("server.http3.enabled needs certificate_file and key_file (hapax certs dev writes a pair)")
        return self


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    shutdown_grace: float = Field(DEFAULT_SHUTDOWN_GRACE, ge=0, description="seconds")
    #: On SIGTERM, report not-ready but keep accepting for this long, so load balancers
    #: stop sending before the listener closes. 0 on a laptop; a few seconds in Kubernetes.
    drain_delay: float = Field(0.0, ge=0, description="seconds")
    cors: CORSConfig = Field(default_factory=CORSConfig)
    reload_interval: float = Field(2.0, gt=0, description="config file poll period, seconds")
    # The front door's connection limits (node.protocol): a connection can idle, send its
    # head, send its body and leave its response unread each only for so long.
    keepalive_timeout: float = Field(DEFAULT_KEEPALIVE_TIMEOUT, gt=0, description="idle connection, seconds")
    header_timeout: float = Field(DEFAULT_HEADER_TIMEOUT, gt=0, description="request line and headers, seconds")
    body_timeout: float = Field(DEFAULT_BODY_TIMEOUT, gt=0, description="whole request body, seconds")
    stream_write_timeout: float = Field(
        DEFAULT_STREAM_WRITE_TIMEOUT, gt=0, description="a response the client does not read, seconds"
    )
    max_connections: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1, description="open client connections")
    #: Connections the kernel queues before accept(); the kernel caps it at net.core.somaxconn.
    #: 1,024 overflowed when 2,000 streams arrived together (SYNs dropped, 1/3/7 s retries).
    listen_backlog: int = Field(DEFAULT_LISTEN_BACKLOG, ge=1, description="pending connections")
    #: Processes serving the port (SO_REUSEPORT), or ``auto``: one per core the node may run on.
    #: Above 1 it needs ``state.redis.url``; read at start-up only (``--workers`` overrides it).
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(1, description="processes, or auto")
    http3: Http3Config = Field(default_factory=Http3Config)


#: Long enough that renewal (every third of it) survives a busy loop or a Redis blip;
#: short enough that a crashed worker's slots are back within half a minute.
DEFAULT_LEASE_SECONDS = 30.0


class RedisConfig(_Model):
    #: ``redis://``, ``rediss://`` (TLS) or ``unix://``; ``None`` keeps state in the process.
    url: str | None = None
    #: Overrides a password in the URL; kept out of logs.
    password: SecretStr | None = None
    #: CA bundle for ``rediss://`` servers signed by a private CA.
    tls_ca_file: str | None = None
    #: Prefix of every key, before the cluster name: ``{key_prefix}:{cluster}:...``.
    key_prefix: str = Field("hapax", pattern=r"^[A-Za-z0-9_.-]+$")
    #: Every Redis call is bounded; past this it counts as Redis being down.
    timeout: float = Field(0.25, gt=0, description="seconds")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class StateConfig(_Model):
    """Where shared state lives: in the process (the default) or in Redis."""

    #: Nodes and workers with the same Redis and cluster name share limits, budgets, slots
    #: and health; another cluster name on the same Redis touches none of their keys.
    cluster: str = Field("hapax", pattern=r"^[A-Za-z0-9_.-]+$")
    redis: RedisConfig = Field(default_factory=RedisConfig)
    #: With Redis unreachable: ``fail_open`` checks limits locally (each shared limit divided
    #: by the live worker count), ``fail_closed`` refuses with 429 ``state_unavailable``.
    #: A scope's ``limits.on_redis_failure`` overrides it.
    on_redis_failure: Literal["fail_open", "fail_closed"] = "fail_open"
    #: Concurrency slots and budget reservations are leases renewed while a call runs; a
    #: process that dies holding them gives them back within this many seconds.
    lease_seconds: float = Field(DEFAULT_LEASE_SECONDS, gt=0, description="seconds")


class EtcdConfig(_Model):
    """How a node reaches etcd, where a cluster keeps its config, keys, members and leader."""

    #: ``http://host:2379`` or ``https://host:2379``; empty keeps the node on its own config.
    endpoints: tuple[str, ...] = ()
    #: etcd's own authentication; the password is kept out of logs.
    username: str | None = None
    password: SecretStr | None = None
    #: TLS: a CA bundle for the server's certificate, and a client certificate and key.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: Every etcd call is bounded; past this it counts as etcd being unreachable.
    timeout: float = Field(2.0, gt=0, description="seconds")

    @field_validator("endpoints")
    @classmethod
    def _endpoint_scheme(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for e in v:
            if not e.startswith(("http://", "https://")):
                raise ValueError(f"{e!r} must start with http:// or https://")
        return v


class ClusterConfig(_Model):
    """Cluster mode: nodes sharing one etcd (and the Redis of ``state``) act as one gateway.

    The cluster's name is ``state.cluster``, shared by its etcd and Redis keys.
    """

    etcd: EtcdConfig = Field(default_factory=EtcdConfig)
    #: This node's name among the cluster's members; by default ``<hostname>-<port>`` (and
    #: ``-w<N>`` for worker N of several), which stays the same across a restart.
    node_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    #: ``host:port`` where peers and operators reach this node (``hapax cluster status`` lists
    #: it); by default ``server.host`` (the host name when that is a wildcard) and ``server.port``.
    advertise_address: str | None = None
    #: The node's etcd lease: a dead node's record and leadership vanish this long after its last
    #: keep-alive, so a killed leader is replaced within it (plus etcd's expiry check, <= 0.5 s).
    lease_ttl: int = Field(5, ge=2, le=300, description="seconds")


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True
    #: Prompt and completion bodies are private; they reach logs only when asked.
    log_bodies: bool = False


class Config(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: tuple[ModelConfig, ...] = ()
    # Access control (hapax.config._access): who may call, how much, at what price, recorded where.
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: GlobalLimits = Field(default_factory=GlobalLimits)
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    pricing: dict[str, ModelPrice] = Field(default_factory=dict, description="per public or upstream model")
    audit: AuditConfig = Field(default_factory=AuditConfig)
    usage: UsageConfig = Field(default_factory=UsageConfig)
    reliability: ReliabilityConfig = Field(default_factory=ReliabilityConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        found = _cross_findings(
            [(i, m.name, m.aliases, tuple(d.provider for d in m.deployments)) for i, m in enumerate(self.models)],
            set(self.providers),
            keys_without_a_way_in=self.auth.mode == "keys" and self.auth.admin_key is None
            and self.auth.state_dir is None,
        )
        if found:
            raise ValueError("\n".join(found))  # one finding per line: parse_config splits them
        return self


def _cross_findings(
    models: list[tuple[int, str, tuple[str, ...], tuple[str, ...]]],
    providers: set[str] | None,
    *,
    keys_without_a_way_in: bool,
) -> list[str]:
    """Checks across sections, on (index, name, aliases, providers used) per model.

    Shared by the validator and by ``parse_config`` when other keys are invalid too,
    so one run of ``hapax config validate`` reports these with the rest.
    """
    found: list[str] = []
    seen: dict[str, str] = {}
    for i, name, aliases, used in models:
        for provider in used:
            if providers is not None and provider not in providers:
                found.append(f"models[{i}] ({name}): unknown provider {provider!r}; defined: {sorted(providers)}")
        for public in (name, *aliases):
            if public in seen:
                found.append(f"models[{i}]: name {public!r} is already used by {seen[public]!r}")
            seen[public] = name
    if keys_without_a_way_in:
        # No admin key to mint keys with and no store the CLI could mint into:
        # every call would be refused, forever.
        found.append(
            "auth: mode keys needs auth.admin_key or auth.state_dir (a key store); "
            "with neither, no key can ever be made"
        )
    return found


def _raw_cross_findings(data: dict[str, Any]) -> list[str]:
    """``_cross_findings`` on a document that failed validation: whatever parts have the right shape."""

    def strs(v: Any) -> tuple[str, ...]:
        return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list | tuple) else ()

    raw_providers = data.get("providers")
    providers = {str(k) for k in raw_providers} if isinstance(raw_providers, dict) else None
    models = []
    raw_models = data.get("models")
    for i, m in enumerate(raw_models if isinstance(raw_models, list) else ()):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            continue
        used = strs([m.get("provider")])
        deps = m.get("deployments")
        used += strs([d.get("provider") for d in deps if isinstance(d, dict)] if isinstance(deps, list) else [])
        models.append((i, m["name"], strs(m.get("aliases")), used))
    auth = data.get("auth") if isinstance(data.get("auth"), dict) else {}
    assert isinstance(auth, dict)
    return _cross_findings(models, providers, keys_without_a_way_in=auth.get("mode") == "keys"
                           and auth.get("admin_key") is None and auth.get("state_dir") is None)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

#: Stands for a value whose environment variable is unset: its key is left out, so the
#: rest of the document can still be checked (and the CLI can work without the secret).
_MISSING: Any = object()

#: Problems reported in one run; a file with more has a bigger problem than its details.
MAX_PROBLEMS = 50


def _expand(value: Any, env: Mapping[str, str], path: str, missing: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        unset: list[str] = []

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            unset.append(name)
            return ""

        out = _VAR.sub(sub, value) if "$" in value else value
        if unset:
            missing.extend((path, f"environment variable {name} is not set") for name in unset)
            return _MISSING
        return out
    if isinstance(value, dict):
        items = ((k, _expand(v, env, f"{path}.{k}" if path else str(k), missing)) for k, v in value.items())
        return {k: v for k, v in items if v is not _MISSING}
    if isinstance(value, list):
        return [v for v in (_expand(v, env, f"{path}[{i}]", missing) for i, v in enumerate(value))
                if v is not _MISSING]
    return value


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The config class found at ``loc`` (``("models", 0)`` is ``ModelConfig``), if any."""
    tp: Any = Config
    for part in loc:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if not isinstance(part, str) or part not in tp.model_fields:
                return None
            tp = tp.model_fields[part].annotation
        else:
            tp = _element(tp)
        tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """``X | None`` is ``X``."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (Union, UnionType) and len(args) == 1:
        return args[0]
    return tp


def _element(tp: Any) -> Any:
    """The type of an item of ``tuple[X, ...]``, ``list[X]`` or the value of ``dict[str, X]``."""
    args = get_args(tp)
    if not args:
        return None
    return args[0] if get_origin(tp) is tuple else args[-1]


def _suggest(loc: tuple[int | str, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _problems(err: Any) -> list[tuple[str, str]]:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        return [(_loc(loc), "unknown key" + _suggest(loc))]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "required key is missing"
    # A cross-check reports each of its findings on a line of its own.
    return [(_loc(loc), line) for line in msg.split("\n")]


def parse_config(
    data: Any, *, env: Mapping[str, str] | None = None, require_env: bool = True
) -> Config:
    """Validate a loaded YAML document; raise ``ConfigError`` listing every problem found.

    ``require_env=False`` leaves out the values whose environment variables are unset
    instead of failing (the local ``hapax keys`` commands need no secrets).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping (key: value lines) at the top level")
    missing: list[tuple[str, str]] = []
    expanded = _expand(data, os.environ if env is None else env, "", missing)
    problems = list(missing) if require_env else []
    try:
        cfg = Config.model_validate(expanded)
    except ValidationError as exc:
        unset = {p for p, _ in missing}
        for err in exc.errors():
            # A key left out for its unset variable is already reported once.
            problems.extend(p for p in _problems(err) if p[0] not in unset)
        if not any(err["loc"] == () for err in exc.errors()):  # the cross-check did not run
            problems.extend(("", f) for f in _raw_cross_findings(expanded))
        cfg = None
    if problems:
        problems = problems[:MAX_PROBLEMS]
        raise ConfigError(problems[0][1], path=problems[0][0], problems=problems) from None
    assert cfg is not None
    return cfg


def load_config(
    path: str | Path, *, env: Mapping[str, str] | None = None, require_env: bool = True
) -> Config:
    """Read, parse and validate a config file; any problem is a ``ConfigError``, never another exception.

    An empty file (or one of only comments) is an error rather than an empty config:
    a file caught mid-write must not replace a good config with one that has no models.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return config_from_bytes(raw, env=env, require_env=require_env)


def config_from_bytes(raw: bytes, *, env: Mapping[str, str] | None = None, require_env: bool = True) -> Config:
    """``load_config`` for bytes already read (a source that digests what it parsed)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the file is not UTF-8 text (a bad byte at offset {exc.start})") from None
    if not text.strip():
        raise ConfigError("the file is empty")
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise ConfigError(f"invalid YAML: nested too deep (more than {MAX_FLOW_DEPTH} levels of [ or {{)")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deep") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # PyYAML's constructors raise these for values such as a date 2024-13-45.
        raise ConfigError(f"invalid YAML value: {exc}") from None
    if data is None:
        raise ConfigError("the file holds no settings (only comments or blank lines)")
    try:
        return parse_config(data, env=env, require_env=require_env)
    except RecursionError:
        raise ConfigError("the config is nested too deep") from None


#: A config is about six levels deep. PyYAML's scanner is quadratic in flow nesting
#: (5,000 levels take seconds of CPU before its RecursionError), so deeper files are
#: refused before it runs.
MAX_FLOW_DEPTH = 100
_BRACKETS = re.compile(r"[\[\]{}]")


def _flow_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting in ``text``; quotes are not parsed (brackets inside
    strings count too, which only errs towards refusing a file no one writes)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(text):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
            depth -= 1
    return deepest


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    PyYAML keeps the last one silently: a second ``providers:`` block would throw
    the first away without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            # Plain keys only; a '<<' merge may be overridden by the mapping's own keys, by design.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key_node.value!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


#: PyYAML's wording, said the way an operator reads it.
_YAML_WORDS = {
    "mapping values are not allowed here": "a ':' where no key can start (a value with ': ' needs quotes, "
    "or the indentation is off)",
    "found character '\\t' that cannot start any token": "a tab: YAML indents with spaces",
    "could not find expected ':'": "a key without ':' (or an unclosed quote)",
    "found unexpected end of stream": "the file ends inside a quote or bracket",
    "expected <block end>, but found '<block sequence start>'": "a list item ('- ') indented differently "
    "from the items before it",
    "expected ',' or '}', but got '<stream end>'": "a '{' is never closed",
    "expected ',' or ']', but got '<stream end>'": "a '[' is never closed",
    "found undefined alias": "an alias (*name) with no anchor (&name)",
}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what is wrong (``line 3, column 8: ...``), without PyYAML's quote of the line.

    That quote goes to the log (a rejected reload) and may hold a literal api_key.
    """
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    problem = exc.problem or ""
    for words, plain in _YAML_WORDS.items():
        if problem.startswith(words):
            problem = plain
            break
    what = problem or "syntax error"
    if exc.context:
        what += f" ({exc.context})"
    mark = exc.problem_mark or exc.context_mark
    if mark is not None:
        what = f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return what


def config_findings(cfg: Config) -> list[tuple[Literal["error", "warning"], str]]:
    """What makes a valid config unlikely to do what its author wants, as (severity, message).

    Not raised by ``load_config``: the embedded default, tests and a node being emptied on
    purpose build such configs, and a reload must not be refused for them. ``hapax config
    validate`` exits 1 on an ``error`` (and on a ``warning`` with ``--strict``); ``hapax
    serve`` logs every finding as a warning at start-up and on each reload.
    """
    out: list[tuple[Literal["error", "warning"], str]] = []
    if not cfg.models:
        out.append(("error", "models: none configured; every model call would answer 404"))
    if cfg.auth.mode == "keys" and cfg.auth.state_dir is None:
        out.append(("warning", "auth.state_dir: unset with auth.mode keys; API keys, usage and audit "
                               "live in memory and die with the process"))
    if cfg.auth.mode == "none":
        out.append(("warning", "auth.mode: none; anyone who can reach the port can call every model"))
    return out


def default_config() -> Config:
    """The embedded default: one node, memory state, a demo ``mock`` provider."""
    return parse_config(
        {
            "providers": {"mock": {"type": "mock", "mock": {"chunk_delay_ms": 20}}},
            "models": [
                {"name": "hapax-demo", "provider": "mock"},
                {"name": "hapax-demo-embed", "provider": "mock"},
            ],
        }
    )


def config_schema() -> dict[str, Any]:
    return Config.model_json_schema()
