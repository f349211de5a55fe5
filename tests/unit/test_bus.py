from __future__ import annotations

from dataclasses import dataclass

import trio
import trio.testing

from meridio.runtime.bus import EventBus, Lagged


@dataclass(frozen=True)
class Base:
    n: int


@dataclass(frozen=True)
class Child(Base):
    pass


async def test_events_reach_subscribers_of_their_type_and_base_types() -> None:
    bus = EventBus()
    with bus.subscribe(Base) as base, bus.subscribe(Child) as child, bus.subscribe(int) as other:
        assert bus.publish(Child(1)) == 2
        assert bus.publish(Base(2)) == 1
        assert await base.receive() == Child(1)
        assert await base.receive() == Base(2)
        assert await child.receive() == Child(1)
        assert len(other._queue) == 0


async def test_slow_subscriber_drops_oldest_and_is_told() -> None:
    bus = EventBus()
    sub = bus.subscribe(Base, maxlen=3)
    for i in range(10):
        bus.publish(Base(i))
    assert sub.dropped == 7
    assert await sub.receive() == Lagged(7)
    assert [await sub.receive() for _ in range(3)] == [Base(7), Base(8), Base(9)]
    # memory stays bounded whatever the publisher does
    for i in range(10_000):
        bus.publish(Base(i))
    assert len(sub._queue) == 3


async def test_receive_waits_for_publish_and_close_ends_iteration() -> None:
    bus = EventBus()
    sub = bus.subscribe(Base)
    got: list[object] = []

    async def consume() -> None:
        async for event in sub:
            got.append(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()  # the consumer waits in receive
        bus.publish(Base(1))
        await trio.testing.wait_all_tasks_blocked()  # and got it
        assert got == [Base(1)]
        sub.close()
    assert got == [Base(1)]
    assert bus.publish(Base(2)) == 0
