"""Cancellations that get lost on the way (see ``raise_if_cancelling``)."""

from __future__ import annotations

import asyncio


def raise_if_cancelling(exc: BaseException | None = None) -> None:
    """Raise ``CancelledError`` when the current task has been asked to stop.

    A cancellation can get lost on the way: one that lands while a gRPC call
    ends surfaces as aetcd's error for a cancelled RPC, and Python 3.11's
    ``wait_for`` returns the result of an inner call that finished as the
    cancellation arrived. A loop that retries on errors would then keep running
    (and keep its lease alive) after ``resign``; loops call this after each
    caught error and each round.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from exc
