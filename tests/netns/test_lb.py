"""``meridiod --role=lb`` end to end: a client, one LB and four targets (tests/netns/lbtopo.py).

One topology per mode (kernel, nfqueue, first-packet; module scope); each test gets it with the
four targets installed and the LB's conntrack table empty, and puts back what it changed
(targets, the LB process). Covered, in every mode unless said otherwise:

- UDP (IPv4, IPv6) and TCP flows spread over all targets near the table's shares; the LB's
  Which answer equals where every flow went (kernel mode: user-space jhash == kernel jhash);
- removing a target: the other targets keep >= 95% of their flows, the removed one gets no
  packet, its own flows are taken over by the others;
- established TCP connections to the remaining targets survive a removal (first-packet: all);
- ICMP fragmentation-needed / packet-too-big about a flow reach that flow's target;
- a rule, a route (and in kernel mode the nft table) deleted by hand come back;
- SIGTERM: exit 0, no rule, route, nft table, iptables chain or bound queue left;
- two LBs fed the same targets in different orders (own NSP each) show the same digest.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.netns.daemons import run_async
from tests.netns.lbtopo import (
    CLIENT4,
    CLIENT6,
    LB_NFT_TABLE,
    OFFSET,
    PORT,
    RULE_PRIORITY,
    VIP4,
    VIP6,
    LbTopology,
    TcpConn,
    lb_alone,
    register,
    shown_identifiers,
    unregister,
)
from tests.netns.lbtopo import lb_show as show
from tests.packetbuild import icmp_frag_needed, icmpv6_packet_too_big, udp_packet
from tests.waiting import HANG, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MODES = ("kernel", "nfqueue", "first-packet")
ALL = {1, 2, 3, 4}
RESYNC = 1.0  # the topology's --resync-period
FAMILIES = (4, 6)


@pytest.fixture(scope="module", params=MODES)
def topology(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LbTopology]:
    workdir = tmp_path_factory.mktemp(f"lb-{request.param}")
    with LbTopology(workdir, targets=4, mode=request.param) as topo:
        yield topo
    assert topo.lb_exit == 0, f"the LB exited with {topo.lb_exit} on SIGTERM"


@pytest.fixture
def topo(topology: LbTopology) -> Iterator[LbTopology]:
    """The module's topology with all four targets installed and no conntrack entries; the
    targets and the LB are put back afterwards whatever the test did."""
    lb = topology.lb
    assert lb is not None
    assert lb.alive(), f"the LB exited with {lb.returncode()}:\n{lb.log_text()}"
    topology.ensure_registered(sorted(ALL))
    topology.wait_targets(ALL)
    topology.flush_conntrack()
    yield topology
    crashed = not lb.alive() and topology.lb_exit is None  # not stopped by the test
    log = lb.log_text()
    if not lb.alive():
        topology.start_lb()
    topology.ensure_registered(sorted(ALL))
    topology.wait_targets(ALL)
    assert not crashed, f"the LB exited with {lb.returncode()} during the test:\n{log}"


def within_share(counts: Counter[str], total: int, targets: int = 4) -> list[str]:
    """Problems with a spread: every target must get 0.5..1.5 times ``total / targets``."""
    share = total / targets
    return [
        f"t{i} got {counts.get(f't{i}', 0)} of {total} (share {share:.0f})"
        for i in range(1, targets + 1)
        if not 0.5 * share <= counts.get(f"t{i}", 0) <= 1.5 * share
    ]


# -- 1. UDP spread ------------------------------------------------------------------------------


def test_udp_flows_spread_over_all_targets(topo: LbTopology) -> None:
    for family in FAMILIES:
        flows = topo.udp_flows(family, 400)
        try:
            answers = flows.probe()
            which = topo.which(family, flows.ports, "udp")
        finally:
            flows.close()
        unanswered = [p for p, name in answers.items() if name is None]
        assert not unanswered, f"IPv{family}: {len(unanswered)} of 400 flows got no answer"
        counts = Counter(answers.values())
        assert not within_share(counts, 400), (family, counts)  # type: ignore[arg-type]
        # the LB's own answer to "which target" is what the kernel did, for every flow
        # (in kernel mode: the user-space jhash equals the kernel's)
        wrong = {
            p: (answers[p], which[p].identifier)
            for p in answers
            if f"t{which[p].identifier}" != answers[p]
        }
        assert not wrong, f"IPv{family}: Which disagrees with the data path on {wrong}"


# -- 2. TCP -------------------------------------------------------------------------------------


def test_tcp_connections_complete_and_spread(topo: LbTopology) -> None:
    total: Counter[str] = Counter()
    for family in FAMILIES:
        conns: list[TcpConn] = []
        try:
            for _ in range(100):
                conns.append(topo.tcp_connect(family))  # raises when no echo comes back
            which = topo.which(family, [c.sport for c in conns], "tcp")
        finally:
            for conn in conns:
                conn.sock.close()
        counts = Counter(c.target for c in conns)
        assert set(counts) == {f"t{i}" for i in ALL}, f"IPv{family}: {counts}"
        wrong = [c.sport for c in conns if f"t{which[c.sport].identifier}" != c.target]
        assert not wrong, f"IPv{family}: Which disagrees with the data path for ports {wrong}"
        total += counts
    assert not within_share(total, 200), total


# -- 3. removing a target -----------------------------------------------------------------------


def test_removing_a_target_moves_only_its_flows(topo: LbTopology) -> None:
    removed = 2
    gone = f"t{removed}"
    flows = {family: topo.udp_flows(family, 200) for family in FAMILIES}
    try:
        before = {family: f.probe() for family, f in flows.items()}
        for family in FAMILIES:
            assert None not in before[family].values(), f"IPv{family}: {before[family]}"
            assert gone in before[family].values()
        topo.unregister([removed])
        topo.wait_targets(ALL - {removed})
        counted = topo.targets[removed - 1].counters()
        after = {family: f.probe(rounds=2, timeout=0.5) for family, f in flows.items()}
        counted_after = topo.targets[removed - 1].counters()
    finally:
        for f in flows.values():
            f.close()
        topo.register([removed])
        topo.wait_targets(ALL)
    for family in FAMILIES:
        stayed = [p for p, t in before[family].items() if t != gone]
        kept = [p for p in stayed if after[family][p] == before[family][p]]
        assert len(kept) >= 0.95 * len(stayed), (
            f"IPv{family}: only {len(kept)} of {len(stayed)} flows on the other targets kept theirs"
        )
        assert gone not in after[family].values()
    for key in ("udp4", "udp6"):
        assert counted_after[key] == counted[key], f"{gone} still got {key} packets"


def test_flows_of_a_removed_target_are_taken_over(topo: LbTopology) -> None:
    """The removed target's own flows move to the others (in first-packet mode too: the LB
    forgets the connections that carry the removed target's mark)."""
    removed = 4
    gone = f"t{removed}"
    flows = {family: topo.udp_flows(family, 100) for family in FAMILIES}
    try:
        before = {family: f.probe() for family, f in flows.items()}
        topo.unregister([removed])
        topo.wait_targets(ALL - {removed})
        after = {family: f.probe(rounds=2, timeout=1.0) for family, f in flows.items()}
    finally:
        for f in flows.values():
            f.close()
        topo.register([removed])
        topo.wait_targets(ALL)
    for family in FAMILIES:
        moved = [p for p, t in before[family].items() if t == gone]
        assert moved, f"IPv{family}: no flow on {gone} to begin with"
        taken = Counter(after[family][p] for p in moved)
        assert set(taken) <= {f"t{i}" for i in ALL - {removed}}, f"IPv{family}: {taken}"


