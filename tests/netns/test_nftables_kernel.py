"""meridio.lb.nftables against nft 1.0.6 and the kernel, inside a namespace made for the test.

Traffic is sent over the namespace's loopback: a packet to a local VIP address is received on
``lo`` and goes through prerouting, where the table classifies and marks it. A probe table at
priority -140 (after ours at raw, -300) records what the rest of the stack sees: the mark, the
destination port. The fast path's own traffic tests (forwarding, what it leaves to routing) are
in tests/netns/test_lb.py; here its table is loaded, updated and compared with a fresh render.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meridio.core.classifier import FlowSpec, StreamKey, parse_byte_match
from meridio.core.jhash import flow_bucket
from meridio.lb.nftables import (
    FastPath,
    FastTarget,
    NftError,
    PortNat,
    StreamMap,
    TableSpec,
    apply,
    counters,
    exists,
    fast_table_name,
    map_elements,
    probe_features,
    read_counters,
    render_delete,
    render_map_update,
    render_table,
    render_update,
)
from tests.conftest import Netns

pytestmark = pytest.mark.netns

TABLE = "meridio-lb-test"
SEED = 0x9E3779B9
A: StreamKey = ("t", "c", "a")
B: StreamKey = ("t", "c", "b")
VIP4, VIP6 = "10.0.0.1", "2001:db8::1"
ip = ipaddress.ip_address


def marks(count: int, rng: random.Random, *, zeros: bool = True) -> tuple[int, ...]:
    choices = [5001, 5002, 5003, 5004] + ([0] if zeros else [])
    return tuple(rng.choice(choices) for _ in range(count))


def make_spec(a: tuple[int, ...], b: tuple[int, ...], **kwargs: Any) -> TableSpec:
    flows = (
        FlowSpec(
            "udp", A, (ip(VIP4), ip(VIP6)), priority=2, protocols=(17,), dports=((7777, 7777),)
        ),
        FlowSpec("dead", B, (ip(VIP4),), priority=1, protocols=(6, 17), dports=((7778, 7778),)),
        # UDP datagrams to 7780 whose UDP length says 5 bytes of payload
        FlowSpec(
            "bytes",
            A,
            (ip(VIP4),),
            protocols=(17,),
            dports=((7780, 7780),),
            byte_matches=(parse_byte_match("udp[4:2] = 13"),),
        ),
        FlowSpec("nat", A, (ip(VIP4),), protocols=(17,), dports=((80, 80),)),
    )
    return TableSpec(
        streams=(StreamMap(A, a), StreamMap(B, b)), flows=flows, seed=SEED, name=TABLE, **kwargs
    )


def run_python(netns: Netns, code: str) -> str:
    return netns.run(sys.executable, "-c", code).stdout


PROBE = f"""
table inet probe {{}}
delete table inet probe
table inet probe {{
    set seen4 {{ type inet_service . mark; size 65535; }}
    set seen6 {{ type inet_service . mark; size 65535; }}
    set icmp4 {{ type mark; size 65535; }}
    set ports {{ type inet_service; size 65535; }}
    counter frags {{ }}
    counter whole {{ }}
    counter frags6 {{ }}
    counter whole6 {{ }}
    chain c {{
        type filter hook prerouting priority -140; policy accept;
        ip daddr {VIP4} udp dport 7777 add @seen4 {{ udp sport . meta mark }}
        ip6 daddr {VIP6} udp dport 7777 add @seen6 {{ udp sport . meta mark }}
        ip daddr {VIP4} icmp type destination-unreachable add @icmp4 {{ meta mark }}
        ip daddr {VIP4} udp sport 40080 add @ports {{ udp dport }}
        ip daddr {VIP4} ip frag-off & 0x3fff != 0 counter name frags
        ip daddr {VIP4} meta length > 2000 counter name whole
        ip6 daddr {VIP6} exthdr frag exists counter name frags6
        ip6 daddr {VIP6} meta length > 2000 counter name whole6
    }}
}}
"""


def elements(netns: Netns, name: str) -> list[Any]:
    out = netns.run("nft", "-j", "list", "set", "inet", "probe", name).stdout
    found = [x["set"] for x in json.loads(out)["nftables"] if "set" in x]
    return list(found[0].get("elem", []))


def seen(netns: Netns, name: str) -> dict[int, int]:
    return {e["concat"][0]: e["concat"][1] for e in elements(netns, name)}


def setup_vips(netns: Netns) -> None:
    netns.run("ip", "addr", "add", f"{VIP4}/32", "dev", "lo")
    netns.run("ip", "-6", "addr", "add", f"{VIP6}/128", "dev", "lo")


def make_links(netns: Netns, *names: str) -> None:
    for name in names:
        netns.run("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p")


def state(netns: Netns, family: str, table: str) -> dict[str, Any]:
    """A table as nft lists it, without handles, counter values and the table's name."""
    out = json.loads(netns.run("nft", "-j", "list", "table", family, table).stdout)
    found: dict[str, Any] = {"chains": {}, "maps": {}, "counters": set()}
    for item in out["nftables"]:
        if "rule" in item:
            rule = item["rule"]
            found["chains"].setdefault(rule["chain"], []).append(json.dumps(rule["expr"]))
        elif "chain" in item:
            found["chains"].setdefault(item["chain"]["name"], [])
        elif "map" in item:
            found["maps"][item["map"]["name"]] = sorted(
                json.dumps(e) for e in item["map"].get("elem", [])
            )
        elif "counter" in item:
            found["counters"].add(item["counter"]["name"])
    return found


