"""meridio.lb.nftables against nft 1.0.6 and the kernel, inside a namespace made for the test.

Traffic is sent over the namespace's loopback: a packet to a local VIP address is received on
``lo`` and goes through prerouting, where the table classifies and marks it. A probe table at
priority -140 (after ours at mangle, -150) records what the rest of the stack sees.
"""

from __future__ import annotations

import ipaddress
import json
import random
import sys
from collections.abc import Callable

import pytest

from meridio.core.classifier import FlowSpec, StreamKey
from meridio.core.jhash import flow_bucket
from meridio.lb.nftables import (
    NftError,
    StreamMap,
    TableSpec,
    apply,
    counters,
    exists,
    map_elements,
    render_delete,
    render_map_update,
    render_table,
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


def make_spec(a: tuple[int, ...], b: tuple[int, ...], *, reject: bool = False) -> TableSpec:
    flows = (
        FlowSpec(
            "udp", A, (ip(VIP4), ip(VIP6)), priority=2, protocols=(17,), dports=((7777, 7777),)
        ),
        FlowSpec("dead", B, (ip(VIP4),), priority=1, protocols=(6, 17), dports=((7778, 7778),)),
    )
    return TableSpec(
        streams=(StreamMap(A, a), StreamMap(B, b)),
        flows=flows,
        seed=SEED,
        name=TABLE,
        reject_no_target=reject,
    )


def run_python(netns: Netns, code: str) -> str:
    return netns.run(sys.executable, "-c", code).stdout


PROBE = f"""
table inet probe {{}}
delete table inet probe
table inet probe {{
    set seen4 {{ type inet_service . mark; size 65535; }}
    set seen6 {{ type inet_service . mark; size 65535; }}
    counter frags {{ }}
    counter whole {{ }}
    counter frags6 {{ }}
    counter whole6 {{ }}
    chain c {{
        type filter hook prerouting priority -140; policy accept;
        ip daddr {VIP4} udp dport 7777 add @seen4 {{ udp sport . meta mark }}
        ip6 daddr {VIP6} udp dport 7777 add @seen6 {{ udp sport . meta mark }}
        ip daddr {VIP4} ip frag-off & 0x3fff != 0 counter name frags
        ip daddr {VIP4} meta length > 2000 counter name whole
        ip6 daddr {VIP6} exthdr frag exists counter name frags6
        ip6 daddr {VIP6} meta length > 2000 counter name whole6
    }}
}}
"""


CT_PROBE = f"""
table inet ctprobe {{
    counter untracked {{ }}
    counter tracked {{ }}
    chain c {{
        type filter hook prerouting priority -140; policy accept;
        ip daddr {VIP4} udp dport 7777 ct state untracked counter name untracked
        ip6 daddr {VIP6} udp dport 7777 ct state untracked counter name untracked
        meta l4proto udp udp dport 7777 ct state != untracked counter name tracked
    }}
}}
"""


def seen(netns: Netns, name: str) -> dict[int, int]:
    out = netns.run("nft", "-j", "list", "set", "inet", "probe", name).stdout
    found = [x["set"] for x in json.loads(out)["nftables"] if "set" in x]
    return {e["concat"][0]: e["concat"][1] for e in found[0].get("elem", [])}


def setup_vips(netns: Netns) -> None:
    netns.run("ip", "addr", "add", f"{VIP4}/32", "dev", "lo")
    netns.run("ip", "-6", "addr", "add", f"{VIP6}/128", "dev", "lo")


async def test_load_read_back_update_delete(netns: Netns) -> None:
    ns = netns.name
    rng = random.Random(7)
    spec = make_spec(marks(101, rng), marks(11, rng))
    assert not await exists(TABLE, ns)
    await apply(render_table(spec), ns)
    assert await exists(TABLE, ns)
    for stream in spec.streams:
        got = await map_elements(TABLE, spec.map_name(stream.key), ns)
        assert got == dict(enumerate(stream.entries))
    assert await counters(TABLE, ns) == {
        "no-flow": 0,
        "no-target": 0,
        "icmp-error": 0,
        "flow-udp": 0,
        "flow-dead": 0,
    }
    # the installed bytecode hashes the 16/40-byte keys with our seed (nft-jhash.md pitfall 4)
    debug = netns.run("nft", "--debug=netlink", "list", "chain", "inet", TABLE, "prerouting").stdout
    assert f"jhash(reg 2, 16, 0x{SEED:08x}) % mod 101" in debug
    assert f"jhash(reg 2, 40, 0x{SEED:08x}) % mod 101" in debug

    # loading the same table again replaces it
    await apply(render_table(spec), ns)

    # an update touches only the given entries (delete + add in one transaction)
    name = spec.map_name(A)
    before = await map_elements(TABLE, name, ns)
    changes: list[tuple[int, int | None]] = [(0, 6000), (50, None), (100, before[100])]
    await apply(render_map_update(TABLE, name, changes), ns)
    after = await map_elements(TABLE, name, ns)
    differ = {i for i in after if after[i] != before[i]}
    assert differ <= {0, 50, 100}
    assert after[0] == 6000 and after[50] == 0 and after[100] == before[100]
    assert set(after) == set(before)
    # an index outside the table: nothing is applied (one transaction)
    with pytest.raises(NftError, match="No such file or directory"):
        await apply(render_map_update(TABLE, name, [(1, 7000), (500, 7000)]), ns)
    assert await map_elements(TABLE, name, ns) == after

    await apply(render_delete(TABLE), ns)
    listing = netns.run("nft", "list", "tables").stdout
    assert TABLE not in listing
    assert netns.run("nft", "list", "ruleset").stdout.strip() == ""
    await apply(render_delete(TABLE), ns)  # deleting a missing table is fine
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


async def test_traffic_is_classified_marked_and_counted(netns: Netns) -> None:
    ns = netns.name
    setup_vips(netns)
    rng = random.Random(11)
    spec = make_spec(marks(101, rng, zeros=False), (0,) * 11)
    await apply(PROBE, ns)
    await apply(render_table(spec), ns)
    run_python(
        netns,
        f"""
import socket
v4, v6 = (socket.AF_INET, "127.0.0.1", "{VIP4}"), (socket.AF_INET6, "::1", "{VIP6}")
for family, src, dst in (v4, v6):
    for sport in range(40000, 40064):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((src, sport))
        s.sendto(b"x", (dst, 7777))
        s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
for port in (7778, 7779):
    for _ in range(5):
        u.sendto(b"x", ("{VIP4}", port))
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
# destination unreachable (3/1) quoting a UDP header; the checksum is not checked here
r.sendto(bytes([3, 1, 0, 0, 0, 0, 0, 0]) + bytes(28), ("{VIP4}", 0))
""",
    )
    entries = spec.streams[0].entries
    for family, name, vip, src in ((4, "seen4", VIP4, "127.0.0.1"), (6, "seen6", VIP6, "::1")):
        got = seen(netns, name)
        assert len(got) == 64, family
        for sport, mark in got.items():
            bucket = flow_bucket(ip(src).packed, ip(vip).packed, sport, 7777, 101, SEED)
            assert mark == entries[bucket], (family, sport)
    assert await counters(TABLE, ns) == {
        "no-flow": 5,
        "no-target": 5,
        "icmp-error": 1,
        "flow-udp": 128,
        "flow-dead": 5,
    }

    # with reject_no_target, a TCP connection to a stream without targets is refused at once,
    # although something listens on the VIP
    await apply(render_table(make_spec(entries, (0,) * 11, reject=True)), ns)
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


async def test_fragments_are_reassembled_before_the_flows(
    netns: Netns, netns_factory: Callable[[str], Netns]
) -> None:
    """A datagram fragmented by a client behind a veth reaches the flows whole, untracked.

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
    # control: without conntrack loaded, the LB namespace sees the fragments
    run_python(client, send)
    control = await counters("probe", ns)
    assert control == {"frags": 3, "whole": 0, "frags6": 3, "whole6": 0}

    await apply(PROBE, ns)  # a fresh probe: counters and sets emptied
    await apply(CT_PROBE, ns)
    spec = make_spec(marks(101, random.Random(3), zeros=False), (0,) * 11)
    await apply(render_table(spec), ns)
    run_python(client, send)
    assert await counters("probe", ns) == {"frags": 0, "whole": 1, "frags6": 0, "whole6": 1}
    assert (await counters(TABLE, ns))["flow-udp"] == 2
    for name, src, dst in (("seen4", "192.0.2.2", VIP4), ("seen6", "fd00::2", VIP6)):
        bucket = flow_bucket(ip(src).packed, ip(dst).packed, 40000, 7777, 101, SEED)
        assert seen(netns, name) == {40000: spec.streams[0].entries[bucket]}
    # reassembled, but not tracked: the raw-priority chain made it untracked
    assert await counters("ctprobe", ns) == {"untracked": 2, "tracked": 0}


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
        changes = [(i, 6000) for i in range(0, sizes[0], 10)]
        await apply(render_map_update(TABLE, spec.map_name(A), changes), ns)
        expected.update(changes)
        assert await map_elements(TABLE, spec.map_name(A), ns) == expected
    await apply("", ns)  # an empty transaction is fine
    await apply(render_delete("nothing-here"), ns)