# -- 4. established connections survive a removal -----------------------------------------------


def test_established_connections_survive_removal(topo: LbTopology) -> None:
    conns: list[TcpConn] = []
    removed = 3
    gone = f"t{removed}"
    try:
        for i in range(40):
            conns.append(topo.tcp_connect(FAMILIES[i % 2]))
        assert gone in {c.target for c in conns}
        topo.unregister([removed])
        topo.wait_targets(ALL - {removed})
        remaining = [c for c in conns if c.target != gone]
        broken = [(c.sport, c.target) for c in remaining if c.echo(b"still there", 2.0) != c.target]
    finally:
        for conn in conns:
            conn.sock.close()
        topo.register([removed])
        topo.wait_targets(ALL)
    if topo.mode == "first-packet":
        assert not broken, f"{len(broken)} of {len(remaining)} connections broke: {broken}"
    else:
        # stateless modes keep a connection only where its table entry did not move
        assert len(broken) <= 0.1 * len(remaining), f"{broken} of {len(remaining)}"


# -- 5. ICMP errors follow their flow -----------------------------------------------------------


def test_icmp_errors_reach_the_flows_target(topo: LbTopology) -> None:
    expected: Counter[str] = Counter()
    start = topo.counters()
    for family in FAMILIES:
        flows = topo.udp_flows(family, 8)
        try:
            answers = flows.probe()
        finally:
            flows.close()
        assert None not in answers.values(), answers
        which = topo.which(family, answers, "udp")
        raw = topo.raw_socket(family)
        key = "icmp4" if family == 4 else "icmp6"
        with raw:
            for sport, target in answers.items():
                assert f"t{which[sport].identifier}" == target
                if family == 4:
                    reply = udp_packet(VIP4, CLIENT4, PORT, sport, b"x" * 32)
                    raw.sendto(icmp_frag_needed(CLIENT4, reply, mtu=1400), (VIP4, 0))
                else:
                    reply = udp_packet(VIP6, CLIENT6, PORT, sport, b"x" * 32)
                    message = icmpv6_packet_too_big(CLIENT6, reply, mtu=1280)[40:]
                    # the kernel fills in the ICMPv6 checksum of a raw ICMPv6 socket
                    raw.sendto(message[:2] + b"\0\0" + message[4:], (VIP6, 0))
                expected[f"{target} {key}"] += 1

    def got() -> Counter[str]:
        now = topo.counters()
        return Counter(
            {
                f"{t} {key}": now[t][key] - start[t][key]
                for t in now
                for key in ("icmp4", "icmp6")
                if now[t][key] - start[t][key]
            }
        )

    with contextlib.suppress(AssertionError):
        wait_until(lambda: got() == expected, 3.0, "ICMP errors counted")
    assert got() == expected


