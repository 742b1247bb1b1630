"""From a resolved model to a provider's reply: pick a deployment and call it.

Theory of operation: ``Dispatcher.send`` gets the runtime in force, the
public model's config, the client's operation and body. It chooses a
deployment, translates the operation if that deployment's provider does not
take it, calls the provider, and returns the reply together with what it
chose, so the gateway can translate the reply back and label its metrics.

Today it calls the first deployment once. Retries, failover, circuit breakers,
load balancing and admission queueing belong here (issue [2]).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ._config import Deployment, ModelConfig
from ._errors import InvalidField
from ._exchange import Exchange
from ._runtime import Runtime
from ._translate import Translation, find_translation
from .providers import Call, Operation, Provider, Reply


@dataclass(slots=True)
class Dispatched:
    reply: Reply
    deployment: Deployment
    provider: Provider
    translation: Translation | None
    #: perf_counter when the answering attempt started; upstream time counts from here.
    started: float


class Dispatcher:
    async def send(
        self, rt: Runtime, model: ModelConfig, op: Operation, body: dict[str, Any], ex: Exchange
    ) -> Dispatched:
        dep = model.deployments[0]
        provider = rt.providers[dep.provider]
        ex.provider = dep.provider
        translation, call = prepare_call(provider, dep, op, body, ex)
        t0 = time.perf_counter()
        ex.attempts += 1
        try:
            reply = await provider.send(call)
        finally:
            ex.upstream_seconds = time.perf_counter() - t0
        return Dispatched(reply, dep, provider, translation, t0)


def prepare_call(
    provider: Provider, dep: Deployment, op: Operation, body: dict[str, Any], ex: Exchange
) -> tuple[Translation | None, Call]:
    """The call to make on ``provider``, translating the operation when it must."""
    translation: Translation | None = None
    target = op
    if op not in provider.operations:
        translation = find_translation(op, provider.operations)
        if translation is None:
            raise InvalidField(
                f"model '{body.get('model')}' does not support {op.value}",
                param="model",
                code="unsupported_operation",
            )
        target = translation.target
    upstream_body = translation.request(body) if translation else dict(body)
    upstream_body["model"] = dep.model
    stream = bool(body.get("stream"))
    return translation, Call(op=target, body=upstream_body, stream=stream, request_id=ex.request_id)
