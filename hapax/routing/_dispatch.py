"""From a resolved model to a provider's reply: admit, pick a deployment, call, retry.

Theory of operation: ``Dispatcher.send`` gets the runtime in force, the public
model's config, the client's operation and body. It returns as soon as a reply
has *started* (a JSON body read, or a stream's first event), together with the
deployment that gave it, so the gateway can translate the reply back and
label its metrics. Everything that can still be undone happens before that
point; nothing is retried after it. The layers, outermost first:

1. **Dedup** (``hapax.state._dedup``): identical concurrent non-streaming requests of
   one caller share one pass through the layers below.
2. **Admission** (``hapax.state._slots``): a slot under the node's and the
   model's concurrency limits, or a wait in the priority queue.
3. **Attempts**: the healthy deployments (breaker lets calls through, not
   cooling down after a 429, provider's probe not failing) ordered by the
   model's strategy (``hapax.routing._balancer``), untried ones first. Each attempt
   takes a deployment slot (a full deployment is skipped; if all are full the
   request queues for whichever frees first), a breaker permit, and calls the
   provider, translating the operation when the provider does not take it.
   For streams the first event is awaited (and must be JSON) before
   returning, so a stream that fails at once still fails over.
4. After a failure, ``hapax.routing._retry.RetryPlan`` decides: fail over to an
   untried deployment at once, retry a tried one after backoff, or give up
   and raise the last error.

Every slot, permit and in-flight count taken for the answering attempt is
given back when the reply ends: at once for JSON, when the gateway closes the
stream for streams (``StreamReply.close``). Each outer layer gives back what it
took on any exception, cancellation included (the client hung up).

Policies are pure and clocked by ``clock`` (monotonic seconds); this module
only awaits and counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import orjson

from .._errors import (
    MISCONFIGURED,
    HapaxError,
    InvalidField,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from .._exchange import Exchange
from .._metrics import GatewayMetrics
from .._usage import Usage
from ..api import Translation, find_translation
from ..config import Deployment, ModelConfig
from ..providers import (
    Call,
    JsonReply,
    Operation,
    Provider,
    Reply,
    StreamReply,
    has_provider_headers,
)
from ..state import (
    GLOBAL,
    Codec,
    HealthNews,
    HealthNewsBus,
    InFlight,
    LocalHealthNews,
    MemoryInFlight,
    Slot,
    SlotGate,
    Slots,
    dedup_key,
    overload_error,
)
from ._balancer import Strategy, ewma
from ._breaker import Permit
from ._health import HealthStore, MemoryHealthStore, Prober
from ._health_report import HealthReport
from ._retry import GiveUp, RetryPlan, retry_after_of
from ._table import _Candidate

if TYPE_CHECKING:
    from ._runtime import Runtime

log = logging.getLogger("hapax.dispatch")

#: Event-loop timers may fire a millisecond early against the monotonic clock; waiting for
#: a deployment's cool-down to end, wake just after it rather than just before.
TIMER_SLACK = 0.005


@dataclass(slots=True)
class Dispatched:
    reply: Reply
    deployment: Deployment
    provider: Provider
    translation: Translation | None
    #: perf_counter when the first attempt started; upstream time counts from here.
    started: float
    #: Response headers that say how the reply was obtained.
    headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 1
    upstream_seconds: float = 0.0


class Dispatcher(HealthReport):
    def __init__(
        self,
        *,
        metrics: GatewayMetrics | None = None,
        health: HealthStore | None = None,
        in_flight: InFlight | None = None,
        slots: Slots | None = None,
        health_news: HealthNewsBus | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.health = health or MemoryHealthStore()
        self.dedup = in_flight if in_flight is not None else MemoryInFlight()  # it has a len()
        self._clock = clock
        self._rng = rng or random.Random()
        m = self.metrics
        self.gate = slots if slots is not None else SlotGate(queue_size=0, clock=clock)
        self.gate.attach(on_wait=m.queue_wait.observe, on_reject=m.queue_rejections.inc)
        self.news = health_news if health_news is not None else LocalHealthNews()
        self.news.on_news = self._on_news
        self._generation = 0
        self._strategies: dict[str, Strategy] = {}
        self._prober: Prober | None = None
        #: In a cluster (node.cluster): probe only while this is true (the leader), and tell the
        #: verdict after every probe, not only on a change, so a node that joins later learns it.
        self.probe_gate: Callable[[], bool] | None = None
        self.retell_probes = False
        m.registry.on_collect(self._collect)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, runtime: Callable[[], Runtime]) -> None:
        """Start active health probes; they follow whatever runtime is current."""
        self._prober = Prober(self.health, runtime, self._on_probe, clock=self._clock, active=self.probe_gate)
        self._prober.start()

    def wake_prober(self) -> None:
        """The probe gate may have opened (this node now leads): probe at once."""
        if self._prober is not None:
            self._prober.wake()

    async def aclose(self) -> None:
        if self._prober is not None:
            await self._prober.stop()

    # -- entry point -------------------------------------------------------------------

    def claim(
        self, rt: Runtime, model: ModelConfig, op: Operation, body: dict[str, Any], ex: Exchange
    ) -> object | None:
        """Ask the shared dedup who leads this request's key now, before the request is admitted.

        The question then shares the admission's round trip to Redis; ``send`` uses the
        answer. The caller ends it with ``unclaim`` whatever happens (a no-op once ``send``
        used it): a refused request gives up a lead it took at once.
        """
        if not self.dedup.claims:
            return None  # in-process dedup: nothing to ask, no key to compute twice
        key = _dedup_key(rt, model, op, body, ex)
        return None if key is None else self.dedup.claim(key)

    def unclaim(self, token: object | None) -> None:
        if token is not None:
            self.dedup.unclaim(token)

    async def send(
        self, rt: Runtime, model: ModelConfig, op: Operation, body: dict[str, Any], ex: Exchange
    ) -> Dispatched:
        self.sync(rt)
        key = _dedup_key(rt, model, op, body, ex)
        if key is not None:
            return await self._send_handling_dedup(rt, model, op, body, ex, key)
        return await self._send_handling_admission(rt, model, op, body, ex)

    async def _send_handling_dedup(
        self, rt: Runtime, model: ModelConfig, op: Operation, body: dict[str, Any], ex: Exchange, key: str
    ) -> Dispatched:
        d, shared = await self.dedup.run(
            key, lambda: self._send_handling_admission(rt, model, op, body, ex), _codec(rt, model, op))
        if not shared:
            return d
        self.metrics.deduplicated.inc(self.metrics.models(model.name))
        ex.attempts = d.attempts
        ex.provider = d.deployment.provider
        ex.deployment = f"{d.deployment.provider}/{d.deployment.model}"
        ex.upstream_model = d.deployment.model
        ex.upstream_seconds = d.upstream_seconds
        return dataclasses.replace(d, headers={**d.headers, "x-hapax-dedup": "shared"})

    async def _send_handling_admission(
        self, rt: Runtime, model: ModelConfig, op: Operation, body: dict[str, Any], ex: Exchange
    ) -> Dispatched:
        adm = rt.config.reliability.admission
        slot = await self.gate.acquire(
            ((GLOBAL, "model:" + model.name),),
            priority=ex.priority,
            timeout=adm.queue_timeout,
            overloaded=overload_error(adm.reject_status),
        )
        try:
            d = await self._send_handling_attempts(rt, model, op, body, ex)
        except BaseException:
            slot.release()
            raise
        _on_close(d.reply, slot.release)
        return d

    async def _send_handling_attempts(
        self, rt: Runtime, model: ModelConfig, op: Operation, body: dict[str, Any], ex: Exchange
    ) -> Dispatched:
        rel = rt.config.reliability
        adm = rel.admission
        breakers_on = rel.circuit_breaker.enabled
        plan = RetryPlan(model.retry or rel.retry, now=self._clock(), rng=self._rng)
        tried: dict[str, int] = {}
        #: (deployment, code, status) of each failed attempt, for the error the client gets.
        trail: list[tuple[str, str, int]] = []
        skip: set[str] = set()
        last: HapaxError | None = None
        prev: str | None = None
        waited = False
        t_first = time.perf_counter()
        while True:
            now = self._clock()
            cands = self._candidates(rt, model, now, skip, tried, breakers_on)
            if not cands:
                # Everything is cooling down or open. If one comes back soon enough (a short
                # Retry-After on the only deployment, say), wait for it as for a backoff.
                back = self._soonest(model, now)
                if last is not None and back is not None and not waited:
                    step = plan.next_step(last, repeat=1, retry_after=back, now=now)
                    if not isinstance(step, GiveUp):
                        waited = True
                        await asyncio.sleep(step.delay + TIMER_SLACK)
                        continue
                if last is None:
                    raise self._no_upstream(model, now)
                raise _gave_up(last, trail, t_first)
            if last is not None and not waited:
                nxt = cands[0]
                step = plan.next_step(
                    last,
                    repeat=tried.get(nxt.key, 0),
                    retry_after=retry_after_of(last) if nxt.key == prev else None,
                    now=now,
                )
                if isinstance(step, GiveUp):
                    raise _gave_up(last, trail, t_first)
                if step.delay > 0:
                    waited = True
                    await asyncio.sleep(step.delay)
                    continue
            waited = False
            # A deployment whose provider cannot take this operation, even translated, is
            # no candidate at all; find that out before queueing for it.
            calls: list[tuple[_Candidate, Provider, Translation | None, Call]] = []
            for c in cands:
                provider = rt.providers[c.dep.provider]
                try:
                    translation, call = prepare_call(provider, c.dep, op, body, ex)
                except InvalidField as exc:
                    skip.add(c.key)
                    last = last or exc
                    continue
                calls.append((c, provider, translation, call))
            if not calls:
                continue
            dslot = await self.gate.acquire(
                tuple(("dep:" + c.key,) for c, *_ in calls),
                priority=ex.priority,
                timeout=max(0.001, min(adm.queue_timeout, plan.remaining(now=now))),
                overloaded=overload_error(adm.reject_status),
            )
            c, provider, translation, call = calls[dslot.index]
            breaker = c.health.breaker
            permit = breaker.acquire(now=self._clock()) if breakers_on else Permit(0, trial=False)
            if permit is None:  # its half-open trial slots went while we queued
                dslot.release()
                skip.add(c.key)
                continue
            plan.start_attempt()
            ex.attempts += 1
            ex.provider = c.dep.provider
            ex.deployment = c.key
            ex.upstream_model = c.dep.model
            if prev is not None:
                self.metrics.retries.inc(self.metrics.models(model.name))
                if c.key != prev:
                    self.metrics.failovers.inc(self.metrics.models(model.name))
            tried[c.key] = tried.get(c.key, 0) + 1
            prev = c.key
            try:
                reply = await self._attempt(provider, call, c, plan)
            except BaseException as exc:
                self._settle_failure(c, permit, exc, breakers_on)
                dslot.release()
                if not isinstance(exc, HapaxError):
                    raise
                last = exc
                trail.append((c.key, exc.code, exc.status))
                if not isinstance(exc, UpstreamError) or not exc.retryable:
                    _gave_up(exc, trail, t_first)
                    raise
                if exc.code == MISCONFIGURED:
                    # The route itself is missing: the same deployment will answer the same.
                    skip.add(c.key)
                continue
            if breakers_on:
                breaker.on_success(permit, now=self._clock())
            self._flush(c.health)
            ex.upstream_seconds = time.perf_counter() - t_first
            headers = {"x-hapax-deployment": c.key}
            d = Dispatched(reply, c.dep, provider, translation, t_first, headers, ex.attempts, ex.upstream_seconds)
            self._watch(d, c, dslot, breakers_on)
            return d

    async def _attempt(self, provider: Provider, call: Call, c: _Candidate, plan: RetryPlan) -> Reply:
        """One call; returns once the reply has started. Counts the deployment's in-flight."""
        h = c.health
        h.in_flight += 1
        t0 = time.perf_counter()
        ok = False
        try:
            # No timer of our own: the provider's timeouts (connect, first byte, idle, total)
            # bound an attempt; the plan's deadline only stops new attempts and waits. So a
            # long non-streamed generation is not cut at the retry deadline.
            reply = await provider.send(call)
            if isinstance(reply, StreamReply):
                await _peek(reply, provider.name)
            ok = True
        finally:
            if not ok:
                h.in_flight -= 1
        now = self._clock()
        sample = time.perf_counter() - t0
        h.latency = ewma(h.latency, sample)
        h.latency_at = now
        h.successes += 1
        self.metrics.attempts.inc(self.metrics.deployments(c.key), "ok")
        return reply

    def _settle_failure(self, c: _Candidate, permit: Permit, exc: BaseException, breakers_on: bool) -> None:
        h = c.health
        now = self._clock()
        breaker = h.breaker
        code = exc.code if isinstance(exc, HapaxError) else "cancelled"
        self.metrics.attempts.inc(self.metrics.deployments(c.key), code)
        if isinstance(exc, HapaxError):
            h.failures += 1
            h.last_error = exc.message
        if not breakers_on:
            return
        if isinstance(exc, UpstreamRateLimited):
            # Busy, not broken: cool down for as long as asked, count no failure.
            if exc.retry_after:
                breaker.cool_down(exc.retry_after, now=now)
                seconds = min(exc.retry_after, breaker.config.max_cooldown)
                log.info("deployment cooling down", extra={"fields": {"deployment": c.key, "seconds": seconds}})
                self.news.tell(HealthNews("cooldown", c.key, seconds))
            breaker.on_abandoned(permit, now=now)
        elif isinstance(exc, UpstreamError) and exc.retryable:
            breaker.on_failure(permit, now=now)
        elif isinstance(exc, UpstreamError):
            breaker.on_success(permit, now=now)  # it answered; the request was at fault
        else:
            breaker.on_abandoned(permit, now=now)
        self._flush(h)

    def _watch(self, d: Dispatched, c: _Candidate, dslot: Slot, breakers_on: bool) -> None:
        """Give back the attempt's slot and in-flight count when the reply ends."""
        h = c.health

        def done() -> None:
            h.in_flight -= 1
            dslot.release()

        reply = d.reply
        if not isinstance(reply, StreamReply):
            done()
            return

        def failed(exc: UpstreamError) -> None:
            # After the first byte there is no retry; the breaker still learns of it.
            if breakers_on and exc.retryable and not isinstance(exc, UpstreamRateLimited):
                h.breaker.on_stream_failure(now=self._clock())
                self._flush(h)
            h.failures += 1
            h.last_error = exc.message
            self.metrics.attempts.inc(self.metrics.deployments(c.key), "stream_" + exc.code)

        reply.on_failure = failed
        _on_close(reply, done)