FAST = FastPath(
    ("mt-ext",),
    targets4=((5001, FastTarget("198.18.1.11", "mt-c1")),),
    targets6=((5002, FastTarget("fd00:1::12", "mt-c2")),),
)


async def test_load_update_equals_a_fresh_load(netns: Netns) -> None:
    ns = netns.name
    make_links(netns, "mt-ext", "mt-c1", "mt-c2", "mt-c3")
    rng = random.Random(7)
    old = make_spec(marks(101, rng), marks(11, rng), fast=FAST)
    assert not await exists(TABLE, ns)
    await apply(render_table(old), ns)
    assert await exists(TABLE, ns)
    assert await exists(fast_table_name(TABLE), ns, family="netdev")
    for stream in old.streams:
        name = old.map_name(stream.key)
        assert await map_elements(TABLE, name, ns) == dict(enumerate(stream.entries))
        for family in (4, 6):  # the fast path's maps, one per IP family
            got = await map_elements(fast_table_name(TABLE), f"{name}-{family}", ns, "netdev")
            assert got == dict(enumerate(stream.entries))
    assert await counters(TABLE, ns) == {
        "no-flow": 0,
        "no-target": 0,
        **{f"hit-{m}": 0 for m in (5001, 5002, 5003, 5004)},
    }
    # the installed bytecode hashes the 16/40-byte keys with our seed (nft-jhash.md pitfall 4)
    debug = netns.run("nft", "--debug=netlink", "list", "chain", "inet", TABLE, "prerouting").stdout
    assert f"jhash(reg 2, 16, 0x{SEED:08x}) % mod 101" in debug
    assert f"jhash(reg 2, 40, 0x{SEED:08x}) % mod 101" in debug
    debug = netns.run("nft", "--debug=netlink", "list", "chain", "inet", TABLE, "icmp-errors")
    assert f"jhash(reg 2, 16, 0x{SEED:08x})" in debug.stdout  # the quoted key, the same size
    assert f"jhash(reg 2, 40, 0x{SEED:08x})" in debug.stdout

    # targets come and go, one moves to another link: the update gives the fresh table
    new_marks = tuple(rng.choice([5001, 5003, 5005, 0]) for _ in range(101))
    new_fast = FastPath(
        FAST.devices,
        targets4=((5001, FastTarget("198.18.1.11", "mt-c3")),),
        targets6=((5005, FastTarget("fd00:1::15", "mt-c1")),),
    )
    new = make_spec(new_marks, old.streams[1].entries, fast=new_fast)
    await apply(render_update(old, new), ns)
    updated = [state(netns, "inet", TABLE), state(netns, "netdev", fast_table_name(TABLE))]
    await apply(render_table(new), ns)
    fresh = [state(netns, "inet", TABLE), state(netns, "netdev", fast_table_name(TABLE))]
    assert updated == fresh

    # an index outside the table: nothing is applied (one transaction)
    name = new.map_name(A)
    before = await map_elements(TABLE, name, ns)
    with pytest.raises(NftError, match="No such file or directory"):
        await apply(render_map_update(TABLE, name, [(1, 5001), (500, 5001)]), ns)
    assert await map_elements(TABLE, name, ns) == before

    await apply(render_delete(TABLE), ns)
    assert netns.run("nft", "list", "ruleset").stdout.strip() == ""
    await apply(render_delete(TABLE), ns)  # deleting missing tables is fine
    assert not await exists(TABLE, ns)


