"""The netlink manager against a real kernel, inside a namespace made for the test."""

from __future__ import annotations

import errno
import socket
import subprocess

import pytest
import trio

from meridio.core import rtnl
from meridio.runtime.bus import EventBus
from meridio.runtime.netlink import (
    AddressEvent,
    LinkEvent,
    NetlinkManager,
    RuleEvent,
    VethSpec,
    open_event_socket,
)
from tests.conftest import make_netns

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


async def test_lean_reads_agree_with_pyroute2(aio_loop: object, netns: object) -> None:
    """Links (veth, bridge, vxlan), addresses and neighbours read lean, as pyroute2 reads them."""
    run = netns.run  # type: ignore[attr-defined]
    for cmd in (
        "link add mt-br type bridge",
        "link add mt-a mtu 1400 type veth peer name mt-b",
        "link set mt-a master mt-br alias meridio-endpoint:x up",
        "link set mt-b up",
        "link add mt-vx type vxlan id 42 local 198.18.0.1 remote 198.18.0.2 dstport 4789",
        "link add mt-vx6 type vxlan id 43 local fd00::1 remote fd00::2 dstport 8472",
        "addr add 198.18.0.1/24 dev mt-b",
        "addr add fd00::1/64 dev mt-b nodad",
        "neigh add 198.18.0.9 lladdr 02:00:00:00:00:09 dev mt-b",
        "neigh add fd00::9 lladdr 02:00:00:00:00:09 dev mt-b",
    ):
        run("ip", *cmd.split())
    manager = NetlinkManager(EventBus(), netns.name)  # type: ignore[attr-defined]
    await manager.open()
    try:
        heavy = {m.get("IFLA_IFNAME"): m for m in await manager.links()}
        lean = {link.name: link for link in await manager.link_list()}
        assert lean.keys() == heavy.keys()
        for name, msg in heavy.items():
            link = lean[name]
            linkinfo = msg.get("IFLA_LINKINFO")
            assert link.index == msg["index"]
            assert link.flags == msg["flags"]
            assert link.mtu == msg.get("IFLA_MTU")
            assert link.master == (msg.get("IFLA_MASTER") or None)
            assert link.alias == msg.get("IFLA_IFALIAS")
            assert link.lladdr == msg.get("IFLA_ADDRESS")
            assert link.kind == (linkinfo.get("IFLA_INFO_KIND") if linkinfo else None)
            assert await manager.link_get(name) == link
        assert lean["mt-a"].alias == "meridio-endpoint:x"
        assert lean["mt-a"].master == lean["mt-br"].index
        assert lean["mt-vx"].vxlan == rtnl.Vxlan(42, "198.18.0.1", "198.18.0.2", 4789)
        assert lean["mt-vx6"].vxlan == rtnl.Vxlan(43, "fd00::1", "fd00::2", 8472)
        assert await manager.link_get("mt-none") is None
        assert "198.18.0.1/24" in await manager.addresses("mt-b")
        assert "fd00::1/64" in await manager.addresses("mt-b")
        assert await manager.addresses("mt-none") == []
        neighbours = {(n.index, n.dst) for n in await manager.neighbour_list()}
        index = lean["mt-b"].index
        assert {(index, "198.18.0.9"), (index, "fd00::9")} <= neighbours
        assert await manager.forget_neighbour("fd00::9/64") == 1
        assert await manager.forget_neighbour("198.18.0.9") == 1
        assert await manager.forget_neighbour("198.18.0.9") == 0
    finally:
        manager.close()


