"""Hapax: the core of an LLM gateway. What a request means; no sockets of its own."""

from ._config import Config, config_schema, default_config, load_config, parse_config
from ._errors import ConfigError, HapaxError
from ._gateway import AccessSink, Gateway, LoggingAccessSink
from ._http import Request, Response
from ._metrics import GatewayMetrics
from ._transport import (
    ConnectError,
    ConnectTimeout,
    FirstByteTimeout,
    ReadError,
    StreamIdleTimeout,
    TotalTimeout,
    Transport,
    TransportError,
    UpstreamRequest,
    UpstreamResponse,
)

__version__ = "0.1.0"

__all__ = [
    "AccessSink",
    "Config",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "FirstByteTimeout",
    "Gateway",
    "GatewayMetrics",
    "HapaxError",
    "LoggingAccessSink",
    "ReadError",
    "Request",
    "Response",
    "StreamIdleTimeout",
    "TotalTimeout",
    "Transport",
    "TransportError",
    "UpstreamRequest",
    "UpstreamResponse",
    "__version__",
    "config_schema",
    "default_config",
    "load_config",
    "parse_config",
]