async def test_errors_carry_nft_message(netns: Netns) -> None:
    ns = netns.name
    with pytest.raises(NftError, match="syntax error") as info:
        await apply("table inet x { chain c { nonsense } }\n", ns)
    assert info.value.returncode == 1
    with pytest.raises(NftError, match="No such file or directory"):
        await map_elements("no-such-table", "m", ns)
    with pytest.raises(NftError):
        await counters("no-such-table", ns)
    await apply("", ns)  # nothing to do
    await apply("delete table inet no-such-table\n", ns, check=False)


SEND = f"""
import socket
from tests.packetbuild import icmp_frag_needed, udp_packet
v4, v6 = (socket.AF_INET, "127.0.0.1", "{VIP4}"), (socket.AF_INET6, "::1", "{VIP6}")
for family, src, dst in (v4, v6):
    for sport in range(40000, 40064):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((src, sport))
        s.sendto(b"x", (dst, 7777))
        s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 40080))
for port in (7778, 7779):  # a stream without targets; no flow
    for _ in range(5):
        u.sendto(b"x", ("{VIP4}", port))
u.sendto(b"12345", ("{VIP4}", 7780))  # byte match: 5 bytes of payload
u.sendto(b"123456", ("{VIP4}", 7780))  # 6: no flow
u.sendto(b"x", ("{VIP4}", 80))  # port NAT: seen on 8080
# frag-needed about a reply of the flow from 127.0.0.1:40005 (its quote: VIP:7777 -> there)
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
reply = udp_packet("{VIP4}", "127.0.0.1", 7777, 40005, b"y" * 8)
r.sendto(icmp_frag_needed("127.0.0.2", reply, mtu=1400), ("{VIP4}", 0))
"""


async def test_traffic_is_classified_marked_counted_and_natted(netns: Netns) -> None:
    ns = netns.name
    setup_vips(netns)
    rng = random.Random(11)
    nat = PortNat(17, 80, 8080, (ip(VIP4),))
    spec = make_spec(marks(101, rng, zeros=False), (0,) * 11, port_nats=(nat,))
    await apply(PROBE, ns)
    await apply(render_table(spec), ns)
    run_python(netns, SEND)
    entries = spec.streams[0].entries
    for family, name, vip, src in ((4, "seen4", VIP4, "127.0.0.1"), (6, "seen6", VIP6, "::1")):
        got = seen(netns, name)
        assert len(got) == 64, family
        for sport, mark in got.items():
            bucket = flow_bucket(ip(src).packed, ip(vip).packed, sport, 7777, 101, SEED)
            assert mark == entries[bucket], (family, sport)
    # the ICMP error was steered by its quote to the flow's own target
    bucket = flow_bucket(ip("127.0.0.1").packed, ip(VIP4).packed, 40005, 7777, 101, SEED)
    assert elements(netns, "icmp4") == [entries[bucket]]
    # the port NAT rewrote 80 to 8080 after the flow chose the target (7780: the byte match;
    # dropped packets do not reach the probe)
    assert sorted(elements(netns, "ports")) == [7780, 8080]
    got = await read_counters(spec, ns)
    assert got.no_flow[0] == 6  # 7779 x 5, the 6-byte datagram to 7780
    assert got.no_target[0] == 5
    assert sum(p for p, _ in got.routed.values()) == 128 + 1 + 1 + 1  # flows, bytes, nat, ICMP
    assert got.fast == {}

    # with reject_no_target, a TCP connection to a stream without targets is refused at once,
    # although something listens on the VIP
    await apply(render_table(make_spec(entries, (0,) * 11, reject_no_target=True)), ns)
    out = run_python(
        netns,
        f"""
import socket
srv = socket.socket()
srv.bind(("{VIP4}", 7778))
srv.listen()
c = socket.socket()
c.bind(("127.0.0.1", 0))
c.settimeout(3)
try:
    c.connect(("{VIP4}", 7778))
    print("connected")
except ConnectionRefusedError:
    print("refused")
""",
    )
    assert out.strip() == "refused"
    assert (await counters(TABLE, ns))["no-target"] == 1