async def test_veths_are_made_together(aio_loop: object, netns: object, tmp_path: object) -> None:
    """create_veths: several pairs in one exchange, each a bridge port, up, with its alias
    (isolated, and without IPv6 address, when asked); a pair that cannot be made says why and
    does not stop the others. configure_port does the same to a port afterwards."""
    peers = [make_netns("peer") for _ in range(3)]
    try:
        netns.run("ip", "link", "add", "mt-br", "type", "bridge")  # type: ignore[attr-defined]
        peers[2].run("ip", "link", "add", "conduit0", "type", "dummy", check=False)
        peers[2].run("ip", "link", "add", "conduit0", "type", "bridge", check=False)
        manager = NetlinkManager(EventBus(), netns.name)  # type: ignore[attr-defined]
        await manager.open()
        try:
            bridge = await manager.link_get("mt-br")
            assert bridge is not None
            specs = [
                VethSpec(
                    f"mt-t{i}",
                    "conduit0",
                    f"/run/netns/{p.name}",
                    1400,
                    bridge.index,
                    True,
                    f"meridio-endpoint:t{i}",
                    isolated=i == 0,
                    ipv6_link_local=i != 0,
                )
                for i, p in enumerate(peers)
            ] + [VethSpec("mt-tx", "conduit0", "/run/netns/mtest-none", 1400, bridge.index)]
            made = await manager.create_veths(specs, chunk=2)
            for i in (0, 1):
                link = made[i]
                assert isinstance(link, rtnl.Link), link
                assert (link.name, link.kind, link.mtu, link.master, link.alias) == (
                    f"mt-t{i}",
                    "veth",
                    1400,
                    bridge.index,
                    f"meridio-endpoint:t{i}",
                )
                assert link.flags & 1  # up
                assert "conduit0" in peers[i].run("ip", "-o", "link").stdout
            assert isinstance(made[2], OSError) and made[2].errno == errno.EEXIST
            assert isinstance(made[3], OSError) and made[3].errno == errno.ENOENT

            def isolated(name: str) -> bool:
                out = netns.run("ip", "-d", "link", "show", name).stdout  # type: ignore[attr-defined]
                assert "isolated " in out, out
                return "isolated on" in out

            def addrgenmode(name: str) -> str:
                out = netns.run("ip", "-d", "link", "show", name).stdout  # type: ignore[attr-defined]
                return out.split("addrgenmode ", 1)[1].split()[0]

            assert (isolated("mt-t0"), isolated("mt-t1")) == (True, False)
            assert (addrgenmode("mt-t0"), addrgenmode("mt-t1")) == ("none", "eui64")
            await manager.configure_port("mt-t1", isolated=True, ipv6_link_local=False)
            assert isolated("mt-t1")
            assert addrgenmode("mt-t1") == "none"
            with pytest.raises(rtnl.NetlinkDumpError):
                await manager.configure_port("mt-none", isolated=True)
            again = await manager.create_veths(specs[:1])
            assert isinstance(again[0], OSError) and again[0].errno == errno.EEXIST
        finally:
            manager.close()
    finally:
        for p in peers:
            p.close()


async def test_link_events_carry_the_carrier_and_skip_bridge_port_states(
    aio_loop: object, netns: object
) -> None:
    bus = EventBus()
    manager = NetlinkManager(bus, netns.name)  # type: ignore[attr-defined]
    links = bus.subscribe(LinkEvent)
    run = netns.run  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run_events)
        run("ip", "link", "add", "mt-br", "type", "bridge")
        run(
            "ip",
            "link",
            "add",
            "mt-a",
            "master",
            "mt-br",
            "up",
            "type",
            "veth",
            "peer",
            "name",
            "mt-b",
        )
        run("ip", "link", "set", "mt-b", "up")
        await _next(links, LinkEvent, lambda e: e.ifname == "mt-a" and e.up and e.lower_up)
        run("ip", "link", "set", "mt-a", "nomaster")  # the bridge reports the port gone
        run("ip", "link", "set", "mt-a", "alias", "marker")
        seen = []
        with trio.move_on_after(1):
            while True:
                event = await links.receive()
                if isinstance(event, LinkEvent) and event.ifname == "mt-a":
                    seen.append(event.action)
        assert "del" not in seen  # the link is still there: only its bridge port went
        run("ip", "link", "del", "mt-a")
        await _next(links, LinkEvent, lambda e: e.ifname == "mt-a" and e.action == "del")
        nursery.cancel_scope.cancel()
    manager.close()


def test_the_event_socket_drops_bridge_port_states_in_the_kernel(netns: object) -> None:
    """The event socket's filter: a bridge's port states (family AF_BRIDGE) never reach it,
    the ports' own link events do."""
    sock = open_event_socket(netns.name)  # type: ignore[attr-defined]
    try:
        run = netns.run  # type: ignore[attr-defined]
        run("ip", "link", "add", "mt-br", "type", "bridge")
        run(
            "ip",
            "link",
            "add",
            "mt-a",
            "master",
            "mt-br",
            "up",
            "type",
            "veth",
            "peer",
            "name",
            "mt-b",
        )
        run("ip", "link", "set", "mt-b", "up")
        run("ip", "link", "set", "mt-a", "nomaster")
        families = []
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            while True:
                for msg_type, payload in rtnl.messages(sock.recv(1 << 16), None):
                    if msg_type in (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK):
                        families.append(payload[0])
        assert families and socket.AF_BRIDGE not in families
        assert set(families) == {socket.AF_UNSPEC}
    finally:
        sock.close()
