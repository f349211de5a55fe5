"""Waiting for a condition instead of sleeping for a while.

A test that expects something to happen polls for it until it holds. The bound is only there so
that a broken build fails with a message instead of hanging: it is no performance goal (speeds
and latencies are measured in ``bench/``, never asserted in a test), so it is generous, ``HANG``
unless a test says why it needs another.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")

# Seconds after which a wait gives up: a hang, not a slow machine.
HANG = 30.0


def _failed(what: str, timeout: float, last: Any) -> AssertionError:
    return AssertionError(f"{what}: not within {timeout:g}s (last: {last!r})")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = HANG,
    what: str = "condition",
    *,
    interval: float = 0.05,
    errors: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate()`` until it returns something true; return that.

    ``errors``: exceptions of the predicate that mean "not yet" (the last one is reported);
    any other one fails at once. AssertionError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except errors as exc:
            last = exc
        else:
            if last:
                return cast(T, last)
        if time.monotonic() > deadline:
            raise _failed(what, timeout, last)
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = HANG,
    what: str = "condition",
    *,
    interval: float = 0.02,
) -> T:
    """:func:`wait_until` on an asyncio loop; ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return cast(T, last)
        if time.monotonic() > deadline:
            raise _failed(what, timeout, last)
        await asyncio.sleep(interval)
