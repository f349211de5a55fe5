"""Change counters: :class:`Changes` for asyncio-side gRPC stream handlers, :class:`Signal` for
trio tasks.

State lives on the trio thread and handlers run in the trio-asyncio loop on that same thread,
so handlers read state directly; they only need to sleep until it changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import betterproto
import trio

from meridio.runtime.grpc import Encoded


class Changes:
    def __init__(self) -> None:
        self.version = 0
        self._waiters: set[asyncio.Event] = set()

    def bump(self) -> None:
        self.version += 1
        for waiter in self._waiters:
            waiter.set()

    async def wait_past(self, seen: int) -> None:
        """asyncio side: return once the version has moved past ``seen``."""
        while self.version == seen:
            event = asyncio.Event()
            self._waiters.add(event)
            try:
                await event.wait()
            finally:
                self._waiters.discard(event)


class Signal:
    """A version counter trio tasks can wait on (level-triggered change notification)."""

    def __init__(self) -> None:
        self.version = 0
        self._event = trio.Event()

    def bump(self) -> None:
        self.version += 1
        event, self._event = self._event, trio.Event()
        event.set()

    async def wait_past(self, seen: int) -> None:
        while self.version == seen:
            await self._event.wait()


async def watch_changes(
    changes: Changes, compute: Callable[[], betterproto.Message | bytes]
) -> AsyncIterator[Any]:
    """Level-triggered stream: the current value first, then again after every change of it.

    ``compute`` builds the full (filtered) value, as a message or already serialized; a change
    that leaves it identical sends nothing, so watchers of unrelated state are not woken up.
    The bytes compared are the bytes sent (the codec does not serialize them again).
    """
    last: bytes | None = None
    while True:
        seen = changes.version
        value = compute()
        data = value if isinstance(value, bytes) else bytes(value)
        if data != last:
            last = data
            yield Encoded(data)
        await changes.wait_past(seen)
