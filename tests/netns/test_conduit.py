"""Conduits without NSM: LBs, proxies and targets wired by the connect service.

Each variant is one module-scoped topology (tests/netns/conduittopo.py): two LBs, two proxies
("nodes") and four targets, IPAM and NSP, a client routed to the VIPs over both LBs. The first
variant (veth, dual-stack) runs every scenario; the others (vxlan over an IPv4 or IPv6 primary
network, single-stack conduits) run the checks that differ with the mechanism or the family.
Scenarios that add or remove pieces put the topology back as they found it.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from meridio.api.nsp.v1 import TargetStatus, TargetType
from tests.netns.conduittopo import (
    IPAM_V4,
    IPAM_V6,
    SMALL_STREAM,
    ConduitTopology,
    dump,
    in_network,
    tcp_echo,
    udp_probe,
    wait_until,
)
from tests.netns.daemons import NOT_SERVING, health_status, run_async
from tests.waiting import HANG

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@dataclass(frozen=True)
class Variant:
    mechanism: str
    ip_family: str
    underlay: int = 4
    full: bool = False  # run every scenario

    @property
    def id(self) -> str:
        return f"{self.mechanism}-{self.ip_family}-underlay{self.underlay}"


VARIANTS = [
    Variant("veth", "dualstack", full=True),
    Variant("vxlan", "dualstack"),
    Variant("veth", "ipv4"),
    Variant("vxlan", "ipv6", underlay=6),
]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.id)
def topology(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Variant, ConduitTopology]]:
    variant: Variant = request.param
    workdir = tmp_path_factory.mktemp(f"cdt-{variant.id}")
    with ConduitTopology(
        workdir,
        mechanism=variant.mechanism,
        ip_family=variant.ip_family,
        underlay=variant.underlay,
    ) as topo:
        wait_settled(topo)
        yield variant, topo


@pytest.fixture
def topo(topology: tuple[Variant, ConduitTopology]) -> ConduitTopology:
    return topology[1]


@pytest.fixture
def full(topology: tuple[Variant, ConduitTopology]) -> ConduitTopology:
    variant, topo = topology
    if not variant.full:
        pytest.skip(f"scenario runs on the {VARIANTS[0].id} variant")
    return topo


# -- what "settled" means -------------------------------------------------------------------------


def registered(topo: ConduitTopology) -> dict[tuple[str, ...], int]:
    """ips -> identifier of every ENABLED target in NSP (fails on a disabled one)."""
    out = {}
    for t in topo.nsp_targets():
        if t.status != TargetStatus.ENABLED:
            return {}
        out[tuple(t.ips)] = int(t.context["identifier"])
    return out


def conduit_addresses(topo: ConduitTopology, name: str) -> tuple[str, ...]:
    target = topo.targets[name]
    addresses = topo.global_addresses(target.ns, "conduit0")
    return tuple(sorted(addresses, key=lambda a: (ipaddress.ip_interface(a).version, a)))


def mesh_problems(topo: ConduitTopology) -> list[str]:
    """Everything that differs from a fully formed mesh (empty when settled)."""
    problems = []
    lbs, nodes = list(topo.lbs), list(topo.nodes)
    lb_side: dict[str, set[str]] = {}
    for lb in lbs:
        links = topo.conduit_links(topo.lbs[lb].ns, "lbc")
        if len(links) != len(nodes):
            problems.append(f"{lb} has {len(links)} conduit links, not {len(nodes)}")
        lb_side[lb] = {
            a.split("/")[0]
            for link in links
            for a in topo.global_addresses(topo.lbs[lb].ns, link["ifname"])
        }
    for node in nodes:
        links = topo.conduit_links(topo.nodes[node].ns, "lb")
        if len(links) != len(lbs):
            problems.append(f"{node} has {len(links)} LB links, not {len(lbs)}")
        if any(link.get("master") != "bridge0" for link in links):
            problems.append(f"{node}: an LB link is not a port of bridge0")
        for family in topo.families:
            hops = topo.egress_hops(node, family)
            expected = {
                a
                for lb in lbs
                for a in lb_side[lb]
                if ipaddress.ip_address(a).version == family
                and in_network(a, topo.global_addresses(topo.nodes[node].ns, "bridge0"))
            }
            if hops != expected or len(hops) != len(lbs):
                problems.append(f"{node} IPv{family} egress via {hops}, expected {expected}")
    nsp = registered(topo)
    wanted = {conduit_addresses(topo, t) for t in topo.targets}
    if set(nsp) != wanted:
        problems.append(f"NSP has {sorted(nsp)}, targets have {sorted(wanted)}")
    if len(set(nsp.values())) != len(nsp):
        problems.append(f"identifiers not unique: {nsp}")
    for lb in lbs:
        shown = {ips: i for i, ips in topo.lb_target_ips(lb)}
        if shown != nsp:
            problems.append(f"{lb} table {shown} differs from NSP {nsp}")
    return problems


def wait_settled(topo: ConduitTopology) -> None:
    try:
        wait_until(lambda: not mesh_problems(topo), HANG, "mesh settled", interval=0.2)
    except AssertionError:
        raise AssertionError(f"mesh not settled: {mesh_problems(topo)}\n{dump(topo)}") from None


# -- every variant --------------------------------------------------------------------------------


def test_full_mesh_forms(topo: ConduitTopology) -> None:
    assert mesh_problems(topo) == []
    frontends = topo.nsp_targets(TargetType.FRONTEND)
    assert sorted(t.context["connect"] for t in frontends) == sorted(
        lb.connect for lb in topo.lbs.values()
    )
    for t in topo.targets.values():
        assert {link["ifname"] for link in topo.conduit_links(t.ns, "conduit")} == {"conduit0"}
        kinds = {link.get("linkinfo", {}).get("info_kind") for link in topo.links(t.ns)}
        assert topo.mechanism in kinds
    for node in topo.nodes.values():  # no querier on a conduit: snooping would only cost
        (bridge,) = topo.conduit_links(node.ns, "bridge0")
        assert bridge["linkinfo"]["info_data"]["mcast_snooping"] == 0


def test_addresses_unique_and_inside_their_prefixes(topo: ConduitTopology) -> None:
    allocations = topo.allocations()
    node_prefixes: dict[str, set[str]] = {}
    for a in allocations:
        node_prefixes.setdefault(a.node, set()).add(a.prefix)
    trench = [p for f, p in ((4, IPAM_V4), (6, IPAM_V6)) if f in topo.families]
    all_prefixes = [p for ps in node_prefixes.values() for p in ps]
    assert len(all_prefixes) == len(set(all_prefixes)) == len(topo.nodes) * len(topo.families)
    assert all(in_network(p.split("/")[0], trench) for p in all_prefixes)

    seen: list[str] = []
    for name, node in topo.nodes.items():
        bridge = topo.global_addresses(node.ns, "bridge0")
        assert len(bridge) == len(topo.families)
        assert all(in_network(a, node_prefixes[name]) for a in bridge)
        seen += bridge
        for t in (t for t in topo.targets.values() if t.node is node):
            mine = conduit_addresses(topo, t.name)
            assert len(mine) == len(topo.families)
            assert all(in_network(a, node_prefixes[name]) for a in mine), (t.name, mine)
            seen += mine
    for lb in topo.lbs.values():
        for link in topo.conduit_links(lb.ns, "lbc"):
            addresses = topo.global_addresses(lb.ns, link["ifname"])
            assert len(addresses) == len(topo.families)
            owners = {
                n for n, ps in node_prefixes.items() if all(in_network(a, ps) for a in addresses)
            }
            assert len(owners) == 1, (lb.name, addresses)
            seen += addresses
    ips = [a.split("/")[0] for a in seen]
    assert len(ips) == len(set(ips)), Counter(ips).most_common(3)
    # IPAM knows every address by name: bridge, <target connection>-src, <node>><lb>-dst
    names = Counter(
        a.name.rsplit("-", 1)[-1] if a.name != "bridge" else "bridge" for a in allocations
    )
    per_family = len(topo.families)
    assert names == {
        "bridge": len(topo.nodes) * per_family,
        "src": len(topo.targets) * per_family,
        "dst": len(topo.nodes) * len(topo.lbs) * per_family,
    }


def test_traffic_reaches_every_target_and_returns(topo: ConduitTopology) -> None:
    client = topo.client_ns.name
    for family in topo.families:
        answers = udp_probe(client, family, 48)
        assert len(answers) == 48, f"IPv{family}: {48 - len(answers)} flows unanswered"
        assert set(answers.values()) == set(topo.targets), Counter(answers.values())
        assert tcp_echo(client, family) in topo.targets


# -- scenarios (first variant) --------------------------------------------------------------------


def test_an_lb_added_is_connected_and_removed_is_disconnected(full: ConduitTopology) -> None:
    topo = full
    lb3 = topo.add_lb()
    try:
        wait_settled(topo)
        assert len(topo.conduit_links(lb3.ns, "lbc")) == len(topo.nodes)
        status = run_async(lb3.daemon.stop(10))
        assert status == 0, lb3.daemon.log_text()
        del topo.lbs[lb3.name]
        wait_settled(topo)
        assert topo.conduit_links(lb3.ns, "lbc") == [], "the stopped LB left conduit links"
        assert lb3.connect not in {
            t.context["connect"] for t in topo.nsp_targets(TargetType.FRONTEND)
        }
        wait_until(
            lambda: not any(a.name.endswith(f">{lb3.connect}-dst") for a in topo.allocations()),
            HANG,
            "the proxies released their addresses on the removed LB's side",
        )
    finally:
        if lb3.daemon.alive():
            lb3.daemon.kill()
        topo.lbs.pop(lb3.name, None)
    wait_settled(topo)


def gone_everywhere(topo: ConduitTopology, ips: tuple[str, ...]) -> bool:
    if any(tuple(t.ips) == ips for t in topo.nsp_targets()):
        return False
    return all(ips not in {i for _, i in topo.lb_target_ips(lb)} for lb in topo.lbs)


def present_everywhere(topo: ConduitTopology, ips: tuple[str, ...]) -> bool:
    if ips not in registered(topo):
        return False
    return all(ips in {i for _, i in topo.lb_target_ips(lb)} for lb in topo.lbs)


def test_a_deleted_target_namespace_leaves_nsp_and_the_lbs(topo: ConduitTopology) -> None:
    node = topo.nodes["node1"]
    target = topo.add_target(node, name="tdel")
    ips = conduit_addresses(topo, "tdel")
    wait_until(lambda: present_everywhere(topo, ips), HANG, "new target registered everywhere")
    links_before = len(topo.conduit_links(node.ns, "tgt"))
    topo.remove_target_namespace(target.name)
    wait_until(lambda: gone_everywhere(topo, ips), HANG, "deleted target gone from NSP and LBs")
    # veth: the proxy sees the link go and closes the connection then; vxlan: nothing goes
    # away on the proxy's side, so the connection expires when the target stops refreshing
    # it (how soon, for veth: bench_proxyscale, "namespace gone -> gone from NSP")
    why = "its link went away" if topo.mechanism == "veth" else "its client stopped refreshing it"
    closed = [
        r
        for r in node.daemon.log_records()
        if r.get("event") == "connection closed" and str(r.get("connection")).startswith("tdel-")
    ]
    assert [r.get("reason") for r in closed] == [why], closed
    wait_until(
        lambda: len(topo.conduit_links(node.ns, "tgt")) == links_before - 1,
        HANG,
        "the proxy's link to the deleted target removed",
    )
    names = {a.name for a in topo.allocations()}
    assert not any(n.startswith("tdel-") for n in names), "its address was not released"
    wait_settled(topo)


def test_a_proxy_killed_and_restarted_keeps_its_addresses(full: ConduitTopology) -> None:
    topo = full
    node = topo.nodes["node1"]

    def snapshot() -> dict[str, Any]:
        return {
            "ipam": sorted((a.node, a.family, a.name, a.address) for a in topo.allocations()),
            "targets": {t: conduit_addresses(topo, t) for t in topo.targets},
            "bridge": sorted(topo.global_addresses(node.ns, "bridge0")),
            "lb": {lb: sorted(topo.global_addresses(topo.lbs[lb].ns)) for lb in topo.lbs},
        }

    before = snapshot()
    node.daemon.kill()
    run_async(node.daemon.restart(timeout=30))
    wait_settled(topo)
    assert snapshot() == before
    assert len(topo.conduit_links(node.ns, "lb")) == len(topo.lbs)
    assert len(topo.conduit_links(node.ns, "tgt")) == sum(
        1 for t in topo.targets.values() if t.node is node
    )
    assert len(topo.nsp_targets()) == len(topo.targets)
    assert len(topo.nsp_targets(TargetType.FRONTEND)) == len(topo.lbs)


def test_targets_come_back_to_a_restarted_proxy_at_once(full: ConduitTopology) -> None:
    """A target whose connection to its proxy drops asks again at once, not at its next
    refresh: with a connect expiry of 300 s (a refresh every 100 s), a proxy killed and
    restarted has every target of its node connected again long before that."""
    topo = full
    node = topo.nodes["node1"]
    mine = sum(1 for t in topo.targets.values() if t.node is node)

    def restart() -> None:
        node.daemon.kill()
        run_async(node.daemon.restart(timeout=HANG))
        records = node.daemon.log_records()
        last = max(i for i, r in enumerate(records) if r.get("event") == "role started")

        def back() -> bool:
            records = node.daemon.log_records()[last:]
            return sum(r.get("event") == "connection established" for r in records) >= mine

        # HANG (30 s) is well under the 100 s to the targets' next refresh: only targets that
        # ask again when their connection drops are back in time
        wait_until(back, HANG, "the targets connected to the restarted proxy")

    node.daemon.extra_args.append("--connect-expiry=300")
    try:
        restart()  # the targets learn the long expiry from this proxy's answers
        wait_settled(topo)
        restart()  # they come back when their connection drops, not in 100 s
        wait_settled(topo)
    finally:
        node.daemon.extra_args.remove("--connect-expiry=300")
        restart()
        wait_settled(topo)


def test_a_gracefully_stopped_target_leaves_nothing_behind(topo: ConduitTopology) -> None:
    node = topo.nodes["node2"]
    target = topo.add_target(node, name="tend")
    ips = conduit_addresses(topo, "tend")
    wait_until(lambda: present_everywhere(topo, ips), HANG, "new target registered everywhere")
    proxy_links = {link["ifname"] for link in topo.conduit_links(node.ns, "tgt")}
    target.daemon.signal(signal.SIGTERM)
    # it leaves NSP (and the LBs) first, while its link still carries the draining flows
    wait_until(lambda: gone_everywhere(topo, ips), HANG, "stopping target unregistered")
    assert topo.conduit_links(target.ns, "conduit"), "the link went before the drain time"
    assert run_async(target.daemon.wait_exit(HANG)) == 0, target.daemon.log_text()
    assert topo.conduit_links(target.ns, "conduit") == []
    assert topo.global_addresses(target.ns) == [], topo.global_addresses(target.ns)
    lo = topo.global_addresses(target.ns, "lo")
    assert lo == [], lo
    for family in topo.families:
        assert [r for r in topo.rules(target.ns, family) if r.get("table") == "4096"] == []
        assert topo.routes(target.ns, 4096, family) == []
    wait_until(
        lambda: {link["ifname"] for link in topo.conduit_links(node.ns, "tgt")} < proxy_links,
        HANG,
        "the proxy removed its end",
    )
    assert not any(a.name.startswith("tend-") for a in topo.allocations())
    topo.targets.pop("tend")
    wait_settled(topo)


def test_an_lb_killed_and_restarted_keeps_its_links(full: ConduitTopology) -> None:
    topo = full
    lb = topo.lbs["lb2"]

    def links() -> dict[str, list[str]]:
        return {
            link["ifname"]: sorted(topo.global_addresses(lb.ns, link["ifname"]))
            for link in topo.conduit_links(lb.ns, "lbc")
        }

    before = links()
    lb.daemon.kill()
    run_async(lb.daemon.restart(timeout=30))
    wait_settled(topo)
    assert links() == before
    client = topo.client_ns.name
    answers = udp_probe(client, 4, 32)
    assert len(answers) == 32 and set(answers.values()) == set(topo.targets)


CONNECT_CALLS = r"""
import asyncio, json, os, sys
import grpclib
from grpclib.client import Channel
from meridio.api.meridio.connect.v1 import (
    CloseRequest, ConnectRequest, ConnectStub, Mechanism, Veth, Vxlan)

