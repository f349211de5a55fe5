"""The lab's plan, pure: names, addresses, placement, scaling, gateway routes and BIRD
configuration, NSP configuration, command lines; and the parsers of what BIRD and ``ip``
answer."""

from __future__ import annotations

import io
import ipaddress
import json
import subprocess
from collections import Counter
from pathlib import Path

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from meridio.core.nspconfig import parse_config
from meridio.daemon import load_role
from meridio.lab import plan, system
from meridio.lab.lab import Lab
from meridio.lab.plan import LabSpec, PlanError, ScalePlan
from meridio.lab.state import LabState, Process, load, save
from meridio.lab.system import LabError
from meridio.settings import load_settings, parse_flag_args

ALLOWED = [
    ipaddress.ip_network(n)
    for n in (
        "198.18.0.0/15",
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "2001:db8::/32",
        "fd00::/8",
    )
]


def allowed(address: str) -> bool:
    ip = ipaddress.ip_interface(address).ip
    return any(ip in net for net in ALLOWED)


def test_every_address_of_the_biggest_lab_is_in_the_allowed_ranges_and_unique() -> None:
    lbs, nodes, targets = (plan.LIMITS[k][1] for k in ("lbs", "proxies", "targets"))
    primary = [plan.primary_address("nsp"), plan.primary_address("ipam")]
    primary += [plan.primary_address("lb", i) for i in range(1, lbs + 1)]
    primary += [plan.primary_address("node", i) for i in range(1, nodes + 1)]
    primary += [plan.primary_address("target", i) for i in range(1, targets + 1)]
    # conduit-b's LBs and proxies (a namespace each)
    primary += [plan.primary_address("lbb", i) for i in range(1, lbs + 1)]
    primary += [plan.primary_address("nodeb", i) for i in range(1, nodes + 1)]
    external = [
        plan.external_address(f, i, c)
        for f in (4, 6)
        for i in range(1, lbs + 1)
        for c in plan.CONDUITS
    ]
    routers = plan.LIMITS["gateways"][1]
    external += [plan.gateway_router_cidr(f, r) for f in (4, 6) for r in range(1, routers + 1)]
    others = [*plan.VIPS.values(), *plan.CONDUIT_B.vips.values(), *plan.IPAM_PREFIXES.values()]
    for address in [*primary, *external]:
        assert allowed(address), address
    for prefix in others:
        first, last = ipaddress.ip_network(prefix)[0], ipaddress.ip_network(prefix)[-1]
        assert allowed(str(first)) and allowed(str(last)), prefix
    assert len(set(primary)) == len(primary)
    assert len(set(external)) == len(external)
    assert all(ipaddress.ip_interface(a).network == plan.EXTERNAL[6] for a in external if ":" in a)
    assert all(ipaddress.ip_address(a) in plan.PRIMARY for a in primary)
    # the conduits' addresses (IPAM), the primary network and the external one are apart
    ipam4 = ipaddress.ip_network(plan.IPAM_PREFIXES[4])
    assert not ipam4.overlaps(plan.PRIMARY) and not ipam4.overlaps(plan.EXTERNAL[4])


def test_addresses_and_names() -> None:
    assert plan.primary_cidr("lb", 2) == "198.19.1.2/16"
    assert plan.primary_address("target", 12) == "198.19.3.12"
    assert plan.external_address(4, 0) == "192.0.2.1/24"
    assert plan.external_address(6, 3) == "fd00:e::d/64"
    assert plan.gateway_address(6) == "fd00:e::1"
    assert plan.gateway_router_cidr(4, 2) == "192.0.2.2/24"
    assert plan.gateway_router_address(6, 2) == "fd00:e::2"
    assert plan.gateway_router_address(4, 1) == plan.gateway_address(4)
    assert plan.lb_of_external_address("192.0.2.12") == 2
    assert plan.lb_of_external_address("fd00:e::1a") == 16
    for other in ("192.0.2.1", "192.0.2.2", "192.0.2.27", "fe80::1", "198.19.1.1", "x"):
        assert plan.lb_of_external_address(other) is None, other
    assert plan.vip_next_hop_lbs(["192.0.2.12", "192.0.2.11", "192.0.2.99"]) == (
        [1, 2],
        ["192.0.2.99"],
    )
    assert plan.vip_endpoints([6, 4]) == ["203.0.113.1:5000", "[2001:db8::1]:5000"]
    assert plan.netns_name("mlab-", plan.target_host(3)) == "mlab-target-3"
    assert plan.port_name("target-64") == "p-target-64"
    assert all(len(plan.port_name(f"target-{i}")) <= 15 for i in range(1, 65))
    with pytest.raises(PlanError):
        plan.primary_address("lb", 255)


def test_the_second_conduit_s_names_and_addresses() -> None:
    b = plan.CONDUIT_B
    assert (plan.lb_host(2, b), plan.node_host(2, b), plan.proxy_instance(2, b)) == (
        "lbb-2",
        "nodeb-2",
        "proxyb-2",
    )
    assert (plan.lb_host(2), plan.node_host(2), plan.proxy_instance(2)) == (
        "lb-2",
        "node-2",
        "proxy-2",
    )
    assert plan.lb_from_name("lbb-3") == (b, 3) and plan.lb_from_name("lb-3") == (plan.CONDUIT_A, 3)
    assert plan.proxy_from_name("proxyb-1") == (b, 1)
    for other in ("lb-x", "lbb", "proxy-1x", "target-1", "nsp"):
        assert plan.lb_from_name(other) is None and plan.proxy_from_name(other) is None, other
    assert plan.primary_cidr("lbb", 2) == "198.19.4.2/16"
    assert plan.primary_address("nodeb", 16) == "198.19.5.16"
    assert plan.external_address(4, 1, b) == "192.0.2.41/24"
    assert plan.external_address(6, 16, b) == "fd00:e::38/64"
    assert plan.lb_name_of_address("192.0.2.41") == "lbb-1"
    assert plan.lb_name_of_address("fd00:e::c") == "lb-2"
    assert plan.lb_name_of_address("192.0.2.30") is None
    # conduit-a's LB numbers only, as before
    assert plan.lb_of_external_address("192.0.2.41") is None
    assert plan.vip_next_hop_lbs(["192.0.2.41", "192.0.2.11"], b) == ([1], ["192.0.2.11"])
    assert plan.vip_cidr(4, b) == "203.0.113.2/32" and plan.vip_cidr(6, b) == "2001:db8::2/128"
    assert plan.proxy_address(3, b) == "198.19.5.3:7781"
    assert plan.external_port_name(16, b) == "x-lbb-16"
    assert all(len(plan.port_name(plan.node_host(i, b))) <= 15 for i in range(1, 17))
    assert plan.conduit_plan("conduit-b") is b
    with pytest.raises(PlanError, match="no conduit"):
        plan.conduit_plan("conduit-x")


