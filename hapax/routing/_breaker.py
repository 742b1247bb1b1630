"""A circuit breaker for one deployment, sans-IO.

Theory of operation: the breaker is CLOSED, OPEN or HALF_OPEN, and changes
state only through ``TRANSITIONS``; anything else raises ``BreakerStateError``
(a programmer error). It reads no clock: every call takes ``now``.

- CLOSED lets every call through and counts outcomes. It trips to OPEN when
  ``consecutive_failures`` calls in a row failed, or when, over the last
  ``window`` seconds and at least ``min_requests`` calls, the share that
  failed reaches ``failure_rate``.
- OPEN lets nothing through. After ``open_for`` seconds the next ``acquire``
  (or ``poll``) moves it to HALF_OPEN; ``next_deadline`` says when.
- HALF_OPEN lets ``half_open_trials`` calls through at once. One failed trial
  reopens it; ``close_after`` successful trials close it.
- Probes feed it: a provider whose probe turns unhealthy opens its breakers
  (``probe_down``); one that turns healthy again moves an open breaker to
  HALF_OPEN at once (``probe_up``), so real traffic confirms the recovery.
- A 429 with Retry-After is not a failure: the deployment is fine, just busy.
  ``cool_down`` makes it unavailable until then, whatever the state.
- Peers feed it too (nodes sharing health through Redis): another node's breaker
  that opened opens this one for the time it has left (``peer_open``); a peer's
  open never travels on, so news does not echo between nodes.

Every ``acquire`` that says yes returns a ``Permit`` stamped with the breaker's
epoch, which bumps on each transition; an outcome reported on a permit from an
earlier epoch is ignored, so a slow call started while CLOSED cannot close a
breaker that has since opened, nor count as a trial. Each transition is queued
as a frozen ``Transition`` event; the adapter drains them with ``take_events``
to log and count them.

There is no ERROR state: no outcome leaves a breaker unusable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from ..config import BreakerConfig

#: The failure-rate window is kept as this many time buckets: O(1) memory per breaker.
WINDOW_BUCKETS = 10


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Trigger(Enum):
    TRIPPED = "tripped"
    OPEN_ELAPSED = "open_elapsed"
    TRIAL_FAILED = "trial_failed"
    TRIALS_PASSED = "trials_passed"
    PROBE_DOWN = "probe_down"
    PROBE_UP = "probe_up"
    PEER_OPEN = "peer_open"


_C, _O, _H = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

TRANSITIONS: dict[tuple[BreakerState, Trigger], BreakerState] = {
    (_C, Trigger.TRIPPED): _O,
    (_C, Trigger.PROBE_DOWN): _O,
    (_O, Trigger.OPEN_ELAPSED): _H,
    (_O, Trigger.PROBE_UP): _H,
    (_O, Trigger.PROBE_DOWN): _O,  # re-arms the open timer
    (_H, Trigger.TRIAL_FAILED): _O,
    (_H, Trigger.TRIALS_PASSED): _C,
    (_H, Trigger.PROBE_DOWN): _O,
    (_C, Trigger.PEER_OPEN): _O,
    (_H, Trigger.PEER_OPEN): _O,
}

#: Transitions a node tells its peers about: its own verdicts that a deployment is down.
SHARED_OPENS = frozenset({Trigger.TRIPPED, Trigger.TRIAL_FAILED})

#: Numeric form for the state gauge.
STATE_VALUE = {_C: 0, _H: 1, _O: 2}


class BreakerStateError(RuntimeError):
    """A transition the table does not allow: a bug in the caller."""


@dataclass(frozen=True, slots=True)
class Transition:
    old: BreakerState
    new: BreakerState
    trigger: Trigger
    at: float


@dataclass(frozen=True, slots=True)
class Permit:
    epoch: int
    trial: bool


class CircuitBreaker:
    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.state = BreakerState.CLOSED
        self.epoch = 0
        self.consecutive = 0
        self.opened_until = 0.0
        self.cooling_until = 0.0
        self._trials = 0
        self._trial_successes = 0
        # [bucket start, successes, failures]
        self._window: deque[list[float]] = deque()
        self._events: list[Transition] = []

    # -- queries --------------------------------------------------------------------

    def available(self, *, now: float) -> bool:
        """Whether ``acquire`` would say yes now (without taking a trial slot)."""
        if now < self.cooling_until:
            return False
        if self.state is _C:
            return True
        if self.state is _O:
            return now >= self.opened_until
        return self._trials < self.config.half_open_trials

    def next_deadline(self) -> float | None:
        """When the breaker's availability may change by time alone."""
        times = [t for t in (self.cooling_until, self.opened_until if self.state is _O else 0.0) if t > 0]
        return max(times) if times else None

    def failure_counts(self, *, now: float) -> tuple[int, int]:
        """(calls, failures) in the window."""
        self._trim(now)
        calls = sum(int(b[1] + b[2]) for b in self._window)
        return calls, sum(int(b[2]) for b in self._window)

    # -- inputs ---------------------------------------------------------------------

    def poll(self, *, now: float) -> None:
        if self.state is _O and now >= self.opened_until:
            self._go(Trigger.OPEN_ELAPSED, now)

    def acquire(self, *, now: float) -> Permit | None:
        """Let one call through, or say no (``None``)."""
        self.poll(now=now)
        if now < self.cooling_until:
            return None
        if self.state is _C:
            return Permit(self.epoch, trial=False)
        if self.state is _H and self._trials < self.config.half_open_trials:
            self._trials += 1
            return Permit(self.epoch, trial=True)
        return None

    def on_success(self, permit: Permit, *, now: float) -> None:
        if permit.epoch != self.epoch:
            return
        if permit.trial:
            self._trials -= 1
            self._trial_successes += 1
            if self._trial_successes >= self.config.close_after:
                self._go(Trigger.TRIALS_PASSED, now)
            return
        self.consecutive = 0
        self._count(now, failed=False)

    def on_failure(self, permit: Permit, *, now: float) -> None:
        if permit.epoch != self.epoch:
            return
        if permit.trial:
            self._trials -= 1
            self._go(Trigger.TRIAL_FAILED, now)
            return
        self.consecutive += 1
        self._count(now, failed=True)
        if self.consecutive >= self.config.consecutive_failures or self._rate_tripped(now):
            self._go(Trigger.TRIPPED, now)

    def on_stream_failure(self, *, now: float) -> None:
        """A stream broke after it started; its permit was settled as a success at the first byte.

        Counted only while CLOSED: a half-open breaker is judged by its trials' first bytes.
        """
        if self.state is not _C:
            return
        self.consecutive += 1
        self._count(now, failed=True)
        if self.consecutive >= self.config.consecutive_failures or self._rate_tripped(now):
            self._go(Trigger.TRIPPED, now)

    def on_abandoned(self, permit: Permit, *, now: float) -> None:
        """The call ended with no verdict on the deployment (the client left)."""
        if permit.epoch == self.epoch and permit.trial:
            self._trials -= 1

    def cool_down(self, seconds: float, *, now: float) -> None:
        until = now + min(seconds, self.config.max_cooldown)
        self.cooling_until = max(self.cooling_until, until)

    def peer_open(self, seconds: float, *, now: float) -> None:
        """Another node opened its breaker for this deployment, ``seconds`` ago left to run."""
        until = now + min(seconds, self.config.open_for)
        if self.state is _O:
            self.opened_until = max(self.opened_until, until)
            return
        self._go(Trigger.PEER_OPEN, now)
        self.opened_until = until

    def probe_down(self, *, now: float) -> None:
        self._go(Trigger.PROBE_DOWN, now)

    def probe_up(self, *, now: float) -> None:
        if self.state is _O:
            self._go(Trigger.PROBE_UP, now)

    def take_events(self) -> list[Transition]:
        events, self._events = self._events, []
        return events

    # -- internals ------------------------------------------------------------------

    def _go(self, trigger: Trigger, now: float) -> None:
        new = TRANSITIONS.get((self.state, trigger))
        if new is None:
            raise BreakerStateError(f"no transition from {self.state.value} on {trigger.value}")
        old, self.state = self.state, new
        self.epoch += 1
        if new is _O:
            self.opened_until = now + self.config.open_for
        elif new is _H:
            self._trials = 0
            self._trial_successes = 0
        else:
            self.consecutive = 0
            self._window.clear()
        self._events.append(Transition(old, new, trigger, now))

    def _count(self, now: float, *, failed: bool) -> None:
        width = self.config.window / WINDOW_BUCKETS
        if not self._window or now >= self._window[-1][0] + width:
            self._window.append([now, 0.0, 0.0])
        self._window[-1][2 if failed else 1] += 1
        self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - self.config.window
        while self._window and self._window[0][0] <= horizon:
            self._window.popleft()

    def _rate_tripped(self, now: float) -> bool:
        calls, failures = self.failure_counts(now=now)
        return calls >= self.config.min_requests and failures / calls >= self.config.failure_rate