async def test_fragments_are_reassembled_without_conntrack(
    netns: Netns, netns_factory: Callable[[str], Netns]
) -> None:
    """A datagram fragmented by a client behind a veth reaches the flows whole, and no
    connection is tracked (the tproxy expression brings reassembly without conntrack).

    (Over loopback the fragments would carry the sender's conntrack entry and IPv6 defrag
    would skip them, so the client is a namespace of its own.)
    """
    ns = netns.name
    client = netns_factory("c")
    setup_vips(netns)
    netns.run(
        "ip", "link", "add", "mt-lb", "type", "veth", "peer", "name", "mt-cl", "netns", client.name
    )
    for box, dev, v4, v6 in (
        (netns, "mt-lb", "192.0.2.1/24", "fd00::1/64"),
        (client, "mt-cl", "192.0.2.2/24", "fd00::2/64"),
    ):
        box.run("ip", "addr", "add", v4, "dev", dev)
        box.run("ip", "addr", "add", v6, "dev", dev, "nodad")
        box.run("ip", "link", "set", dev, "up")
    client.run("ip", "route", "add", f"{VIP4}/32", "via", "192.0.2.1")
    client.run("ip", "-6", "route", "add", f"{VIP6}/128", "via", "fd00::1")
    send = f"""
import socket
v4, v6 = (socket.AF_INET, "192.0.2.2", "{VIP4}"), (socket.AF_INET6, "fd00::2", "{VIP6}")
for family, src, dst in (v4, v6):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((src, 40000))
    s.sendto(bytes(3000), (dst, 7777))
"""
    await apply(PROBE, ns)
    # control: without our table, the namespace sees the fragments
    run_python(client, send)
    control = await counters("probe", ns)
    assert control == {"frags": 3, "whole": 0, "frags6": 3, "whole6": 0}

    await apply(PROBE, ns)  # a fresh probe: counters and sets emptied
    spec = make_spec(marks(101, random.Random(3), zeros=False), (0,) * 11)
    await apply(render_table(spec), ns)
    run_python(client, send)
    assert await counters("probe", ns) == {"frags": 0, "whole": 1, "frags6": 0, "whole6": 1}
    for name, src, dst in (("seen4", "192.0.2.2", VIP4), ("seen6", "fd00::2", VIP6)):
        bucket = flow_bucket(ip(src).packed, ip(dst).packed, 40000, 7777, 101, SEED)
        assert seen(netns, name) == {40000: spec.streams[0].entries[bucket]}
    # reassembled, and still nothing in conntrack (the datagrams were delivered locally, which
    # would have confirmed an entry each)
    listed = netns.run("conntrack", "-L", check=False)
    assert "0 flow entries" in listed.stderr, listed.stderr


def _kernel_config() -> str:
    try:
        return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return ""


async def test_probe_features_and_the_native_queue_table(netns: Netns) -> None:
    ns = netns.name
    features = await probe_features(ns)
    config = _kernel_config()
    if config:
        assert features.native_queue == ("CONFIG_NFT_QUEUE=y" in config)
        assert features.tproxy == ("CONFIG_NFT_TPROXY=y" in config)
        assert features.fwd == ("CONFIG_NFT_FWD_NETDEV=y" in config)
    assert netns.run("nft", "list", "ruleset").stdout.strip() == ""  # --check kept nothing
    # the nfqueue mode's table with the kernel's queue statement: nft itself accepts it; a
    # kernel without the statement refuses the rule (not the syntax)
    spec = TableSpec(name=TABLE, mode="nfqueue", vips=(VIP4, VIP6), native_queue=(0, 2, True))
    try:
        await apply(render_table(spec), ns)
        assert features.native_queue
    except NftError as exc:
        assert not features.native_queue
        assert "Could not process rule" in str(exc) and "syntax error" not in str(exc)


async def test_big_maps_load_replace_read_back_and_update(netns: Netns) -> None:
    """The LB's table with maps as big as a stream's gets (two of 10007 entries, one of 65537):
    loaded, loaded again over itself, read back and updated entry by entry, it holds what was
    asked. (How long each takes: ``python -m bench.bench_maglev nft``.)"""
    ns = netns.name
    rng = random.Random(5)
    for sizes in ((10007, 10007), (65537, 2)):
        spec = make_spec(marks(sizes[0], rng), marks(sizes[1], rng))
        script = render_table(spec)
        await apply(script, ns)
        await apply(script, ns)  # a replacement of the whole table, in one transaction
        expected = dict(enumerate(spec.streams[0].entries))
        assert await map_elements(TABLE, spec.map_name(A), ns) == expected
        changes: list[tuple[int, int | None]] = [(i, 5001) for i in range(0, sizes[0], 10)]
        await apply(render_map_update(TABLE, spec.map_name(A), changes), ns)
        expected.update(changes)
        assert await map_elements(TABLE, spec.map_name(A), ns) == expected
    await apply("", ns)  # an empty transaction is fine
    await apply(render_delete("nothing-here"), ns)