def test_the_streams_of_the_lab_and_who_opens_them() -> None:
    names = {
        (streams, conduits): [
            s.name for s in LabSpec(streams=streams, conduits=conduits).stream_plans
        ]
        for streams in (1, 2)
        for conduits in (1, 2)
    }
    assert names == {
        (1, 1): ["stream-a"],
        (2, 1): ["stream-a", "stream-b"],
        (1, 2): ["stream-a", "stream-c"],
        (2, 2): ["stream-a", "stream-b", "stream-c"],
    }

    def opened(spec: LabSpec, targets: int = 8) -> dict[int, list[str]]:
        return {i: [s.name for s in plan.target_streams(spec, i)] for i in range(1, targets + 1)}

    # the default lab: stream-a everywhere
    assert set(map(tuple, opened(LabSpec()).values())) == {("stream-a",)}
    assert opened(LabSpec(streams=2)) == {
        1: ["stream-a"], 2: ["stream-a", "stream-b"], 3: ["stream-a"], 4: ["stream-b"],
        5: ["stream-a"], 6: ["stream-a", "stream-b"], 7: ["stream-a"], 8: ["stream-b"],
    }  # fmt: skip
    assert opened(LabSpec(streams=2, conduits=2), 4) == {
        1: ["stream-a", "stream-c"],
        2: ["stream-a", "stream-b"],
        3: ["stream-a", "stream-c"],
        4: ["stream-b"],
    }
    spec = LabSpec(streams=2, conduits=2)
    assert plan.stream_targets(spec, plan.STREAM_B, range(1, 5)) == [2, 4]
    assert plan.stream_targets(spec, plan.STREAM_C, [3, 1, 2]) == [1, 3]
    # each stream has a target of its own, and some target has two
    for s in spec.stream_plans:
        assert plan.stream_targets(spec, s, range(1, 5))
    # the servers listen on every stream's port
    assert plan.server_ports(LabSpec()) == [5000]
    assert plan.server_ports(spec) == [5000, 6000]
    assert plan.server_args(2, [6000, 5000]) == [
        "server", "--name", "target-2", "--address", "[::]:5000", "--address", "[::]:6000",
    ]  # fmt: skip
    assert plan.vip_endpoints([4, 6], plan.STREAM_B) == [
        "203.0.113.1:6000",
        "[2001:db8::1]:6000",
    ]
    assert plan.vip_endpoints([4], plan.STREAM_C) == ["203.0.113.2:5000"]


def test_streams_named_to_lab_tap() -> None:
    assert plan.resolve_stream("stream-b") == ("conduit-a", "stream-b")
    assert plan.resolve_stream("stream-c") == ("conduit-b", "stream-c")
    assert plan.resolve_stream("conduit-x/stream-z") == ("conduit-x", "stream-z")
    for bad in ("stream-z", "/stream-a", "conduit-a/", ""):
        with pytest.raises(PlanError):
            plan.resolve_stream(bad)


def test_what_an_lb_s_table_should_hold() -> None:
    opened = {
        1: [("conduit-a", "stream-a"), ("conduit-b", "stream-c")],
        2: [("conduit-a", "stream-a"), ("conduit-a", "stream-b")],
        3: [("conduit-a", "stream-a"), ("conduit-a", "stream-a")],  # listed twice: once
        4: [],
    }
    spec = LabSpec(streams=2, conduits=2)
    want = plan.table_want(spec, plan.CONDUIT_A, opened)
    assert want == {"stream-a": 3, "stream-b": 1}
    assert plan.table_want(spec, plan.CONDUIT_B, opened) == {"stream-c": 1}
    assert plan.table_want(spec, plan.CONDUIT_B, {}) == {"stream-c": 0}
    # streams the lab does not define are opened in vain (UNDEFINED): no LB holds them
    assert plan.table_want(LabSpec(), plan.CONDUIT_A, opened) == {"stream-a": 3}
    odd = {1: [("conduit-a", "stream-z"), ("conduit-x", "stream-a")]}
    assert plan.table_want(spec, plan.CONDUIT_A, odd) == {"stream-a": 0, "stream-b": 0}
    done = plan.TableCheck(want=want, have={"stream-a": 3, "stream-b": 1}, routable=4)
    assert done.done and done.entries == 4 and done.text("lb-1") == "lb-1:4/4"
    # in the table but not routed yet; a stream short of a target; routed, stale table
    assert not plan.TableCheck(want=want, have={"stream-a": 3, "stream-b": 1}, routable=3).done
    assert not plan.TableCheck(want=want, have={"stream-a": 3}, routable=4).done
    assert not plan.TableCheck(want=want, have={"stream-a": 4, "stream-b": 1}, routable=4).done
    # an LB that does not answer holds nothing
    assert not plan.TableCheck(want=want, have={}, routable=0).done
    assert plan.TableCheck(want={"stream-a": 0}, have={}, routable=0).done


def test_only_the_lab_s_own_namespaces_are_taken_for_it() -> None:
    for name in (
        "mlab-gw",
        "mlab-gw-2",
        "mlab-pri",
        "mlab-lb-1",
        "mlab-node-16",
        "mlab-target-64",
        "mlab-lbb-2",
        "mlab-nodeb-16",
    ):
        assert plan.is_lab_netns("mlab-", name), name
    for name in ("mlab-t123-gw", "mlab-probe-1-2", "mlab-lb-x", "mtest-1-lb", "xmlab-gw"):
        assert not plan.is_lab_netns("mlab-", name), name
    assert plan.is_lab_netns("mlab-t123-", "mlab-t123-target-2")
    plan.check_prefix("mlab-t123-")
    for bad in ("mlab", "lab-", "mlab-A-", "mlab-a-b-", "mtest-"):
        with pytest.raises(PlanError):
            plan.check_prefix(bad)


def test_targets_are_spread_over_the_nodes() -> None:
    assert plan.place_targets({}, range(1, 6), [1, 2]) == {1: 1, 2: 2, 3: 1, 4: 2, 5: 1}
    # the next one goes to the node with the fewest, the first on a tie
    assert plan.place_target({1: 1, 2: 2, 3: 1}, [1, 2]) == 2
    assert plan.place_target({1: 1, 2: 2}, [1, 2, 3]) == 3
    # a target on a node that is gone counts nowhere
    assert plan.place_target({1: 9, 2: 9}, [1]) == 1
    with pytest.raises(PlanError):
        plan.place_target({}, [])


