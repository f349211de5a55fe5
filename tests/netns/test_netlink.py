"""The netlink manager against a real kernel, inside a namespace made for the test."""

from __future__ import annotations

import socket

import pytest
import trio

from meridio.runtime.bus import EventBus
from meridio.runtime.netlink import AddressEvent, LinkEvent, NetlinkManager, RuleEvent

pytestmark = pytest.mark.netns


async def _next(sub: object, cls: type, pred: object) -> object:
    with trio.fail_after(5):
        while True:
            event = await sub.receive()  # type: ignore[attr-defined]
            if isinstance(event, cls) and pred(event):  # type: ignore[operator]
                return event


async def test_kernel_events_arrive_on_the_bus(aio_loop: object, netns: object) -> None:
    bus = EventBus()
    manager = NetlinkManager(bus, netns.name)  # type: ignore[attr-defined]
    links = bus.subscribe(LinkEvent)
    addrs = bus.subscribe(AddressEvent)
    rules = bus.subscribe(RuleEvent)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run_events)
        # a link made by someone else (iproute2) is seen
        netns.run("ip", "link", "add", "mt-ev0", "type", "veth", "peer", "name", "mt-ev1")  # type: ignore[attr-defined]
        event = await _next(links, LinkEvent, lambda e: e.ifname == "mt-ev0" and e.action == "new")
        assert event.netns == netns.name  # type: ignore[attr-defined]
        await manager.ensure_address("mt-ev0", "198.18.0.1/24")
        await _next(addrs, AddressEvent, lambda e: e.address == "198.18.0.1")
        await manager.ensure_rule(family=socket.AF_INET, priority=100, table=7, fwmark=7)
        await _next(rules, RuleEvent, lambda e: e.action == "new" and e.fwmark == 7)
        await manager.ensure_link_absent("mt-ev0")
        await _next(links, LinkEvent, lambda e: e.ifname == "mt-ev0" and e.action == "del")
        nursery.cancel_scope.cancel()
    manager.close()


async def test_ensure_helpers_are_idempotent(aio_loop: object, netns: object) -> None:
    manager = NetlinkManager(EventBus(), netns.name)  # type: ignore[attr-defined]
    await manager.open()
    try:
        for _ in range(2):
            await manager.ensure_link("mt-a", "veth", peer="mt-b")
            await manager.ensure_link_up("mt-a")
            await manager.ensure_link_up("mt-b")
            await manager.ensure_address("mt-a", "198.18.1.1/24")
            await manager.ensure_address("mt-a", "fd00:1::1/64")
            await manager.ensure_rule(family=socket.AF_INET, priority=200, table=5001, fwmark=5001)
            await manager.ensure_rule(
                family=socket.AF_INET6, priority=200, table=5001, src="fd00:9::1/128"
            )
            await manager.ensure_route("default", table=5001, gateway="198.18.1.2")
            await manager.ensure_route("default", table=5001, gateway="fd00:1::2")
        assert "198.18.1.1/24" in await manager.addresses("mt-a")
        rules4 = await manager.rules(socket.AF_INET)
        assert sum(1 for r in rules4 if r.get("FRA_FWMARK") == 5001) == 1
        routes = await manager.routes(5001, socket.AF_INET)
        assert [r.get("RTA_GATEWAY") for r in routes] == ["198.18.1.2"]
        shown = netns.run("ip", "-6", "route", "show", "table", "5001").stdout  # type: ignore[attr-defined]
        assert "default via fd00:1::2" in shown
        for _ in range(2):
            await manager.ensure_rule_absent(
                family=socket.AF_INET, priority=200, table=5001, fwmark=5001
            )
            await manager.ensure_route_absent("default", table=5001, family=socket.AF_INET)
            await manager.ensure_address_absent("mt-a", "198.18.1.1/24")
            await manager.ensure_link_absent("mt-a")
        assert await manager.link_index("mt-a") is None
        assert not [r for r in await manager.rules(socket.AF_INET) if r.get("FRA_FWMARK") == 5001]
    finally:
        manager.close()