# -- 6. drift -----------------------------------------------------------------------------------


def _rule(topo: LbTopology, family: str, mark: int) -> bool:
    return any(
        r["family"] == family
        and int(r["fwmark"], 16) == mark
        and str(r["table"]) == str(mark)
        and r.get("priority") == RULE_PRIORITY
        for r in topo.lb_rules()
    )


def _route(topo: LbTopology, family: str, table: int, gateway: str) -> bool:
    return any(
        r.get("dst") == "default" and r.get("gateway") == gateway
        for r in topo.lb_routes(table, family)
    )


def test_drift_is_repaired(topo: LbTopology) -> None:
    # repaired by the next resync (every RESYNC s; how fast a change reaches the kernel:
    # bench_lbscale); HANG only turns a repair that never comes into a failure
    margin = HANG
    mark = OFFSET + 1
    assert _rule(topo, "-4", mark)
    topo.lb_ns.run(
        "ip",
        "-4",
        "rule",
        "del",
        "fwmark",
        str(mark),
        "table",
        str(mark),
        "priority",
        str(RULE_PRIORITY),
    )
    assert not _rule(topo, "-4", mark)
    wait_until(lambda: _rule(topo, "-4", mark), margin, "the deleted rule back")

    table = OFFSET + 2
    assert _route(topo, "-6", table, "fd00:1::12")
    topo.lb_ns.run("ip", "-6", "route", "del", "default", "table", str(table))
    assert not _route(topo, "-6", table, "fd00:1::12")
    wait_until(lambda: _route(topo, "-6", table, "fd00:1::12"), margin, "the deleted route back")

    if topo.mode == "kernel":
        topo.lb_ns.run("nft", "delete", "table", "inet", LB_NFT_TABLE)
        wait_until(
            lambda: topo.nft_marks() == {OFFSET + i for i in ALL}, margin, "the nft table back"
        )
    # and traffic flows again to every target
    flows = topo.udp_flows(4, 40)
    try:
        answers = flows.probe()
    finally:
        flows.close()
    assert None not in answers.values() and len(set(answers.values())) == 4, answers


