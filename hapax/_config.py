"""Configuration: typed, validated, immutable.

Theory of operation: a config file is YAML. Strings may hold ``${VAR}`` or
``${VAR:-default}``; these are expanded from the environment *after* YAML
parsing, so a value can never change the document's structure. Unknown keys
are errors that name their path. A validated ``Config`` is frozen; a reload
builds a new one and swaps it in whole.

Units are in field names or docstrings: seconds unless ``_ms``/``_bytes``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ._access_config import AuditConfig, AuthConfig, GlobalLimits, ModelPrice, TeamConfig, UsageConfig
from ._errors import ConfigError
from ._reliability_config import HealthCheckConfig, ReliabilityConfig, RetryConfig, check_strategy

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
    # Reliability (hapax._reliability_config): how deployments are chosen, limited, retried.
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
    # Access control (hapax._access_config): who may call, how much, at what price, recorded where.
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: GlobalLimits = Field(default_factory=GlobalLimits)
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    pricing: dict[str, ModelPrice] = Field(default_factory=dict, description="per public or upstream model")
    audit: AuditConfig = Field(default_factory=AuditConfig)
    usage: UsageConfig = Field(default_factory=UsageConfig)
    reliability: ReliabilityConfig = Field(default_factory=ReliabilityConfig)

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        seen: dict[str, str] = {}
        for i, m in enumerate(self.models):
            for dep in m.deployments:
                if dep.provider not in self.providers:
                    raise ValueError(
                        f"models[{i}] ({m.name}): unknown provider {dep.provider!r}; "
                        f"defined: {sorted(self.providers)}"
                    )
            for public in (m.name, *m.aliases):
                if public in seen:
                    raise ValueError(f"models[{i}]: name {public!r} is already used by {seen[public]!r}")
                seen[public] = m.name
        return self


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, env: Mapping[str, str], path: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"environment variable {name} is not set", path=path)

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_config(data: Any, *, env: Mapping[str, str] | None = None) -> Config:
    """Validate a loaded YAML document; raise ``ConfigError`` naming the first bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping at the top level")
    expanded = _expand(data, os.environ if env is None else env, "")
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(msg.removeprefix("Value error, "), path=_loc(err["loc"])) from None


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {_yaml_problem(exc)}") from None
    return parse_config(data, env=env)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's quote of the offending line.

    That quote goes to the log (a rejected reload) and may hold a literal api_key.
    """
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    what = " ".join(p for p in (exc.context, exc.problem) if p) or "syntax error"
    mark = exc.problem_mark or exc.context_mark
    if mark is not None:
        what += f" (line {mark.line + 1}, column {mark.column + 1})"
    return what


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