def test_scale_plans() -> None:
    assert plan.scale_plan([1, 2, 3, 4], [], 5) == ScalePlan((), (), (5,))
    assert plan.scale_plan([1, 2, 3, 4, 5], [], 4) == ScalePlan((5,), (), ())
    assert plan.scale_plan([1, 2, 3], [], 1) == ScalePlan((3, 2), (), ())
    # a dead one is cleared and its place taken again
    assert plan.scale_plan([1, 2, 4], [3], 4) == ScalePlan((), (3,), (3,))
    assert plan.scale_plan([1, 2, 4], [3], 2) == ScalePlan((4,), (3,), ())
    assert plan.scale_plan([2, 3], [], 3) == ScalePlan((), (), (1,))
    assert plan.scale_plan([1, 2], [], 2).empty
    with pytest.raises(PlanError):
        plan.scale_plan([], [], -1)


@given(
    st.sets(st.integers(1, 40), max_size=20),
    st.sets(st.integers(1, 40), max_size=5),
    st.integers(0, 30),
)
def test_a_scale_plan_always_ends_with_the_number_asked_for(
    running: set[int], dead: set[int], want: int
) -> None:
    change = plan.scale_plan(running, dead, want)
    after = (running - set(change.remove)) | set(change.add)
    assert len(after) == want
    assert set(change.remove) <= running
    assert not set(change.add) & (running - set(change.remove))
    assert set(change.clear) == dead - running
    # the newest go first, and only when there are too many
    if change.remove:
        assert min(change.remove) > max(running - set(change.remove), default=0)


def test_the_gateway_route_follows_the_lbs() -> None:
    assert plan.gateway_route([2, 1], 4) == [
        "-4", "route", "replace", "203.0.113.1/32",
        "nexthop", "via", "192.0.2.11", "nexthop", "via", "192.0.2.12",
    ]  # fmt: skip
    assert plan.gateway_route([2], 6) == [
        "-6", "route", "replace", "2001:db8::1/128", "via", "fd00:e::c",
    ]  # fmt: skip
    assert plan.gateway_route([], 4) == ["-4", "route", "del", "203.0.113.1/32"]
    assert plan.gateway_route([1], 4, plan.CONDUIT_B) == [
        "-4", "route", "replace", "203.0.113.2/32", "via", "192.0.2.41",
    ]  # fmt: skip


def test_gateway_routers_names_and_interfaces() -> None:
    assert [plan.gateway_host(r) for r in (1, 2)] == ["gw", "gw-2"]
    assert [plan.gateway_instance(r) for r in (1, 2)] == ["bird-gw", "bird-gw-2"]
    assert plan.gateway_port_name(2) == "x-gw-2"
    assert plan.gateway_interface("macvlan", 1) == "ext"
    assert plan.gateway_interface("veth", 2) == "eth1"
    assert plan.gateway_interface("vlan", 1) == "ext.100"
    assert plan.gateway_interface("vlan", 2) == "eth1.100"
    for name, router in (("gateway", 1), ("gateway-1", 1), ("gateway-2", 2), ("gw", 1)):
        assert plan.gateway_router_from_name(name) == router, name
    for name in ("bird-gw", "bird-gw-2", "gw-2"):
        assert plan.gateway_router_from_name(name) is not None, name
    for name in ("lb-1", "gateways", "target-2", "gw-x"):
        assert plan.gateway_router_from_name(name) is None, name
    assert LabSpec(gateways=2).routers == (1, 2)
    assert LabSpec().routing == "bgp" and LabSpec().dynamic
    assert not LabSpec(routing="static").dynamic


def test_the_bgp_gateway_config() -> None:
    text = plan.gateway_bird_config(LabSpec(), 1)
    flat = " ".join(text.split())
    assert "router id 192.0.2.1;" in flat
    # its log says why a session went down (BFD, the connection closed, the hold timer)
    assert "log stderr all; debug protocols { states, events };" in flat
    assert (
        'protocol bfd { interface "ext" { min rx interval 100 ms; min tx interval 100 ms; '
        "multiplier 3; }; }" in flat
    )
    for family, channel, local, network, default in (
        (4, "ipv4", "192.0.2.1", "192.0.2.0/24", "0.0.0.0/0"),
        (6, "ipv6", "fd00:e::1", "fd00:e::/64", "::/0"),
    ):
        assert (
            f"protocol kernel K{family} {{ {channel} {{ import none; export where source = "
            "RTS_BGP; }; merge paths on; }" in flat
        )
        # the default goes to the LBs only: never into the gateway's own table
        assert f"protocol static DEF{family} {{ {channel}; route {default} unreachable; }}" in flat
        assert (
            f"template bgp LB{family} {{ local {local} port 10179 as 4248829953; passive on; "
            f"bfd on; hold time 3; error wait time 1, 10; direct; {channel} {{ import all; "
            f'export where proto = "DEF{family}"; next hop self; }}; dynamic name "lb{family}_"; }}'
        ) in flat
        assert (
            f"protocol bgp LBS{family} from LB{family} {{ neighbor range {network} port 10179 "
            "as 8103; }"
        ) in flat
    # "gw" is a keyword of BIRD's grammar: no protocol is named so
    assert " gw " not in flat and "protocol bgp gw" not in flat


def test_the_second_gateway_and_single_family_configs() -> None:
    text = plan.gateway_bird_config(LabSpec(gateways=2, external="vlan", ip_family="ipv6"), 2)
    flat = " ".join(text.split())
    assert "router id 192.0.2.2;" in flat  # a number, also on an IPv6-only lab
    assert 'interface "eth1.100"' in flat
    assert "local fd00:e::2 port 10179" in flat
    assert "ipv4" not in flat and "K4" not in flat


def test_the_static_bfd_gateway_config_covers_every_possible_lb() -> None:
    text = plan.gateway_bird_config(LabSpec(routing="static-bfd"), 1)
    flat = " ".join(text.split())
    low, high = plan.LIMITS["lbs"]
    hops4 = " ".join(f"via 192.0.2.{10 + i} bfd" for i in range(low, high + 1))
    hops6 = " ".join(f"via fd00:e::{10 + i:x} bfd" for i in range(low, high + 1))
    assert f"protocol static VIP4 {{ ipv4; route 203.0.113.1/32 {hops4} ; }}" in flat
    assert f"protocol static VIP6 {{ ipv6; route 2001:db8::1/128 {hops6} ; }}" in flat
    assert 'export where proto = "VIP4";' in flat and 'export where proto = "VIP6";' in flat
    assert "protocol bgp" not in flat and "merge paths on" in flat
    assert "203.0.113.2" not in flat
    # the second conduit's VIPs over every LB that conduit may have
    two = " ".join(plan.gateway_bird_config(LabSpec(routing="static-bfd", conduits=2), 1).split())
    hops_b = " ".join(f"via 192.0.2.{40 + i} bfd" for i in range(low, high + 1))
    assert (
        f"protocol static VIP4 {{ ipv4; route 203.0.113.1/32 {hops4} ; "
        f"route 203.0.113.2/32 {hops_b} ; }}" in two
    )
    with pytest.raises(PlanError):
        plan.gateway_bird_config(LabSpec(routing="static"), 1)