host, port, service = sys.argv[1], int(sys.argv[2]), sys.argv[3]

OWN = f"/proc/{os.getpid()}/ns/net"

def veth(path=OWN):
    return Mechanism(type="veth", interface_name="probe0", veth=Veth(netns_path=path))

def req(**kw):
    fields = dict(network_service=service, connection_id="probe", client_name="probe",
                  mechanisms=[veth()])
    fields.update(kw)
    return ConnectRequest(**fields)

CASES = {
    "service": req(network_service="proxy.other.trench-a"),
    "netns": req(mechanisms=[veth("/proc/999999999/ns/net")]),
    # least authority: over TCP only the caller's own namespace is accepted
    "other-netns": req(connection_id="probe-o", mechanisms=[veth(sys.argv[5])]),
    "host-netns": req(connection_id="probe-h", mechanisms=[veth("/proc/1/ns/net")]),
    "self-netns": req(connection_id="probe-s", mechanisms=[veth("/proc/self/ns/net")]),
    "file-netns": req(connection_id="probe-f", mechanisms=[veth("/etc/hostname")]),
    "node": req(extra_context={"node": "elsewhere"}),
    "identifier": req(extra_context={"identifier/stream-a": "zero"}),
    "vni": req(mechanisms=[Mechanism(type="vxlan", interface_name="probe0",
                                     vxlan=Vxlan(client_address="198.51.100.99", vni=0))]),
    "no-addresses": req(),
    # a vxlan connection, then another one asking for the same VNI
    "vni-first": req(connection_id="probe-a", mechanisms=[Mechanism(
        type="vxlan", interface_name="probe0",
        vxlan=Vxlan(client_address=sys.argv[4], vni=4242))]),
    "vni-again": req(connection_id="probe-b", mechanisms=[Mechanism(
        type="vxlan", interface_name="probe1",
        vxlan=Vxlan(client_address=sys.argv[4], vni=4242))]),
}

