"""The netlink manager against a real kernel, inside a namespace made for the test."""

from __future__ import annotations

import socket
import subprocess

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


async def test_lean_dumps_read_what_iproute2_reads(aio_loop: object, netns: object) -> None:
    """Rules and routes of every table, many of them, parsed from the raw dump."""
    ns = netns.name  # type: ignore[attr-defined]
    lines = [
        "link add mt-a type veth peer name mt-b",
        "link set mt-a up",
        "link set mt-b up",
        "addr add 198.18.0.1/16 dev mt-a",
        "route add default table 4096 nexthop via 198.18.0.3 nexthop via 198.18.0.4",
        "route add blackhole default table 4096 metric 65535",
    ]
    v6 = ["addr add fd00:20::1/64 dev mt-a nodad", "rule add from 2001:db8::1 lookup 4096 pref 200"]
    for i in range(1, 401):  # more than one receive buffer's worth of messages
        lines += [
            f"rule add fwmark {5000 + i} lookup {5000 + i} pref 100",
            f"route add default via 198.18.{i // 250}.{i % 250 + 2} table {5000 + i}",
        ]
        v6 += [
            f"rule add fwmark {5000 + i} lookup {5000 + i} pref 100",
            f"route add default via fd00:20::{i + 1:x} table {5000 + i}",
        ]
    for family, batch in (("-4", lines), ("-6", v6)):
        subprocess.run(
            ["ip", "-n", ns, family, "-batch", "-"], input="\n".join(batch), text=True, check=True
        )
    manager = NetlinkManager(EventBus(), ns)
    try:
        rules = await manager.rule_list()
        routes = await manager.route_list()
        rules_v4 = await manager.rule_list(socket.AF_INET)
    finally:
        manager.close()
    marked = {(r.family, r.fwmark, r.table, r.priority) for r in rules if r.fwmark}
    assert len(marked) == 800 and (socket.AF_INET6, 5400, 5400, 100) in marked
    assert all(r.family == socket.AF_INET for r in rules_v4)
    assert any(r.src == "2001:db8::1/128" and r.table == 4096 for r in rules)
    defaults = {(r.family, r.table): r for r in routes if r.dst is None and r.type == 1}
    assert defaults[(socket.AF_INET, 5001)].gateways == ("198.18.0.3",)
    assert defaults[(socket.AF_INET6, 5400)].gateways == ("fd00:20::191",)
    assert defaults[(socket.AF_INET, 4096)].gateways == ("198.18.0.3", "198.18.0.4")
    blackholes = [r for r in routes if r.table == 4096 and r.type == 6]
    assert blackholes and blackholes[0].priority == 65535
    assert any(r.dst == "198.18.0.0/16" and r.table == 254 for r in routes)