def _dedup_key(rt: Runtime, model: ModelConfig, op: Operation, body: dict[str, Any], ex: Exchange) -> str | None:
    """The request's dedup key, or ``None`` when it is not deduplicated."""
    # The key is the body; a request with a beta header asks for something else.
    if (ex.dedup and not body.get("stream") and rt.config.reliability.dedup.enabled
            and not has_provider_headers(ex.client_headers)):
        if ex.dedup_key is None:
            ex.dedup_key = dedup_key(ex.principal, model.name, op.value, body)
        return ex.dedup_key
    return None


def _codec(rt: Runtime, model: ModelConfig, op: Operation) -> Codec[Dispatched]:
    """How a JSON reply crosses to another process's identical request (``RedisInFlight``)."""

    def encode(d: Dispatched) -> bytes | None:
        reply = d.reply
        if not isinstance(reply, JsonReply):
            return None
        u = reply.usage
        raw = reply.raw if reply.raw is not None else orjson.dumps(reply.body)
        return bytes(msgpack.packb([
            d.deployment.provider, d.deployment.model, raw, reply.raw is not None,
            [u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reported],
            d.headers, d.attempts, d.upstream_seconds,
        ]))

    def decode(blob: bytes) -> Dispatched:
        prov, upstream, raw, exact, usage, headers, attempts, seconds = msgpack.unpackb(blob, raw=False)
        dep = next((x for x in model.deployments if x.provider == prov and x.model == upstream), None)
        provider = rt.providers.get(prov)
        if dep is None or provider is None:
            raise ValueError(f"deployment {prov}/{upstream} is not in this node's config")
        translation = None if op in provider.operations else find_translation(op, provider.operations)
        reply = JsonReply(orjson.loads(raw), Usage(*usage), raw if exact else None)
        return Dispatched(reply, dep, provider, translation, time.perf_counter(), dict(headers), attempts, seconds)

    return Codec(encode, decode)


