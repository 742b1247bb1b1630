"""The one exception tree of Hapax.

Every failure a client can see is a ``HapaxError`` subclass with a class-level
HTTP status, OpenAI error ``type`` and stable ``code``. They are rendered to
JSON at exactly one boundary (``hapax.api._error_shape``), in OpenAI or Anthropic shape.

    HapaxError
    ├── ClientError                 4xx: the caller can fix it
    │   ├── BadRequest              400 invalid_request_error
    │   │   ├── InvalidJSON
    │   │   ├── InvalidField        (param names the field)
    │   │   └── RequestTooComplex   too deep, too many values or messages to handle cheaply
    │   ├── AuthenticationFailed    401
    │   ├── PermissionDenied        403
    │   ├── NotFound                404
    │   │   ├── ModelNotFound
    │   │   └── RouteNotFound
    │   ├── MethodNotAllowed        405
    │   ├── RequestTimeout          408 (head or body too slow)
    │   │   └── ClientWriteTimeout  the client stopped reading its response
    │   ├── PayloadTooLarge         413
    │   ├── UnsupportedMediaType    415
    │   ├── TooEarly                425 a non-idempotent request in TLS early data (HTTP/3 0-RTT)
    │   └── RateLimited             429 (retry_after)
    │       └── QuotaExceeded       429 insufficient_quota: a token quota or USD budget
    ├── UpstreamError               remote faults, after the gateway tried
    │   ├── UpstreamBadRequest      4xx the provider blamed on the request
    │   ├── UpstreamRateLimited     429
    │   ├── UpstreamUnavailable     502 connect/reset/5xx/malformed
    │   │   └── UpstreamMisconfigured   502 the provider has no such route (a wrong base_url)
    │   ├── UpstreamTimeout         504
    │   └── NoHealthyUpstream       503
    ├── ServiceUnavailable          503 (draining, no config)
    │   ├── TooManyConnections      server.max_connections reached, none idle
    │   ├── ShuttingDown            a stream cut at the end of the shutdown grace
    │   ├── KeyStoreUnavailable     Redis or etcd did not confirm a key write
    │   └── UsageStoreUnavailable   Redis did not answer a usage read
    └── InternalError               500 a bug; the process lives on

Programmer misuse (a provider registered twice, say) raises ``RuntimeError``
subclasses instead, which never reach a client as anything but a 500.
"""

from __future__ import annotations

from typing import ClassVar


class HapaxError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str] = "internal_error"
    #: Anthropic's name for the same class of error, for /v1/messages.
    anthropic_type: ClassVar[str] = "api_error"
    #: Set when the dispatcher gave up: (deployment, code, status) of each failed attempt,
    #: and the seconds spent upstream, for the error's headers and body.
    tried: tuple[tuple[str, str, int], ...] = ()
    upstream_seconds: float = 0.0

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.code = code  # type: ignore[misc]
        if status is not None:
            self.status = status  # type: ignore[misc]


class ClientError(HapaxError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    anthropic_type = "invalid_request_error"


class BadRequest(ClientError):
    pass


class InvalidJSON(BadRequest):
    code = "invalid_json"


class InvalidField(BadRequest):
    code = "invalid_value"


class RequestTooComplex(BadRequest):
    """Legal JSON the gateway refuses: parsing or walking it would stall every other request."""

    code = "request_too_complex"


class AuthenticationFailed(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    anthropic_type = "authentication_error"


class PermissionDenied(ClientError):
    status = 403
    type = "permission_error"
    code = "permission_denied"
    anthropic_type = "permission_error"


class NotFound(ClientError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    anthropic_type = "not_found_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RouteNotFound(NotFound):
    code = "route_not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(ClientError):
    status = 408
    type = "timeout_error"
    code = "request_timeout"
    anthropic_type = "timeout_error"


class ClientWriteTimeout(RequestTimeout):
    code = "client_write_timeout"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"
    anthropic_type = "request_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"


class TooEarly(ClientError):
    """RFC 8470: the request came in 0-RTT early data, which an attacker may replay; the
    client retries it after the handshake (HTTP/3 with ``server.http3.early_data: reject``)."""

    status = 425
    code = "too_early"


class RateLimited(ClientError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    anthropic_type = "rate_limit_error"


class QuotaExceeded(RateLimited):
    """A daily/monthly token quota or USD budget is used up (OpenAI answers 429 too)."""

    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(HapaxError):
    status = 502
    type = "api_error"
    code = "upstream_error"
    anthropic_type = "api_error"

    #: Whether another attempt (same or other deployment) may succeed.
    retryable: ClassVar[bool] = True


class UpstreamBadRequest(UpstreamError):
    """The provider rejected the request itself; retrying elsewhere will not help."""

    status = 400
    type = "invalid_request_error"
    code = "upstream_bad_request"
    anthropic_type = "invalid_request_error"
    retryable = False


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"
    anthropic_type = "rate_limit_error"


class UpstreamUnavailable(UpstreamError):
    status = 502
    code = "upstream_unavailable"


MISCONFIGURED = "upstream_misconfigured"


class UpstreamMisconfigured(UpstreamUnavailable):
    """The provider answered 404 for the API route itself: its ``base_url`` is wrong.

    Not the request's fault (another deployment may serve it), and not the model's.
    """

    code = MISCONFIGURED


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"
    anthropic_type = "timeout_error"


class NoHealthyUpstream(UpstreamError):
    status = 503
    code = "no_healthy_upstream"
    anthropic_type = "overloaded_error"


class ServiceUnavailable(HapaxError):
    status = 503
    type = "api_error"
    code = "service_unavailable"
    anthropic_type = "overloaded_error"


class TooManyConnections(ServiceUnavailable):
    code = "too_many_connections"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class KeyStoreUnavailable(ServiceUnavailable):
    """A key write the shared store (Redis, or etcd in a cluster) did not confirm."""

    code = "key_store_unavailable"


class UsageStoreUnavailable(ServiceUnavailable):
    """The shared usage ledger (Redis) did not answer a read."""

    code = "usage_store_unavailable"


class InternalError(HapaxError):
    status = 500
    code = "internal_error"


class ConfigError(Exception):
    """A config file that cannot be used; ``path`` names the key (``providers.x.base_url``).

    ``problems`` holds every problem found, as ``(path, message)`` pairs, first one
    first; ``str(exc)`` joins them, so a rejected reload's one log line says it all.
    """

    def __init__(self, message: str, *, path: str = "", problems: list[tuple[str, str]] | None = None) -> None:
        self.problems = problems or [(path, message)]
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in self.problems))
        self.path = path
        self.reason = message
