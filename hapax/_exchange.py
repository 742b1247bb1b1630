"""The record of one request as it moves through the pipeline."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._errors import HapaxError
from ._usage import Usage


@dataclass(slots=True)
class Exchange:
    """What one request did; filled in as it goes, logged and counted at the end."""

    request_id: str
    route: str
    method: str
    path: str
    remote: str
    started: float = field(default_factory=time.perf_counter)
    #: The front door's protocol (``h1``, ``h3``), from ``Request.protocol``.
    protocol: str = "h1"
    model: str = ""
    provider: str = ""
    #: The deployment (``provider/model``) of the last attempt, and its upstream model name.
    deployment: str = ""
    upstream_model: str = ""
    #: Whether the client asked for a stream.
    stream: bool = False
    status: int = 0
    upstream_seconds: float = 0.0
    ttft: float | None = None
    usage: Usage | None = None
    error: HapaxError | None = None
    anthropic: bool = False
    #: With ``logging.log_bodies``: the request body and (non-streamed) response body, for the
    #: access line. Empty otherwise: prompts are private by default.
    request_body: bytes = b""
    response_body: bytes = b""
    #: Attempts made upstream (retries and failovers included).
    attempts: int = 0
    #: Who called: a key's id, or "anonymous" when auth is off.
    principal: str = "anonymous"
    #: Queue priority, 0 most urgent: ``x-hapax-priority`` capped by what the caller may ask.
    priority: int = 5
    #: Whether this request may share an identical concurrent request's upstream call
    #: (``x-hapax-dedup: off`` says no).
    dedup: bool = True
    #: The request's dedup key once computed (a hash of the whole body): the shared dedup's
    #: claim and the dispatch both need it, and it is computed once.
    dedup_key: str | None = None
    #: The caller's team, when their key has one.
    team: str = ""
    #: The caller's key's name (for the access log), when they called with a stored key.
    key_name: str = ""
    #: US dollars this call cost, once settled.
    cost_usd: float | None = None
    #: The caller's ``x-ratelimit-*`` headers once admission looked at its limits: they go
    #: on the answer whatever it is (a 429 included), as OpenAI sends them.
    ratelimit_headers: dict[str, str] | None = None
    #: The client's request headers, for the few a provider's ``forward_headers`` passes on.
    client_headers: Mapping[str, str] = field(default_factory=dict)