def _gave_up(exc: HapaxError, trail: list[tuple[str, str, int]], t_first: float) -> HapaxError:
    """``exc`` carrying what was tried and for how long, for the gateway's error headers and body.

    It is on the exception, not the exchange: deduplicated callers share the one exception.
    """
    exc.tried = tuple(trail)
    exc.upstream_seconds = time.perf_counter() - t_first
    return exc


def _on_close(reply: Reply, fn: Callable[[], None]) -> None:
    """Run ``fn`` when the reply ends: now for JSON, on ``close()`` for a stream."""
    if not isinstance(reply, StreamReply):
        fn()
        return
    inner = reply._close

    def close() -> None:
        try:
            if inner is not None:
                inner()
        finally:
            fn()

    reply._close = close


async def _peek(reply: StreamReply, provider: str) -> None:
    """Wait for the first event, so a stream that fails at once can still fail over."""
    events = reply.events
    try:
        first = await anext(events)
    except StopAsyncIteration:
        return
    except BaseException:
        reply.close()
        raise
    if first and first[0].data != b"[DONE]":
        try:
            first[0].json()
        except orjson.JSONDecodeError:
            reply.close()
            raise UpstreamUnavailable(
                f"provider {provider} sent a stream event that is not JSON", code="upstream_malformed_stream"
            ) from None
    reply.first = first  # relayed before the rest: no replaying generator in every event's way


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
    provider.check(target, upstream_body)
    stream = bool(body.get("stream"))
    headers = provider.forwarded(ex.client_headers)
    return translation, Call(op=target, body=upstream_body, stream=stream, request_id=ex.request_id,
                             headers=headers)
