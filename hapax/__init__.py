"""Hapax: the core of an LLM gateway. What a request means; no sockets of its own."""

from ._access_log import AccessSink, LoggingAccessSink
from ._errors import (
    MISCONFIGURED,
    ClientWriteTimeout,
    ConfigError,
    HapaxError,
    KeyStoreUnavailable,
    PayloadTooLarge,
    RequestTimeout,
    ShuttingDown,
    TooEarly,
    UpstreamError,
)
from ._exchange import Exchange
from ._http import Request, Response
from ._metrics import Exposition, GatewayMetrics, freeze_gc
from ._pipeline import Gateway
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
from ._version import __version__
from .config import Config, config_schema, default_config, load_config, parse_config

__all__ = [
    "MISCONFIGURED",
    "AccessSink",
    "ClientWriteTimeout",
    "Config",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "Exchange",
    "Exposition",
    "FirstByteTimeout",
    "Gateway",
    "GatewayMetrics",
    "HapaxError",
    "KeyStoreUnavailable",
    "LoggingAccessSink",
    "PayloadTooLarge",
    "ReadError",
    "Request",
    "RequestTimeout",
    "Response",
    "ShuttingDown",
    "StreamIdleTimeout",
    "TooEarly",
    "TotalTimeout",
    "Transport",
    "TransportError",
    "UpstreamError",
    "UpstreamRequest",
    "UpstreamResponse",
    "__version__",
    "config_schema",
    "default_config",
    "freeze_gc",
    "load_config",
    "parse_config",
]