@pytest.mark.parametrize(
    "spec",
    [
        LabSpec(gateways=2),
        LabSpec(routing="static-bfd", gateways=2),
        LabSpec(ip_family="ipv6", external="vlan"),
        LabSpec(ip_family="ipv4", routing="static-bfd"),
        LabSpec(routing="static-bfd", conduits=2, gateways=2),
    ],
)
def test_bird_accepts_the_gateway_configs(spec: LabSpec, tmp_path: Path) -> None:
    bird = system.find_bird()
    if bird is None:
        pytest.skip("BIRD 2 is not installed (apt-get install bird2)")
    for router in spec.routers:
        config = tmp_path / f"bird-{router}.conf"
        config.write_text(plan.gateway_bird_config(spec, router))
        # -p: parse the configuration and exit
        checked = subprocess.run([bird, "-p", "-c", str(config)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def test_the_gateway_bird_command_line(tmp_path: Path) -> None:
    argv = plan.gateway_bird_args(tmp_path, 2, "/usr/sbin/bird")
    assert argv == [
        "/usr/sbin/bird", "-f",
        "-c", str(tmp_path / "bird-gw-2" / "bird.conf"),
        "-s", str(tmp_path / "bird-gw-2" / "run" / "bird.ctl"),
        "-P", str(tmp_path / "bird-gw-2" / "run" / "bird.pid"),
    ]  # fmt: skip


@pytest.mark.parametrize("family", ["dualstack", "ipv4", "ipv6"])
def test_the_nsp_configuration_is_valid_meridio_configuration(family: str) -> None:
    config = parse_config(plan.nsp_configuration(plan.FAMILIES[family]))
    assert config.trench is not None and config.trench.name == plan.TRENCH
    assert [v.address for v in config.vips] == [plan.vip_cidr(f) for f in plan.FAMILIES[family]]
    (flow,) = config.flows
    assert flow.stream.name == plan.STREAM and list(flow.destination_port_ranges) == ["5000"]
    assert config.streams[0].max_targets == plan.MAX_TARGETS
    # static routing: no attractor, no gateway (the LBs are given the gateways' addresses)
    assert not config.attractors and not config.gateways


@pytest.mark.parametrize("routing", ["static", "bgp"])
@pytest.mark.parametrize("family", ["dualstack", "ipv4", "ipv6"])
def test_the_nsp_configuration_with_two_streams_and_two_conduits(routing: str, family: str) -> None:
    families = plan.FAMILIES[family]
    spec = LabSpec(routing=routing, ip_family=family, streams=2, conduits=2)
    config = parse_config(plan.spec_nsp_configuration(spec))
    assert [c.name for c in config.conduits] == ["conduit-a", "conduit-b"]
    streams = {s.name: s.conduit.name for s in config.streams}
    assert streams == {"stream-a": "conduit-a", "stream-b": "conduit-a", "stream-c": "conduit-b"}
    flows = {f.name: f for f in config.flows}
    assert sorted(flows) == ["flow-a", "flow-b", "flow-c"]
    vips_a = [plan.vip_cidr(f) for f in families]
    vips_b = [plan.vip_cidr(f, plan.CONDUIT_B) for f in families]
    for name, stream, port, vips in (
        ("flow-a", "stream-a", "5000", vips_a),
        ("flow-b", "stream-b", "6000", vips_a),
        ("flow-c", "stream-c", "5000", vips_b),
    ):
        flow = flows[name]
        assert flow.stream.name == stream and list(flow.destination_port_ranges) == [port]
        assert [v.address for v in flow.vips] == vips
        assert sorted(p.lower() for p in flow.protocols) == ["sctp", "tcp", "udp"]
    if routing == "static":
        assert not config.attractors
    else:
        attractors = {a.name: [v.address for v in a.vips] for a in config.attractors}
        assert attractors == {"attractor-a": vips_a, "attractor-b": vips_b}
    # the default lab's configuration is as it always was
    assert plan.spec_nsp_configuration(LabSpec()) == plan.nsp_configuration((4, 6), routing="bgp")


@pytest.mark.parametrize("routing", ["bgp", "static-bfd"])
@pytest.mark.parametrize("family", ["dualstack", "ipv4", "ipv6"])
def test_the_nsp_configuration_has_the_attractor_and_gateways(routing: str, family: str) -> None:
    families = plan.FAMILIES[family]
    raw = plan.spec_nsp_configuration(LabSpec(routing=routing, ip_family=family, gateways=2))
    config = parse_config(raw)
    (attractor,) = config.attractors
    assert attractor.name == plan.ATTRACTOR and attractor.trench.name == plan.TRENCH
    assert [v.address for v in attractor.vips] == [plan.vip_cidr(f) for f in families]
    names = [g.name for g in attractor.gateways]
    assert names == [plan.gateway_name(f, r) for r in (1, 2) for f in families]
    by_name = {g.name: g for g in config.gateways}
    assert sorted(by_name) == sorted(names)
    for router in (1, 2):
        for f in families:
            gateway = by_name[plan.gateway_name(f, router)]
            assert gateway.address == plan.gateway_router_address(f, router)
            assert gateway.ip_family == f"ipv{f}"
            assert gateway.protocol == ("bgp" if routing == "bgp" else "static")
            assert gateway.bfd and gateway.trench.name == plan.TRENCH
            spec = gateway.bfd_spec
            assert (spec.min_tx, spec.min_rx, spec.multiplier) == (100, 100, 3)
            if routing == "bgp":
                assert (gateway.local_asn, gateway.remote_asn) == (8103, 4248829953)
                assert (gateway.local_port, gateway.remote_port) == (10179, 10179)
                assert gateway.hold_time == 3
    item = raw["gateways"]["items"][0]
    if routing == "bgp" and family != "ipv6":
        assert item == {
            "name": "gateway-v4", "address": "192.0.2.1", "ip-family": "ipv4",
            "protocol": "bgp", "bfd": True, "min-tx": 100, "min-rx": 100, "multiplier": 3,
            "hold-time": 3, "local-asn": 8103, "remote-asn": 4248829953,
            "local-port": 10179, "remote-port": 10179, "trench": plan.TRENCH,
        }  # fmt: skip


@pytest.mark.parametrize(
    "spec",
    [
        LabSpec(),
        LabSpec(ip_family="ipv4", mechanism="vxlan", external="veth", lb_mode="kernel"),
        LabSpec(ip_family="ipv6", external="vlan"),
        LabSpec(routing="static-bfd", gateways=2),
        LabSpec(routing="static"),
        LabSpec(routing="static", gateways=2, ip_family="ipv4"),
        LabSpec(streams=2, conduits=2),
        LabSpec(streams=2, conduits=2, routing="static", mechanism="vxlan"),
    ],
)
def test_every_command_line_is_settings_its_role_takes(spec: LabSpec, tmp_path: Path) -> None:
    config = plan.nsp_config_path(tmp_path)
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump(plan.spec_nsp_configuration(spec)))
    lines = {
        "nsp": plan.nsp_args(tmp_path),
        "ipam": plan.ipam_args(tmp_path, spec.families),
        "lb": plan.lb_args(tmp_path, spec, 2),
        "proxy": plan.proxy_args(tmp_path, spec, 1),
        "target": plan.target_args(tmp_path, spec, 3, 1),
    }
    if spec.conduits == 2:
        lines |= {
            "lbb": plan.lb_args(tmp_path, spec, 2, plan.CONDUIT_B),
            "proxyb": plan.proxy_args(tmp_path, spec, 1, plan.CONDUIT_B),
        }
    for key, argv in lines.items():
        role = key.removesuffix("b") if key in ("lbb", "proxyb") else key
        assert argv[0] == f"--role={role}"
        cls = load_role(role)
        settings = load_settings(cls.Settings, flags=parse_flag_args(argv[1:]))
        cls.check_settings(settings)
    lb = " ".join(lines["lb"])
    assert "--external-addresses=" in lb
    if spec.dynamic:
        # the LB takes its gateways and VIPs from the NSP's attractor
        assert f"--attractor={plan.ATTRACTOR}" in lines["lb"] and "--gateways=" not in lb
    else:
        gateways = [plan.gateway_router_address(f, r) for r in spec.routers for f in spec.families]
        assert f"--gateways={','.join(gateways)}" in lines["lb"] and "--attractor" not in lb
    if spec.external == "veth":
        assert "--external-interface=eth1" in lb
    else:
        assert f"--external-kind={spec.external}" in lb
    # the target serves TAPA on its own socket and opens nothing by itself
    target = lines["target"]
    assert f"--socket={tmp_path / 'target-3' / 'run' / 'ambassador.sock'}" in target
    assert not [a for a in target if a.startswith(("--streams", "--trench", "--conduit="))]
    proxies = "conduit-a=198.19.2.1:7781"
    if spec.conduits == 2:
        proxies += ",conduit-b=198.19.5.1:7781"
        assert "--conduit=conduit-b" in lines["lbb"] and "--conduit=conduit-b" in lines["proxyb"]
        assert "--connect-listen=198.19.4.2:7779" in lines["lbb"]
        assert "--instance=proxyb-1" in lines["proxyb"]
        # both proxies of a node name the node alike: the target tells them the same
        assert "--node=node-1" in lines["proxyb"] and "--node=node-1" in lines["proxy"]
        if spec.dynamic:
            assert "--attractor=attractor-b" in lines["lbb"]
    assert f"--proxies={proxies}" in target and "--node=node-1" in target


def test_lab_specs_are_checked() -> None:
    LabSpec().check()
    for bad in (
        LabSpec(lbs=0),
        LabSpec(targets=plan.MAX_TARGETS + 1),
        LabSpec(proxies=17),
        LabSpec(ip_family="ipv5"),
        LabSpec(mechanism="gre"),
        LabSpec(lb_mode="fast"),
        LabSpec(external="ipvlan"),
        LabSpec(routing="ospf"),
        LabSpec(gateways=0),
        LabSpec(gateways=3),
        LabSpec(prefix="lab-"),
        LabSpec(streams=3),
        LabSpec(streams=0),
        LabSpec(conduits=3),
    ):
        with pytest.raises(PlanError):
            bad.check()


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    state = LabState.from_spec(
        LabSpec(
            targets=3, ip_family="ipv6", routing="static-bfd", gateways=2, streams=2, conduits=2
        )
    )
    state.targets = {"1": 1, "2": 2}
    state.lb_indexes, state.lbb_indexes = [1, 2], [1]
    state.set_routed_lbs_of(plan.CONDUIT_B, [1])
    save(tmp_path, state)
    again = load(tmp_path)
    assert again is not None and again.spec == state.spec and again.target_nodes == {1: 1, 2: 2}
    assert again.routing == "static-bfd" and again.gateways == 2
    assert (again.spec.streams, again.spec.conduits) == (2, 2)
    assert again.lbs_of(plan.CONDUIT_A) == [1, 2] and again.lbs_of(plan.CONDUIT_B) == [1]
    assert again.routed_lbs_of(plan.CONDUIT_B) == [1] and again.routed_lbs_of(plan.CONDUIT_A) == []
    # a state file from before the gateways ran BIRD is a static lab with one gateway
    text = (tmp_path / "lab.json").read_text()
    text = text.replace('"routing": "static-bfd",', "").replace('"gateways": 2,', "")
    (tmp_path / "lab.json").write_text(text)
    old = load(tmp_path)
    assert old is not None and old.routing == "static" and old.gateways == 1
    # a state file from before TAPA: one stream, one conduit
    text = (tmp_path / "lab.json").read_text()
    text = text.replace('"streams": 2,', "").replace('"conduits": 2,', "")
    (tmp_path / "lab.json").write_text(text)
    older = load(tmp_path)
    assert older is not None and (older.streams, older.conduits) == (1, 1)
    # a state file from before the supervisors: restarts on, its processes not supervised
    assert older.restart and LabState.from_spec(LabSpec(restart=False)).spec.restart is False
    proc = msgspec.json.decode(
        b'{"name": "nsp", "role": "nsp", "netns": "mlab-nsp", "pid": 1, "start_time": 2,'
        b' "log": "nsp.log", "argv": ["meridiod"]}',
        type=Process,
    )
    assert not proc.supervised and proc.status_file == ""
    (tmp_path / "lab.json").write_text("{not json")
    assert load(tmp_path) is None
    assert load(tmp_path / "nowhere") is None


def test_the_traffic_client_runs_on_the_gateway_against_the_vips(tmp_path: Path) -> None:
    save(tmp_path, LabState.from_spec(LabSpec(ip_family="ipv6", prefix="mlab-x-")))
    lab = Lab(tmp_path, "mlab-x-")
    argv = lab.traffic_argv(["--udp", "-c", "5"])
    assert argv[:4] == ["ip", "netns", "exec", "mlab-x-gw"]
    assert argv[-6:] == ["client", "--address", "[2001:db8::1]:5000", "--udp", "-c", "5"]
    own = lab.traffic_argv(["-a", "[2001:db8::1]:7"])
    assert own[-3:] == ["client", "-a", "[2001:db8::1]:7"]
    with pytest.raises(LabError, match="no stream 'stream-b'"):
        lab.traffic_argv([], stream="stream-b")
    with pytest.raises(LabError, match="no IPv4"):
        lab.traffic_argv([], families=[4])
    save(tmp_path, LabState.from_spec(LabSpec(streams=2, conduits=2, prefix="mlab-x-")))
    b = lab.traffic_argv(["-d", "2"], stream="stream-b", command="probe")
    assert b[-7:] == [
        "probe", "--address", "203.0.113.1:6000", "--address", "[2001:db8::1]:6000", "-d", "2",
    ]  # fmt: skip
    c = lab.traffic_argv([], families=[6], stream="stream-c")
    assert c[-3:] == ["client", "--address", "[2001:db8::2]:5000"]
    with pytest.raises(LabError, match="no lab here"):
        Lab(tmp_path / "none").traffic_argv([])


# --- what BIRD and ip answer -------------------------------------------------------------------

# ``show protocols all`` of a gateway (BIRD 2.0.12), shortened; trailing blanks are BIRD's
PROTOCOLS = "\n".join(
    [
        "2002-Name       Proto      Table      State  Since         Info",
        "1002-device1    Device     ---        up     2026-12-05 07:46:04  ",
        "1002-K4         Kernel     master4    up     2026-12-05 07:46:04  ",
        "1006-  Channel ipv4",
        "     State:          UP",
        " ",
        "1002-LBS4       BGP        ---        start  2026-12-05 07:46:04  Passive       ",
        "1006-  BGP state:          Passive",
        "     Neighbor range:   192.0.2.0/24",
        " ",
        "1002-lb4_1      BGP        ---        up     2026-12-05 07:46:08  Established   ",
        "1006-  BGP state:          Established",
        "     Neighbor address: 192.0.2.12",
        "     Neighbor AS:      8103",
        "   Channel ipv4",
        "     State:          UP",
        " ",
        "1002-lb6_1      BGP        ---        start  2026-12-05 07:46:15  Active        "
        "Socket: Connection closed",
        "1006-  BGP state:          Active",
        "     Neighbor address: fd00:e::b",
        " ",
        "0000 ",
        "",
    ]
).encode()

BFD = "\n".join(
    [
        "1020-bfd1:",
        " IP address                Interface  State      Since         Interval  Timeout",
        " 192.0.2.11                ext        Up         2026-12-05 07:46:09    0.100    0.300",
        " 192.0.2.13                ext        Down       2026-12-05 07:46:03    1.000    0.000",
        "0000 ",
        "",
    ]
).encode()


def test_bird_replies_are_read_and_parsed() -> None:
    reply = system.read_bird_reply(io.BytesIO(PROTOCOLS))
    assert reply[0] == (2002, "Name       Proto      Table      State  Since         Info")
    assert reply[-1] == (0, "")
    protocols = {p.name: p for p in system.parse_bird_protocols(reply)}
    assert list(protocols) == ["device1", "K4", "LBS4", "lb4_1", "lb6_1"]
    up = protocols["lb4_1"]
    assert (up.proto, up.state, up.since, up.info) == (
        "BGP",
        "up",
        "2026-12-05 07:46:08",
        "Established",
    )
    assert (up.neighbor, up.bgp_state) == ("192.0.2.12", "Established")
    down = protocols["lb6_1"]
    assert down.info == "Active        Socket: Connection closed"
    assert (down.neighbor, down.bgp_state) == ("fd00:e::b", "Active")
    assert protocols["LBS4"].neighbor == "" and protocols["device1"].info == ""
    sessions = system.parse_bfd_sessions(system.read_bird_reply(io.BytesIO(BFD)))
    assert sessions == [
        system.BfdSession("192.0.2.11", "ext", "Up", "2026-12-05 07:46:09"),
        system.BfdSession("192.0.2.13", "ext", "Down", "2026-12-05 07:46:03"),
    ]
    # the greeting is a reply of one line; a reply cut short is an error
    assert system.read_bird_reply(io.BytesIO(b"0001 BIRD 2.0.12 ready.\n")) == [
        (1, "BIRD 2.0.12 ready.")
    ]
    with pytest.raises(system.BirdError):
        system.read_bird_reply(io.BytesIO(b"1002-lb4_1  BGP\n"))


def test_a_bird_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(system.BirdError):
        system.bird_query(tmp_path / "none.ctl", "show status")
    assert not system.bird_ready(tmp_path / "none.ctl")


def test_route_next_hops_from_ip_json() -> None:
    multipath = [
        {
            "dst": "203.0.113.1",
            "protocol": "bird",
            "nexthops": [
                {"gateway": "192.0.2.11", "dev": "ext", "weight": 1},
                {"gateway": "192.0.2.12", "dev": "ext", "weight": 1},
            ],
        }
    ]
    single = [{"dst": "2001:db8::1", "gateway": "fd00:e::c", "dev": "ext"}]
    assert system.route_gateways(multipath) == ["192.0.2.11", "192.0.2.12"]
    assert system.route_gateways(single) == ["fd00:e::c"]
    assert system.route_gateways([{"dst": "203.0.113.1", "type": "blackhole"}]) == []


def test_what_lbs_and_taps_answer_is_read() -> None:
    from meridio.api.ambassador.v1 import StreamResponse, StreamStatus, StreamStatusStatus
    from meridio.api.meridio.admin.v1 import LbStream, LbTarget, ShowResponse

    show = ShowResponse(
        streams=[
            LbStream(
                name="stream-a",
                digest="d-a",
                targets=[LbTarget(identifier=1, ips=["198.18.0.2/32"]), LbTarget(identifier=2)],
            ),
            LbStream(name="stream-b", digest="d-b", targets=[]),
        ]
    )
    assert system.lb_stream_counts(show) == {"stream-a": 2, "stream-b": 0}
    assert system.lb_digests(show) == {"stream-a": "d-a", "stream-b": "d-b"}
    assert system.lb_stream_counts(None) == {} and system.lb_digests(None) == {}
    reply = StreamResponse(
        stream_status=[
            StreamStatus(
                status=StreamStatusStatus.UNAVAILABLE,
                stream=system.tap_stream("trench-a", "conduit-b", "stream-c"),
            ),
            StreamStatus(
                status=StreamStatusStatus.OPEN,
                stream=system.tap_stream("trench-a", "conduit-a", "stream-a"),
            ),
        ]
    )
    assert system.tap_rows(reply) == [
        {
            "trench": "trench-a",
            "conduit": "conduit-b",
            "stream": "stream-c",
            "status": "UNAVAILABLE",
        },
        {"trench": "trench-a", "conduit": "conduit-a", "stream": "stream-a", "status": "OPEN"},
    ]


def test_a_tap_that_is_not_there(tmp_path: Path) -> None:
    assert system.run_async(system.tap_list(tmp_path / "none.sock")) is None
    stream = system.tap_stream("trench-a", "conduit-a", "stream-a")
    with pytest.raises(LabError, match="no TAPA"):
        system.run_async(system.tap_call(tmp_path / "none.sock", "open", stream, timeout=1))


# --- supervision ----------------------------------------------------------------------------------


def test_the_restart_delay_doubles_while_a_process_dies_young_and_starts_afresh() -> None:
    delays = []
    delay = None
    for _ in range(9):
        delay = plan.restart_delay(delay, ran=1.0)
        delays.append(delay)
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
    # a process that ran long enough starts afresh
    assert plan.restart_delay(10.0, ran=plan.RESTART_RESET_AFTER) == 0.2
    assert plan.restart_delay(None, ran=0.0) == 0.2


@given(st.lists(st.floats(min_value=0, max_value=100), max_size=30))
def test_the_restart_delay_stays_within_its_bounds(runs: list[float]) -> None:
    delay = None
    for ran in runs:
        delay = plan.restart_delay(delay, ran)
        assert plan.RESTART_DELAY_MIN <= delay <= plan.RESTART_DELAY_MAX


def test_the_supervisor_command_line(tmp_path: Path) -> None:
    args = plan.supervise_args(tmp_path, "lb-1")
    assert args == [
        "--status", str(tmp_path / "lb-1" / "supervise.json"),
        "--name", "lb-1",
        "--hold", str(tmp_path / "down"),
        "--",
    ]  # fmt: skip
    assert plan.supervise_args(tmp_path, "nsp", restart=False)[-2:] == ["--no-restart", "--"]
    assert set(plan.SUPERVISED_ROLES) == set(plan.ROLE_ORDER) - {"gateway"}


# --- chaos ----------------------------------------------------------------------------------------


def test_what_chaos_kills() -> None:
    assert [plan.chaos_kind(n) for n in ("nsp", "ipam", "lb-2", "lbb-1", "proxy-1")] == [
        "nsp", "ipam", "lb", "lb", "proxy",
    ]  # fmt: skip
    assert [plan.chaos_kind(n) for n in ("proxyb-2", "target-3", "server-3")] == [
        "proxy", "target", "server",
    ]  # fmt: skip
    assert plan.chaos_kind("bird-gw") is None and plan.chaos_kind("target-x") is None
    assert plan.parse_chaos_kinds("target, nsp,lb") == ("nsp", "lb", "target")
    assert plan.parse_chaos_kinds("server") == ("server",)
    for bad in ("", "nsp,gateway", ",,"):
        with pytest.raises(PlanError, match="--kinds"):
            plan.parse_chaos_kinds(bad)
    assert plan.target_of("server-2") == "target-2" and plan.target_of("target-4") == "target-4"
    assert plan.target_of("lb-1") is None


def test_chaos_draws_a_kind_evenly_then_an_instance() -> None:
    import random

    names = ["nsp", "ipam", "lb-1", "lb-2", "proxy-1", "proxy-2", "bird-gw"]
    names += [f"target-{i}" for i in range(1, 9)] + [f"server-{i}" for i in range(1, 9)]
    rand = random.Random(7)
    drawn = [plan.chaos_pick(rand, names, plan.CHAOS_KINDS) for _ in range(5000)]
    kinds = Counter(k for k, _ in drawn if k)
    assert set(kinds) == set(plan.CHAOS_KINDS)  # never a server or a gateway by default
    assert all(900 < n < 1100 for n in kinds.values()), kinds
    targets = Counter(n for k, n in drawn if k == "target")
    assert len(targets) == 8 and min(targets.values()) > 80
    # the same seed, the same draws
    again = random.Random(7)
    assert [plan.chaos_pick(again, names, plan.CHAOS_KINDS) for _ in range(5000)] == drawn
    # kinds without a candidate are not drawn; nothing to kill at all is None
    assert plan.chaos_pick(rand, ["nsp", "target-1"], ("lb", "nsp")) == ("nsp", "nsp")
    assert plan.chaos_pick(rand, ["bird-gw"], plan.CHAOS_KINDS) is None


def test_losses_are_put_down_to_the_last_kill_before_them() -> None:
    kills = [
        plan.ChaosKill(at=100.0, kind="lb", name="lb-1", back=1.0, whole=2.0),
        plan.ChaosKill(at=110.0, kind="target", name="target-2", back=1.0, whole=1.5, settled=3),
        plan.ChaosKill(at=120.0, kind="nsp", name="nsp", back=2.0, whole=None),
    ]
    lost = [
        plan.ChaosLoss(at=95.0, host="target-1"),  # before any kill
        plan.ChaosLoss(at=111.0, host="target-2"),
        plan.ChaosLoss(at=112.0, host="target-3"),
        plan.ChaosLoss(at=109.95, host="target-2"),  # within the slack: the target kill's
        plan.ChaosLoss(at=109.5, host="target-4"),  # the lab whole since 102: no kill's
        plan.ChaosLoss(at=113.9, host="target-1"),  # kernels as before at 113, grace 1 s
        plan.ChaosLoss(at=150.0, host="target-1"),  # the NSP kill never recovered: its
    ]
    failed = [plan.ChaosLoss(at=100.2), plan.ChaosLoss(at=100.9), plan.ChaosLoss(at=100.5)]
    per_kill, unexplained = plan.attribute(kills, lost)
    assert [x.host for x in unexplained] == ["target-1", "target-4"]
    assert [x.host for x in per_kill[1]] == ["target-2", "target-2", "target-3", "target-1"]
    assert per_kill[0] == [] and [x.at for x in per_kill[2]] == [150.0]
    assert kills[1].recovered == 113.0 and kills[0].recovered == 102.0
    assert kills[2].recovered is None
    failed_per_kill, _ = plan.attribute(kills, failed)
    figures = {
        f.kind: f for f in plan.chaos_figures(kills, per_kill, failed_per_kill, plan.CHAOS_KINDS)
    }
    assert figures["target"].lost == 4 and figures["target"].lost_elsewhere == 2
    assert figures["lb"].failed_connects == 3
    assert figures["lb"].failure_span == pytest.approx(0.7)
    assert figures["lb"].back_max == 1.0 and figures["lb"].whole_max == 2.0
    assert figures["nsp"].not_recovered == 1 and figures["proxy"].kills == 0
    missed = plan.chaos_verdict(figures.values())
    assert missed == [
        "nsp: the lab was not whole again after 1 kill(s)",
        "nsp: 1 connection(s) lost",
        "target: 2 connection(s) to other targets lost",
    ]
    # an LB kill failing new connects for a second or more misses its goal
    slow = [plan.ChaosLoss(at=100.0), plan.ChaosLoss(at=101.2)]
    figures_lb = plan.chaos_figures(kills[:1], {0: []}, {0: slow}, ("lb",))
    assert plan.chaos_verdict(figures_lb) == ["lb: new connects failed for 1.20 s (at most 1 s)"]
    assert plan.failure_span([]) == 0.0 and plan.failure_span(slow[:1]) == 0.0


def test_when_a_lost_connection_broke() -> None:
    timed_out = {"state": "lost", "ended": 20.0, "error": "no reply for more than 3s"}
    reset = {"state": "lost", "ended": 20.0, "error": "Connection reset by peer"}
    assert plan.broke_at(1000.0, timed_out, 3.0) == 1017.0
    assert plan.broke_at(1000.0, reset, 3.0) == 1020.0
    assert plan.broke_at(1000.0, {"state": "lasted", "ended": 20.0}, 3.0) is None


# --- what a namespace's kernel holds --------------------------------------------------------------


def test_kernel_states_compare_what_matters() -> None:
    links = [
        {"ifindex": 7, "ifname": "ext0", "flags": ["UP"], "address": "aa:bb:cc:00:00:01",
         "master": None, "ifalias": "meridio-lb-external", "linkinfo": {"info_kind": "macvlan"},
         "addr_info": [
             {"family": "inet", "local": "192.0.2.11", "prefixlen": 24, "scope": "global"},
             {"family": "inet6", "local": "fe80::a8bb:ccff:fe00:1", "prefixlen": 64,
              "scope": "link"},
         ]},
    ]  # fmt: skip
    again = [dict(links[0], ifindex=9, address="aa:bb:cc:00:00:02")]
    again[0]["addr_info"] = [links[0]["addr_info"][0]]
    assert system.normal_links(links) == system.normal_links(again)
    assert system.normal_addresses(links) == ["ext0 192.0.2.11/24"]
    routes = [
        {"dst": "default", "gateway": "198.18.0.4", "dev": "lbx", "table": "5010",
         "protocol": "static", "flags": []},
        {"type": "local", "dst": "fe80::1", "dev": "eth0", "table": "local"},
        {"dst": "203.0.113.1", "nexthops": [{"gateway": "192.0.2.12", "dev": "ext", "flags": []},
                                            {"gateway": "192.0.2.11", "dev": "ext"}]},
    ]  # fmt: skip
    normal = system.normal_routes(routes, 4)
    assert len(normal) == 2 and all(r.startswith("v4 ") for r in normal)
    swapped = [routes[0], dict(routes[2], nexthops=list(reversed(routes[2]["nexthops"])))]
    assert system.normal_routes(swapped, 4) == normal
    ruleset = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "meridio-lb", "handle": 3}},
            {"rule": {"family": "inet", "table": "meridio-lb", "chain": "c", "handle": 9,
                      "expr": [{"counter": {"packets": 5, "bytes": 300}}, {"accept": None}]}},
        ]
    }  # fmt: skip
    renumbered = json.loads(
        json.dumps(ruleset)
        .replace('"handle": 3', '"handle": 4')
        .replace('"packets": 5', '"packets": 9')
    )
    assert system.normal_nft(ruleset) == system.normal_nft(renumbered)
    assert len(system.normal_nft(ruleset)) == 2
    saved = "# Generated by iptables-save\n*raw\n:PREROUTING ACCEPT [12:345]\n"
    saved += "-A PREROUTING -j X\nCOMMIT\n"
    assert system.normal_xtables(saved, 4) == [
        "v4 raw -A PREROUTING -j X",
        "v4 raw :PREROUTING ACCEPT",
    ]
    before = {"rules": ["a", "b"], "processes": ["bird", "meridiod"]}
    after = {"rules": ["b", "c"], "processes": ["bird", "bird", "meridiod"]}
    assert system.kernel_state_diff(before, after) == [
        "+ processes bird", "+ rules c", "- rules a",
    ]  # fmt: skip
    assert system.kernel_state_diff(before, before) == []