# -- 7. equal tables on every LB ----------------------------------------------------------------


def test_two_lbs_fed_in_different_orders_have_equal_digests(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    a_dir = tmp_path_factory.mktemp("digest-a")
    b_dir = tmp_path_factory.mktemp("digest-b")

    def digest(lb_socket: Path) -> str:
        return str(show(lb_socket).streams[0].digest)

    def installed(lb_socket: Path, identifiers: set[int]) -> bool:
        with contextlib.suppress(Exception):
            return shown_identifiers(show(lb_socket)) == identifiers
        return False

    with (
        lb_alone(a_dir, "kernel") as (_, nsp_a, lb_a),
        lb_alone(b_dir, "nfqueue") as (_, nsp_b, lb_b),
    ):
        # A: the LB runs first and sees the targets arrive one at a time, 1 to 4
        run_async(lb_a.start(timeout=20))
        for i in (1, 2, 3, 4):
            register(nsp_a.socket, [i])
            wait_until(partial(installed, lb_a.socket, set(range(1, i + 1))), 10, f"A 1..{i}")
        # B: 4 to 1, with a fifth that comes and goes, all before its LB starts
        register(nsp_b.socket, [4, 5, 3])
        unregister(nsp_b.socket, [5])
        register(nsp_b.socket, [2, 1])
        run_async(lb_b.start(timeout=20))
        wait_until(partial(installed, lb_b.socket, ALL), 10, "B with 1..4")
        full = digest(lb_a.socket)
        assert full and digest(lb_b.socket) == full
        # both lose target 3: equal again, and a different table
        unregister(nsp_a.socket, [3])
        unregister(nsp_b.socket, [3])
        wait_until(partial(installed, lb_a.socket, ALL - {3}), 10, "A without 3")
        wait_until(partial(installed, lb_b.socket, ALL - {3}), 10, "B without 3")
        assert digest(lb_a.socket) == digest(lb_b.socket) != full


# -- 8. stopping leaves nothing behind ---------------------------------------------------------


def test_sigterm_removes_everything(topo: LbTopology) -> None:
    ns = topo.lb_ns

    def mangle(tool: str) -> str:
        return ns.run(tool, "-t", "mangle", "-S").stdout

    def routes() -> list[str]:
        out = []
        for table in range(OFFSET + 1, OFFSET + 11):
            for family in ("-4", "-6"):
                out += [f"table {table}: {r}" for r in topo.lb_routes(table, family)]
        return out

    def queues() -> str:
        return ns.run("cat", "/proc/net/netfilter/nfnetlink_queue", check=False).stdout.strip()

    # everything is there first
    assert len(topo.lb_rules()) == 8  # 4 targets x 2 families
    assert len(routes()) == 8
    assert "MERIDIO" in mangle("iptables") and "MERIDIO" in mangle("ip6tables")
    tables = ns.run("nft", "list", "tables").stdout
    assert (LB_NFT_TABLE in tables) == (topo.mode == "kernel")
    assert queues()

    # how long the LB takes to stop: bench_footprint (SIGTERM->exit)
    assert topo.stop_lb() == 0
    assert topo.lb_rules() == []
    assert routes() == []
    assert LB_NFT_TABLE not in ns.run("nft", "list", "tables").stdout
    assert "MERIDIO" not in mangle("iptables")
    assert "MERIDIO" not in mangle("ip6tables")
    assert queues() == ""
    # the fixture starts the LB again
