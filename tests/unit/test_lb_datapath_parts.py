"""Pure parts of the LB's data path: the fast path's eligibility (meridio.lb.fastpath), the
port NAT entries (meridio.lb.portnat) and the iptables script of the nfqueue mode."""

from __future__ import annotations

import ipaddress
import socket
import struct

from meridio.api.nsp.v1 import Conduit, ConduitPortNat, Stream, Trench, Vip
from meridio.lb import fastpath, iptables, nfq
from meridio.lb.fastpath import Neighbour, Probe, RouteAnswer
from meridio.lb.nftables import PortNat
from meridio.lb.portnat import port_nats, port_nats_of_streams

ip = ipaddress.ip_address


def attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + bytes(-length % 4)


def test_route_request_and_answer() -> None:
    request = fastpath.route_request("198.18.1.11", 7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq) == (len(request), fastpath.RTM_GETROUTE, 1, 7)
    assert request[16] == socket.AF_INET and request[17] == 32
    assert request.endswith(attr(fastpath.RTA_DST, ip("198.18.1.11").packed))
    v6 = fastpath.route_request("fd00::1", 8)
    assert v6[16] == socket.AF_INET6 and v6[17] == 128
    dump = fastpath.neigh_dump_request(9)
    assert struct.unpack_from("=IHHII", dump)[1:3] == (fastpath.RTM_GETNEIGH, 0x301)

    header = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 254, 2, 253, 1, 0)
    answer = fastpath.parse_route(header + attr(fastpath.RTA_OIF, struct.pack("=I", 4)))
    assert answer == RouteAnswer(1, 4, False)
    via = header + attr(fastpath.RTA_OIF, struct.pack("=I", 4)) + attr(5, bytes(4))
    assert fastpath.parse_route(via).gateway


def test_neighbour_entries() -> None:
    body = struct.pack("=BxxxiHBB", socket.AF_INET6, 3, 0x04, 0, 1)
    entry = fastpath.parse_neigh(
        body + attr(fastpath.NDA_DST, ip("fd00::11").packed) + attr(fastpath.NDA_LLADDR, b"\2" * 6)
    )
    assert entry == Neighbour(3, "fd00::11", 0x04, True)
    assert fastpath.parse_neigh(body) is None  # no address


def test_eligible_needs_an_onlink_route_and_a_known_neighbour() -> None:
    links = {3: "conduit-1", 4: "conduit-2"}
    routes = {
        "198.18.1.11": RouteAnswer(1, 3, False),
        "198.18.1.12": RouteAnswer(1, 3, False),
        "198.18.1.13": RouteAnswer(1, 3, True),  # through a gateway
        "198.18.1.14": RouteAnswer(1, 9, False),  # a link we do not know
        "198.18.1.15": RouteAnswer(6, 3, False),  # blackhole
        "198.18.1.16": RouteAnswer(1, 4, False),
        "fd00::11": RouteAnswer(1, 4, False),
        "198.18.1.17": None,  # no route
    }
    neighbours = (
        Neighbour(3, "198.18.1.11", 0x04, True),  # STALE: known
        Neighbour(3, "198.18.1.12", 0x20, False),  # FAILED
        Neighbour(3, "198.18.1.16", 0x02, True),  # on another link than the route's
        Neighbour(4, "fd00::11", 0x80, True),  # PERMANENT
    )
    found = Probe(routes, neighbours, links)
    got = {a: fastpath.eligible(a, found) for a in [*routes, "198.18.1.18"]}
    assert got == {
        "198.18.1.11": "conduit-1",
        "198.18.1.12": None,
        "198.18.1.13": None,
        "198.18.1.14": None,
        "198.18.1.15": None,
        "198.18.1.16": None,
        "fd00::11": "conduit-2",
        "198.18.1.17": None,
        "198.18.1.18": None,
    }
    assert fastpath.eligible("fd00:0::11", found) == "conduit-2"  # any spelling


def conduit(name: str, *nats: tuple[int, int, str, list[str]]) -> Conduit:
    return Conduit(
        name=name,
        trench=Trench(name="t"),
        destination_port_nats=[
            ConduitPortNat(
                port=port,
                target_port=target,
                protocol=protocol,
                vips=[Vip(name=v, address=v) for v in vips],
            )
            for port, target, protocol, vips in nats
        ],
    )


