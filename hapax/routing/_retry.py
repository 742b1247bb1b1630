"""The retry schedule of one request, sans-IO.

Theory of operation: a ``RetryPlan`` is made when a request starts and asked
after each failed attempt what to do next. It reads no clock and draws its
jitter from the ``rng`` it is given.

- Only a retryable failure is retried (``retryable``): a connection error, a
  timeout before the first byte, 429, 500/502/503/504, a malformed reply. The
  provider rejecting the request itself (``UpstreamBadRequest``) is not.
- At most ``max_attempts`` attempts, all before ``deadline`` seconds from the
  start. Once the answer has started (the first streamed byte) there is no
  retry at all; the dispatcher returns before that point.
- Failing over to a deployment this request has not tried yet waits nothing:
  it is a different upstream. Trying a deployment again waits an exponential
  backoff with full jitter, ``uniform(0, min(backoff_max, backoff_base * 2**k))``
  for the k-th repeat, but never less than the upstream's Retry-After.
- A Retry-After longer than ``retry_after_cap``, or a wait that would cross the
  deadline, ends the retries: the client gets the upstream's answer (429 with
  Retry-After) now rather than a timeout later.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .._errors import HapaxError, UpstreamError
from ..config import RetryConfig


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retryable


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


class RetryPlan:
    def __init__(self, config: RetryConfig, *, now: float, rng: random.Random) -> None:
        self.config = config
        self.deadline = now + config.deadline
        self.attempts = 0
        self._rng = rng

    def remaining(self, *, now: float) -> float:
        return max(0.0, self.deadline - now)

    def start_attempt(self) -> None:
        self.attempts += 1

    def next_step(
        self, exc: BaseException, *, repeat: int, retry_after: float | None, now: float
    ) -> Retry | GiveUp:
        """After a failed attempt: wait ``Retry.delay`` then try again, or ``GiveUp``.

        ``repeat`` is how many times the deployment tried next has already been
        tried by this request (0 when failing over to a fresh one).
        """
        if not retryable(exc):
            return GiveUp("not_retryable")
        if self.attempts >= self.config.max_attempts:
            return GiveUp("max_attempts")
        delay = 0.0
        if repeat > 0:
            ceiling = min(self.config.backoff_max, self.config.backoff_base * 2 ** (repeat - 1))
            delay = self._rng.uniform(0.0, ceiling)
            if retry_after is not None:
                if retry_after > self.config.retry_after_cap:
                    return GiveUp("retry_after_too_long")
                delay = max(delay, retry_after)
        if now + delay >= self.deadline:
            return GiveUp("deadline")
        return Retry(delay)


def retry_after_of(exc: BaseException) -> float | None:
    return exc.retry_after if isinstance(exc, HapaxError) else None
