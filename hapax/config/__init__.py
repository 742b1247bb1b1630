"""The config schema: one validated, immutable ``Config`` and the sections it is made of.

The lowest layer of the core besides the shared base modules: every other package reads its
settings from here, so nothing here imports them (see docs/architecture.md).
"""

from __future__ import annotations

from ._access import AuditConfig, AuthConfig, Budget, GlobalLimits, ModelPrice, RateLimits, TeamConfig, UsageConfig
from ._config import (
    ClusterConfig,
    Config,
    CORSConfig,
    Deployment,
    EtcdConfig,
    Http3Config,
    LoggingConfig,
    MockSettings,
    ModelConfig,
    ProviderConfig,
    RedisConfig,
    ServerConfig,
    StateConfig,
    Timeouts,
    config_findings,
    config_from_bytes,
    config_schema,
    default_config,
    load_config,
    parse_config,
)
from ._reliability import (
    AdmissionConfig,
    BreakerConfig,
    DedupConfig,
    HealthCheckConfig,
    ReliabilityConfig,
    RetryConfig,
)
from ._secrets import Secrets, read_api_key_files
from ._source import ConfigEvent, ConfigRejected, ConfigSnapshot, ConfigSource, Revisions, digest_of

__all__ = [
    "AdmissionConfig",
    "AuditConfig",
    "AuthConfig",
    "BreakerConfig",
    "Budget",
    "CORSConfig",
    "ClusterConfig",
    "Config",
    "ConfigEvent",
    "ConfigRejected",
    "ConfigSnapshot",
    "ConfigSource",
    "DedupConfig",
    "Deployment",
    "EtcdConfig",
    "GlobalLimits",
    "HealthCheckConfig",
    "Http3Config",
    "LoggingConfig",
    "MockSettings",
    "ModelConfig",
    "ModelPrice",
    "ProviderConfig",
    "RateLimits",
    "RedisConfig",
    "ReliabilityConfig",
    "RetryConfig",
    "Revisions",
    "Secrets",
    "ServerConfig",
    "StateConfig",
    "TeamConfig",
    "Timeouts",
    "UsageConfig",
    "config_findings",
    "config_from_bytes",
    "config_schema",
    "default_config",
    "digest_of",
    "load_config",
    "parse_config",
    "read_api_key_files",
]