async def main():
    ch = Channel(host, port)
    stub = ConnectStub(ch, timeout=5)
    out = {}
    for name, request in CASES.items():
        try:
            await stub.request(request)
            out[name] = ["OK", ""]
        except grpclib.GRPCError as exc:
            out[name] = [exc.status.name, exc.message]
    # "probe" is served where the request is whole (the proxy: its own namespace, addresses
    # from IPAM): closed like the others
    for connection in ("never-made", "probe-a", "probe"):
        await stub.close(CloseRequest(network_service=service, connection_id=connection))
    out["close"] = ["OK", ""]
    ch.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def connect_calls(
    ns: Any, address: str, port: int, service: str, own: str, other: str
) -> dict[str, list[str]]:
    out = ns.run(sys.executable, "-c", CONNECT_CALLS, address, str(port), service, own, other)
    result: dict[str, list[str]] = json.loads(out.stdout)
    return result


def test_connect_requests_are_validated(full: ConduitTopology) -> None:
    topo = full
    probe = topo.targets["t1"]  # any namespace on the primary network
    node = topo.nodes["node1"]
    # another target's namespace (a process of another pod), named by its sidecar's pid
    other = f"/proc/{topo.targets['t2'].daemon.pid}/ns/net"
    proxy = connect_calls(
        probe.ns, node.address, 7780, "proxy.conduit-a.trench-a", probe.address, other
    )
    assert proxy["service"] == [
        "INVALID_ARGUMENT",
        "network service 'proxy.other.trench-a' is not served here "
        "(this endpoint serves 'proxy.conduit-a.trench-a')",
    ]
    assert proxy["netns"][0] == "PERMISSION_DENIED"
    assert "cannot open the client's netns /proc/999999999/ns/net" in proxy["netns"][1]
    for case in ("other-netns", "host-netns", "self-netns", "file-netns"):
        assert proxy[case][0] == "PERMISSION_DENIED", (case, proxy[case])
    assert "holds no end of this connection" in proxy["other-netns"][1]
    assert "is not a reference this endpoint accepts" in proxy["self-netns"][1]
    assert "is not a reference this endpoint accepts" in proxy["file-netns"][1]
    assert proxy["node"] == [
        "INVALID_ARGUMENT",
        "the target is on node elsewhere but this proxy serves node node1",
    ]
    assert proxy["identifier"][0] == "INVALID_ARGUMENT"
    assert "is not a positive integer" in proxy["identifier"][1]
    assert proxy["vni"] == ["INVALID_ARGUMENT", "mechanism 1 (vxlan): VNI 0 outside 1..16777215"]
    assert proxy["vni-first"] == ["OK", ""]
    assert proxy["vni-again"] == [
        "ALREADY_EXISTS",
        "VNI 4242 on port 4789 is in use at endpoint proxy-node1",
    ]
    assert proxy["close"] == ["OK", ""]
    lb = connect_calls(probe.ns, topo.lbs["lb1"].address, 7779, "conduit-a.trench-a", "", other)
    assert lb["no-addresses"] == ["INVALID_ARGUMENT", "addresses for both ends must be proposed"]
    for case in ("other-netns", "host-netns", "self-netns", "file-netns"):
        assert lb[case][0] == "PERMISSION_DENIED", (case, lb[case])
    assert "holds no end of this connection" in lb["other-netns"][1]
    # nothing was left behind by the refused requests, nor by the closed one
    assert len(topo.conduit_links(node.ns, "tgt")) == 2
    assert not any(a.name.startswith("probe") for a in topo.allocations())
    assert mesh_problems(topo) == []


