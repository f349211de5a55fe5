"""meridio.core.jhash and meridio.core.packet against the kernel's nft ``jhash``.

Two namespaces joined by a veth pair. In the receiving one an nft chain at prerouting priority
-300 sets ``meta mark`` with ``jhash ... mod 65537 seed S`` (plain 4-tuple, and with a leading
``meta l4proto`` plus an offset), records ``saddr . daddr . sport . dport . mark`` in dynamic sets
and drops the packet. The sending namespace sends UDP datagrams and TCP SYNs from ordinary
sockets, plus frames built by tests.packetbuild through an AF_PACKET socket (IPv4 with
options, IPv6 with a Destination Options header, a first fragment, SCTP). Every recorded mark
must equal our bucket. The ICMP packets from packetbuild (echo, frag-needed, packet-too-big) are
accepted instead and must be counted by the kernel's ICMP statistics without checksum errors.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest

from meridio.core.jhash import flow_bucket
from meridio.core.packet import parse
from tests import packetbuild as pb
from tests.waiting import wait_until

pytestmark = pytest.mark.netns

MOD = 65537
SEED = 0x9E3779B9  # plain 4-tuple rules
SEED_P = 0x00C0FFEE  # meta l4proto . 4-tuple rules, with OFFSET
OFFSET = 100

SRC4 = [f"198.18.0.{i}" for i in range(1, 5)]
SRC6 = [f"fd00:18::{i}" for i in range(1, 5)]
PEER4 = "198.18.0.254"
PEER6 = "fd00:18::fe"

RULESET = f"""
table inet mtest_jh {{
  set s4 {{ type ipv4_addr . ipv4_addr . inet_service . inet_service . mark; flags dynamic; }}
  set s6 {{ type ipv6_addr . ipv6_addr . inet_service . inet_service . mark; flags dynamic; }}
  set p4tcp {{ type ipv4_addr . ipv4_addr . inet_service . inet_service . mark; flags dynamic; }}
  set p4udp {{ type ipv4_addr . ipv4_addr . inet_service . inet_service . mark; flags dynamic; }}
  set p6tcp {{ type ipv6_addr . ipv6_addr . inet_service . inet_service . mark; flags dynamic; }}
  set p6udp {{ type ipv6_addr . ipv6_addr . inet_service . inet_service . mark; flags dynamic; }}
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    ip daddr {PEER4} meta l4proto icmp accept
    ip6 daddr {PEER6} meta l4proto ipv6-icmp accept
    meta l4proto {{ tcp, udp, sctp }} meta mark set jhash \\
      ip saddr . ip daddr . th sport . th dport mod {MOD} seed {SEED:#x} \\
      add @s4 {{ ip saddr . ip daddr . th sport . th dport . meta mark }}
    meta l4proto {{ tcp, udp, sctp }} meta mark set jhash \\
      ip6 saddr . ip6 daddr . th sport . th dport mod {MOD} seed {SEED:#x} \\
      add @s6 {{ ip6 saddr . ip6 daddr . th sport . th dport . meta mark }}
    meta l4proto tcp meta mark set jhash meta l4proto . \\
      ip saddr . ip daddr . th sport . th dport mod {MOD} seed {SEED_P:#x} offset {OFFSET} \\
      add @p4tcp {{ ip saddr . ip daddr . th sport . th dport . meta mark }}
    meta l4proto udp meta mark set jhash meta l4proto . \\
      ip saddr . ip daddr . th sport . th dport mod {MOD} seed {SEED_P:#x} offset {OFFSET} \\
      add @p4udp {{ ip saddr . ip daddr . th sport . th dport . meta mark }}
    meta l4proto tcp meta mark set jhash meta l4proto . \\
      ip6 saddr . ip6 daddr . th sport . th dport mod {MOD} seed {SEED_P:#x} offset {OFFSET} \\
      add @p6tcp {{ ip6 saddr . ip6 daddr . th sport . th dport . meta mark }}
    meta l4proto udp meta mark set jhash meta l4proto . \\
      ip6 saddr . ip6 daddr . th sport . th dport mod {MOD} seed {SEED_P:#x} offset {OFFSET} \\
      add @p6udp {{ ip6 saddr . ip6 daddr . th sport . th dport . meta mark }}
    drop
  }}
}}
"""

# Runs in the sending namespace: argv[1] is a JSON plan of socket flows and raw frames.
SENDER = r"""
import json, socket, sys
plan = json.loads(sys.argv[1])
keep = []
for family, proto, src, dst, sport, dport in plan["flows"]:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    kind = socket.SOCK_DGRAM if proto == 17 else socket.SOCK_STREAM
    s = socket.socket(af, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((src, sport))
    if proto == 17:
        s.sendto(b"meridio", (dst, dport))
        s.close()
    else:
        s.setblocking(False)
        try:
            s.connect((dst, dport))
        except BlockingIOError:
            pass
        keep.append(s)
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind((plan["ifname"], 0))
for frame in plan["frames"]:
    raw.send(bytes.fromhex(frame))
for s in keep:
    s.close()
"""

Flow = tuple[int, int, str, str, int, int]  # family, proto, src, dst, sport, dport


def _random_flows(rng: random.Random, count: int) -> list[Flow]:
    flows: list[Flow] = []
    used: set[tuple[str, int]] = set()
    special_ports = [53, 80, 443, 65535]
    while len(flows) < count:
        family = 4 if len(flows) % 2 == 0 else 6
        proto = 6 if (len(flows) // 2) % 2 == 0 else 17
        src = rng.choice(SRC4 if family == 4 else SRC6)
        if family == 4 and rng.random() < 0.5:
            dst = str(IPv4Address("203.0.113.0") + rng.randrange(1, 255))
        elif family == 4:
            dst = str(IPv4Address("198.19.0.0") + rng.randrange(1, 65535))
        else:
            net = rng.choice([int(IPv6Address("2001:db8::")), int(IPv6Address("fd99::"))])
            dst = str(IPv6Address(net + rng.getrandbits(64)))
        sport = rng.randrange(1024, 65536)
        if (src, sport) in used:
            continue
        used.add((src, sport))
        dport = rng.choice(special_ports) if rng.random() < 0.2 else rng.randrange(1, 65536)
        flows.append((family, proto, src, dst, sport, dport))
    return flows


def _mac(netns: Any, ifname: str) -> bytes:
    out = netns.run("ip", "-j", "link", "show", ifname).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def _read_sets(netns: Any) -> dict[str, set[tuple[str, str, int, int, int]]]:
    out = netns.run("nft", "-j", "list", "table", "inet", "mtest_jh").stdout
    sets: dict[str, set[tuple[str, str, int, int, int]]] = {}
    for item in json.loads(out)["nftables"]:
        if "set" in item:
            elems = item["set"].get("elem", [])
            sets[item["set"]["name"]] = {
                (str(ip_address(e["concat"][0])), str(ip_address(e["concat"][1])), *e["concat"][2:])
                for e in elems
            }
    return sets


def _snmp(netns: Any) -> dict[str, int]:
    """ICMP counters of the namespace: ``Icmp:*`` from /proc/net/snmp, ``Icmp6*`` from snmp6."""
    counters: dict[str, int] = {}
    lines = netns.run("cat", "/proc/net/snmp").stdout.splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("Icmp:"):
            names, numbers = head.split()[1:], values.split()[1:]
            counters.update({f"Icmp{n}": int(v) for n, v in zip(names, numbers, strict=True)})
    for line in netns.run("cat", "/proc/net/snmp6").stdout.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("Icmp6"):
            counters[name] = int(value.strip())
    return counters


def _wait(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds, or give up (a hang): the checks after it say what is
    missing."""
    with contextlib.suppress(AssertionError):
        wait_until(predicate, what="packets seen")


def _packed(address: str) -> bytes:
    return ip_address(address).packed


def test_nft_jhash_marks_match_python(netns_factory: Callable[[str], Any], tmp_path: Path) -> None:
    sender = netns_factory("jc")
    lb = netns_factory("jl")
    sender.run(
        "ip", "link", "add", "mt-jc0", "type", "veth", "peer", "name", "mt-jl0", "netns", lb.name
    )
    sender.run("ip", "link", "set", "mt-jc0", "up")
    lb.run("ip", "link", "set", "mt-jl0", "up")
    for address in SRC4:
        sender.run("ip", "addr", "add", f"{address}/24", "dev", "mt-jc0")
    for address in SRC6:
        sender.run("ip", "addr", "add", f"{address}/64", "dev", "mt-jc0", "nodad")
    lb.run("ip", "addr", "add", f"{PEER4}/24", "dev", "mt-jl0")
    lb.run("ip", "addr", "add", f"{PEER6}/64", "dev", "mt-jl0", "nodad")
    lb_mac, sender_mac = _mac(lb, "mt-jl0"), _mac(sender, "mt-jc0")
    for prefix, via in [
        ("203.0.113.0/24", PEER4),
        ("198.19.0.0/16", PEER4),
        ("2001:db8::/32", PEER6),
        ("fd99::/16", PEER6),
    ]:
        sender.run("ip", "route", "add", prefix, "via", via)
    for peer in (PEER4, PEER6):
        sender.run("ip", "neigh", "replace", peer, "lladdr", lb_mac.hex(":"), "dev", "mt-jc0")
    for address in SRC4 + SRC6:  # so that echo replies from lb need no neighbour discovery
        lb.run("ip", "neigh", "replace", address, "lladdr", sender_mac.hex(":"), "dev", "mt-jl0")
    ruleset = tmp_path / "jhash.nft"
    ruleset.write_text(RULESET)
    loaded = lb.run("nft", "-f", str(ruleset), check=False)
    assert loaded.returncode == 0, loaded.stderr
    bytecode = lb.run("nft", "--debug=netlink", "list", "chain", "inet", "mtest_jh", "pre").stdout
    for length in (16, 40, 20, 44):  # pitfall: the register layout must be the padded one
        assert f"jhash(reg 2, {length}, 0x" in bytecode, bytecode

    flows = _random_flows(random.Random(0x4D455249), 120)

    # Frames built by packetbuild: the kernel drops IPv4 packets with a bad header checksum
    # before prerouting, so seeing them in the sets also checks packetbuild.
    crafted = [
        pb.ipv4(
            "198.18.0.3",
            "203.0.113.77",
            17,
            pb.udp("198.18.0.3", "203.0.113.77", 7777, 8888, b"opt"),
            options=b"\x01\x01\x01\x00",
        ),
        pb.ipv6(
            "fd00:18::3",
            "2001:db8::77",
            17,
            pb.udp("fd00:18::3", "2001:db8::77", 7777, 8888, b"dstopt"),
            ext=[pb.destination_options(8)],
        ),
        pb.fragment_ipv4(pb.udp_packet("198.18.0.4", "198.19.7.7", 4444, 5555, b"f" * 64), 32)[0],
        pb.sctp_packet("198.18.0.2", "203.0.113.78", 36412, 38412),
        pb.sctp_packet("fd00:18::2", "2001:db8::78", 36412, 38412),
        pb.tcp_packet("fd00:18::4", "fd99::1:2", 1, 65535),
    ]
    expected_crafted = [parse(packet) for packet in crafted]
    icmp = [
        pb.icmp_echo("198.18.0.3", PEER4, 77, 1, b"meridio"),
        pb.icmpv6_echo("fd00:18::3", PEER6, 77, 1, b"meridio"),
        pb.icmp_frag_needed("198.18.0.3", pb.udp_packet(PEER4, "198.18.0.1", 53, 40000, b"r")),
        pb.icmpv6_packet_too_big(
            "fd00:18::3", pb.udp_packet(PEER6, "fd00:18::1", 53, 40000, b"r" * 1300), 1400
        ),
    ]
    before = _snmp(lb)
    plan = {
        "ifname": "mt-jc0",
        "flows": flows,
        "frames": [pb.ethernet(p, lb_mac, sender_mac).hex() for p in crafted + icmp],
    }
    sent = sender.run(sys.executable, "-c", SENDER, json.dumps(plan), check=False)
    assert sent.returncode == 0, sent.stderr

    total = len(flows) + len(crafted)
    _wait(lambda: sum(len(_read_sets(lb).get(name, ())) for name in ("s4", "s6")) >= total)
    sets = _read_sets(lb)

    # 1. every mark the kernel set equals ours
    mismatches = []
    checked = 0
    for name, elems in sets.items():
        for src, dst, sport, dport, mark in elems:
            if name in ("s4", "s6"):
                ours = flow_bucket(_packed(src), _packed(dst), sport, dport, MOD, SEED)
            else:
                proto = 6 if name.endswith("tcp") else 17
                ours = flow_bucket(
                    _packed(src),
                    _packed(dst),
                    sport,
                    dport,
                    MOD,
                    SEED_P,
                    l4proto=proto,
                    offset=OFFSET,
                )
            checked += 1
            if ours != mark:
                mismatches.append((name, src, dst, sport, dport, mark, ours))
    assert not mismatches, mismatches

    # 2. everything that was sent was seen (so the comparison above covered it)
    seen = {(src, dst, sport, dport) for src, dst, sport, dport, _ in sets["s4"] | sets["s6"]}
    for family, proto, src, dst, sport, dport in flows:
        assert (src, dst, sport, dport) in seen, (family, proto, src, dst, sport, dport)
        pset = f"p{family}{'tcp' if proto == 6 else 'udp'}"
        assert any(e[:4] == (src, dst, sport, dport) for e in sets[pset]), (pset, src, dst)
    for flow in expected_crafted:
        key = (str(ip_address(flow.src)), str(ip_address(flow.dst)), flow.sport, flow.dport)
        assert key in seen, flow
    assert checked >= 2 * len(flows) + len(crafted)

    # 3. the ICMP packets from packetbuild passed the kernel's checksum checks
    def icmp_arrived() -> bool:
        now = _snmp(lb)
        return all(
            now[name] - before[name] >= 1
            for name in ("IcmpInEchos", "IcmpInDestUnreachs", "Icmp6InEchos", "Icmp6InPktTooBigs")
        )

    _wait(icmp_arrived)
    after = _snmp(lb)
    assert after["IcmpInCsumErrors"] == before["IcmpInCsumErrors"]
    assert after["Icmp6InCsumErrors"] == before["Icmp6InCsumErrors"]
    assert icmp_arrived(), {k: (before[k], after[k]) for k in after if after[k] != before[k]}