def test_port_nats_of_the_conduits() -> None:
    a = conduit(
        "a",
        (80, 8080, "TCP", ["203.0.113.1/32", "2001:db8::1/128"]),
        (80, 8080, "udp", ["203.0.113.1"]),
    )
    nats, problems = port_nats([a])
    assert problems == ()
    assert nats == (
        PortNat(6, 80, 8080, (ip("203.0.113.1"), ip("2001:db8::1"))),
        PortNat(17, 80, 8080, (ip("203.0.113.1"),)),
    )
    # entries that would make the rewrite ambiguous are left out, each with a problem
    b = conduit(
        "b",
        (80, 9090, "tcp", ["203.0.113.1"]),  # port 80/tcp of .1 again
        (81, 8080, "tcp", ["2001:db8::1"]),  # replies from 8080/tcp of ::1 again
        (82, 9090, "icmp", ["203.0.113.9"]),
        (0, 9090, "tcp", ["203.0.113.9"]),
        (83, 9090, "tcp", ["not an address"]),
        (84, 9091, "sctp", ["203.0.113.9"]),
    )
    nats, problems = port_nats([a, b])
    assert len(nats) == 3 and nats[-1] == PortNat(132, 84, 9091, (ip("203.0.113.9"),))
    assert len(problems) == 5
    assert "conduit 'b' destination-port-nats[0]: overlaps conduit 'a'" in problems[0]
    # from streams: each conduit once
    streams = [Stream(name=f"s{i}", conduit=a) for i in range(3)] + [Stream(name="x")]
    assert port_nats_of_streams(streams) == port_nats([a])


def test_iptables_queues_vip_traffic_only_in_prerouting() -> None:
    spec = iptables.QueueSpec(2, 4, bypass=True)
    script = iptables.render(4, ["203.0.113.1/32", "2001:db8::1", "203.0.113.1"], spec)
    assert script.splitlines() == [
        "*mangle",
        ":MERIDIO-LB - [0:0]",
        "-A MERIDIO-LB -d 203.0.113.1/32 -j NFQUEUE --queue-balance 2:5 --queue-bypass",
        "COMMIT",
    ]
    assert iptables.JUMPS == (("mangle", "PREROUTING", "MERIDIO-LB"),)
    six = iptables.render(6, ["2001:db8::1"], iptables.QueueSpec())
    assert "-A MERIDIO-LB -d 2001:db8::1/128 -j NFQUEUE --queue-num 0" in six


def test_verdict_messages_and_batches() -> None:
    message = nfq.verdict_message(3, 77, 5001)
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", message)
    assert (length, kind, flags) == (len(message), 0x301, 1)  # NFQNL_MSG_VERDICT, a request
    assert message[16:20] == bytes([socket.AF_UNSPEC, 0, 0, 3])  # nfgenmsg: queue 3
    assert struct.unpack_from("=HH", message, 20) == (12, 2)  # NFQA_VERDICT_HDR
    assert struct.unpack_from("!II", message, 24) == (nfq.NF_ACCEPT, 77)
    assert struct.unpack_from("=HH", message, 32) == (8, 3)  # NFQA_MARK
    assert struct.unpack_from("!I", message, 36) == (5001,)
    assert struct.unpack_from("!I", nfq.verdict_message(3, 78, nfq.DROP), 24) == (nfq.NF_DROP,)

    sent: list[bytes] = []
    blocking: list[bool] = []

    class Sock:
        def send(self, data: bytes) -> None:
            sent.append(data)

        def setblocking(self, flag: bool) -> None:
            blocking.append(flag)

    class Packet:
        def __init__(self, id: int) -> None:
            self.id = id

    def decide(pkt: Packet) -> int:
        if pkt.id == 5:
            raise RuntimeError("a bug")
        return nfq.DROP if pkt.id % 2 else 5000 + pkt.id

    reader = nfq.QueueReader(3, decide, batch=4)
    reader._sock = Sock()  # type: ignore[assignment]
    reader._on_packet(Packet(1))  # the first after a wait: its verdict goes at once
    assert [len(s) // 40 for s in sent] == [1] and not reader._batching
    for i in range(2, 7):  # the next came at once: queued ones, batched
        reader._on_packet(Packet(i))
    assert reader._batching and blocking == [False] and reader.bursts == 1
    assert [len(s) // 40 for s in sent] == [1, 4]  # a batch of 4, sent as one
    reader._flush()  # what the loop does when recv finds the queue empty
    assert [len(s) // 40 for s in sent] == [1, 4, 1]
    messages = [s[i : i + 40] for s in sent for i in range(0, len(s), 40)]
    assert messages == [
        nfq.verdict_message(3, i, nfq.DROP if i % 2 else 5000 + i) for i in range(1, 7)
    ]  # 5 raised: dropped
    assert reader.packets == 6 and reader.batches == 3