def test_a_full_stream_is_reported_and_taken_when_a_target_leaves(full: ConduitTopology) -> None:
    topo = full
    node = topo.nodes["node2"]
    first = topo.add_target(node, name="tb1", streams=SMALL_STREAM)
    second = topo.add_target(node, name="tb2", streams=SMALL_STREAM, start=False)
    try:
        second.daemon.spawn()
        record = run_async(
            second.daemon.wait_log(lambda r: r.get("event") == "cannot open stream", 10)
        )
        assert record["problem"] == (
            f"stream {SMALL_STREAM} is full: all 1 identifiers (max-targets) are taken"
        )
        assert run_async(health_status(second.daemon.health_socket)) == NOT_SERVING
        assert run_async(first.daemon.stop(10)) == 0
        topo.targets.pop("tb1")
        run_async(second.daemon.ready(timeout=10))
        ips = conduit_addresses(topo, "tb2")
        held = {
            tuple(t.ips): t.context["identifier"]
            for t in topo.nsp_targets()
            if t.stream.name == SMALL_STREAM
        }
        assert held == {ips: "1"}
        assert run_async(second.daemon.stop(10)) == 0
    finally:
        topo.targets.pop("tb1", None)
        topo.targets.pop("tb2", None)
        for t in (first, second):
            if t.daemon.alive():
                t.daemon.kill()
    wait_settled(topo)