def test_the_chaos_report_from_the_traffic_reports() -> None:
    from datetime import UTC, datetime
    from typing import cast

    from rich.console import Console

    from meridio.lab.chaos import Chaos, ChaosSettings, KillRecord, kill_lines
    from meridio.lab.cli import print_chaos

    t0 = 1_800_000_000.0
    iso = datetime.fromtimestamp(t0, UTC).isoformat(timespec="milliseconds")
    chaos = Chaos(cast(Lab, None), ChaosSettings(duration=30, seed=5, kinds=("lb", "target")))
    chaos.kills = [
        KillRecord(at=t0 + 5, kind="lb", name="lb-1", pid=10, back=2.0, whole=2.5, settled=3),
        KillRecord(at=t0 + 12, kind="target", name="target-2", pid=11, back=1, whole=1, settled=1),
    ]
    conn = {"hosts": {}, "sent": 0, "received": 0, "dropped": 0}
    tcp = {
        **conn,
        "started": iso,
        "settings": {"timeout": 3.0},
        "hosts": {"target-1": 2, "target-2": 1},
        "lost_connections": 2,
        "lost_per_host": {"target-2": 1, "target-1": 1},
        "failed_connects": 1,
        "connections": [
            {"state": "lost", "host": "target-2", "ended": 12.5, "error": "reset"},
            {"state": "lost", "host": "target-1", "ended": 20.0, "error": "no reply for 3s"},
            {"state": "failed", "host": None, "started": 5.3, "ended": 7.3, "error": "timeout"},
            {"state": "lasted", "host": "target-1", "ended": 30.0, "error": None},
        ],
    }
    probe = {
        "started": iso,
        "attempts": 600,
        "ok": 598,
        "failed": 2,
        "errors": {"timeout": 2},
        "failures": [{"t": 5.1, "error": "timeout"}, {"t": 5.5, "error": "timeout"}],
    }
    report = chaos._report({"tcp": tcp, "probe": probe}, elapsed=40.0)
    kinds = {f["kind"]: f for f in report["kinds"]}
    assert kinds["lb"]["failed_connects"] == 3 and kinds["lb"]["lost"] == 0
    assert kinds["lb"]["failure_span"] == pytest.approx(0.4)
    assert kinds["target"]["lost"] == 1 and kinds["target"]["lost_elsewhere"] == 0
    # the connection lost at 17 s (20 s less the timeout) broke while the lab was whole
    assert [x["host"] for x in report["unexplained"]["lost"]] == ["target-1"]
    assert report["kills"][0]["failed_after"] == [0.1, 0.3, 0.5]
    assert report["missed"] == [
        "no kill to blame (before the first, or while the lab was whole): 1 connection(s) lost"
    ]
    assert not report["ok"] and report["seed"] == 5
    assert report["traffic"]["probe"]["failed"] == 2
    lines = kill_lines(report)
    assert lines[0].split() == [
        "0.0", "s", "lb-1", "0", "lost,", "3", "connects", "failed", "within", "0.40", "s",
    ]  # fmt: skip
    assert "target-2 x1" in lines[1]
    out = io.StringIO()
    print_chaos(Console(file=out, width=200), report)
    text = out.getvalue()
    assert "no kill to blame: 1 lost" in text and "missed:" in text
