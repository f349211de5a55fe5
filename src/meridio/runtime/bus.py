"""A typed publish/subscribe bus over trio, bounded per subscriber.

Slow-subscriber policy: every subscription has its own bounded buffer. When it is full, the
*oldest* pending event is dropped, the subscription's ``dropped`` counter and the bus-wide
``meridio_bus_dropped_events_total`` metric grow, and the next receive yields a :class:`Lagged`
marker first. Publishers never block and memory never grows without bound. Consumers are
expected to be level-triggered: on ``Lagged`` they re-read the state they care about (for
example a netlink dump) instead of trusting the events they missed.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from meridio.runtime import metrics

E = TypeVar("E")

_dropped: Any = None


def dropped_counter() -> Any:
    """``meridio_bus_dropped_events_total``, made on the first drop (so that prometheus-client
    is loaded only by roles that use it)."""
    global _dropped
    if _dropped is None:
        from prometheus_client import Counter

        _dropped = Counter(
            "meridio_bus_dropped_events",
            "Events dropped because a bus subscriber was too slow",
            ["topic"],
            registry=metrics.registry(),
        )
    return _dropped


@dataclass(frozen=True)
class Lagged:
    """Delivered in place of events the subscriber missed; ``missed`` says how many."""

    missed: int


class Subscription(Generic[E]):
    def __init__(self, bus: EventBus, topic: type[E], maxlen: int) -> None:
        self._bus = bus
        self.topic = topic
        self.maxlen = maxlen
        self._queue: collections.deque[E] = collections.deque()
        self._wakeup = trio.Event()
        self._missed = 0
        self.dropped = 0
        self.closed = False

    def _offer(self, event: E) -> None:
        if len(self._queue) >= self.maxlen:
            self._queue.popleft()
            self._missed += 1
            self.dropped += 1
            dropped_counter().labels(self.topic.__name__).inc()
        self._queue.append(event)
        self._wakeup.set()

    async def receive(self) -> E | Lagged:
        while True:
            if self._missed:
                missed, self._missed = self._missed, 0
                return Lagged(missed)
            if self._queue:
                return self._queue.popleft()
            if self.closed:
                raise trio.EndOfChannel
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()
        self._bus._unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[E | Lagged]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[E | Lagged]:
        while True:
            try:
                yield await self.receive()
            except trio.EndOfChannel:
                return

    def __enter__(self) -> Subscription[E]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Routes each published event to the subscribers of its type (and of its base types)."""

    def __init__(self, default_maxlen: int = 1024) -> None:
        self.default_maxlen = default_maxlen
        self._subs: dict[type[Any], list[Subscription[Any]]] = {}
        self.published = 0

    def subscribe(self, topic: type[E], maxlen: int | None = None) -> Subscription[E]:
        sub: Subscription[E] = Subscription(self, topic, maxlen or self.default_maxlen)
        self._subs.setdefault(topic, []).append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription[Any]) -> None:
        subs = self._subs.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)

    def publish(self, event: object) -> int:
        """Deliver ``event`` to every matching subscriber without blocking; returns how many."""
        self.published += 1
        delivered = 0
        for cls in type(event).__mro__:
            for sub in self._subs.get(cls, ()):
                sub._offer(event)
                delivered += 1
        return delivered
