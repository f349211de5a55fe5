"""``meridiod --role=ipam``: Meridio's ``ipam.v1.Ipam`` on a real daemon with a grpclib client."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status

from meridio.api.ipam.v1 import Child, IpamStub, IpFamily, Prefix, Subnet
from meridio.api.meridio.admin.v1 import IpamInspectStub, ListAllocationsRequest
from meridio.api.meridio.ipam.v1 import AllocateRequest, IpamBatchStub
from meridio.api.nsp.v1 import Conduit, Trench
from tests.netns.daemons import IPAM_PREFIXES, Daemon, aio_test, channel, grpc_error
from tests.waiting import HANG

pytestmark = pytest.mark.netns

V4 = ipaddress.ip_network("198.18.0.0/16")
V6 = ipaddress.ip_network("fd00:10::/48")


def child(
    name: str,
    family: IpFamily | int = IpFamily.IPV4,
    *,
    node: str = "node-1",
    conduit: str = "conduit-a",
    trench: str = "trench-a",
) -> Child:
    return Child(
        name=name,
        subnet=Subnet(
            conduit=Conduit(name=conduit, trench=Trench(name=trench)),
            node=node,
            ip_family=family,  # type: ignore[arg-type]
        ),
    )


class Client:
    def __init__(self, ch: Any) -> None:
        self.ipam = IpamStub(ch, timeout=5)
        self.batch = IpamBatchStub(ch, timeout=5)
        self.inspect = IpamInspectStub(ch, timeout=5)

    async def allocate(self, c: Child) -> Prefix:
        return await self.ipam.allocate(c)

    async def state(self) -> list[tuple[str, str, str, str, str, str, str]]:
        """Every allocation as comparable tuples (timestamps left out)."""
        reply = await self.inspect.list(ListAllocationsRequest())
        return sorted(
            (a.trench, a.conduit, a.node, a.family, a.prefix, a.name, a.address)
            for a in reply.allocations
        )


@asynccontextmanager
async def ipam(netns: Any, tmp_path: Path, *args: str) -> AsyncIterator[tuple[Daemon, Client]]:
    daemon = await Daemon(netns, "ipam", tmp_path / "ipam", *IPAM_PREFIXES, *args).start()
    async with channel(daemon.socket) as ch:
        yield daemon, Client(ch)


def node_network(prefix: Prefix) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_interface(f"{prefix.address}/{prefix.prefix_length}").network


@aio_test
async def test_allocate_and_release_in_both_families(netns: Any, tmp_path: Path) -> None:
    async with ipam(netns, tmp_path) as (_, client):
        a4 = await client.allocate(child("conn-1-src"))
        b4 = await client.allocate(child("conn-1-dst"))
        a6 = await client.allocate(child("conn-1-src", IpFamily.IPV6))
        b6 = await client.allocate(child("conn-1-dst", IpFamily.IPV6))
        # The host address alone, inside the trench prefix, with the node prefix length.
        for reply, trench, length in ((a4, V4, 24), (b4, V4, 24), (a6, V6, 64), (b6, V6, 64)):
            assert "/" not in reply.address
            assert ipaddress.ip_address(reply.address) in trench
            assert reply.prefix_length == length
        assert a4.address != b4.address and a6.address != b6.address
        assert node_network(a4) == node_network(b4)
        assert node_network(a6) == node_network(b6)

        # Idempotent by name: same address again.
        again = await client.allocate(child("conn-1-src"))
        assert (again.address, again.prefix_length) == (a4.address, 24)
        assert (await client.allocate(child("conn-1-src", IpFamily.IPV6))).address == a6.address

        state = await client.state()
        assert {(row[3], row[5], row[6]) for row in state} == {
            ("ipv4", "conn-1-src", a4.address),
            ("ipv4", "conn-1-dst", b4.address),
            ("ipv6", "conn-1-src", a6.address),
            ("ipv6", "conn-1-dst", b6.address),
        }
        assert {row[4] for row in state if row[3] == "ipv4"} == {str(node_network(a4))}

        # Release removes only that child (of that family); releasing again is silent.
        await client.ipam.release(child("conn-1-src"))
        await client.ipam.release(child("conn-1-src"))
        await client.ipam.release(child("never-allocated", IpFamily.IPV6))
        names = {(row[3], row[5]) for row in await client.state()}
        assert names == {("ipv4", "conn-1-dst"), ("ipv6", "conn-1-src"), ("ipv6", "conn-1-dst")}
        # The released address is free again (first fit) and never shared with a live child.
        c4 = await client.allocate(child("conn-2-src"))
        assert c4.address != b4.address
        assert c4.address == a4.address


@aio_test
async def test_nodes_and_conduits_get_separate_prefixes(netns: Any, tmp_path: Path) -> None:
    async with ipam(netns, tmp_path) as (_, client):
        for family, trench, conduit_len in ((IpFamily.IPV4, V4, 20), (IpFamily.IPV6, V6, 56)):
            n1 = node_network(await client.allocate(child("bridge", family, node="node-1")))
            n2 = node_network(await client.allocate(child("bridge", family, node="node-2")))
            other = node_network(
                await client.allocate(child("bridge", family, node="node-1", conduit="conduit-b"))
            )
            assert len({n1, n2, other}) == 3
            assert not n1.overlaps(n2) and not n1.overlaps(other) and not n2.overlaps(other)
            for net in (n1, n2, other):
                assert net.subnet_of(trench)  # type: ignore[arg-type]
            # node-1 and node-2 share conduit-a's prefix; conduit-b has another one.
            assert n1.supernet(new_prefix=conduit_len) == n2.supernet(new_prefix=conduit_len)
            assert n1.supernet(new_prefix=conduit_len) != other.supernet(new_prefix=conduit_len)


@aio_test
async def test_exhaustion_names_the_prefix_and_changes_nothing(netns: Any, tmp_path: Path) -> None:
    # /28 conduit prefixes holding two /29 node prefixes of 6 usable addresses each.
    async with ipam(
        netns, tmp_path, "--conduit-prefix-length-ipv4=28", "--node-prefix-length-ipv4=29"
    ) as (_, client):
        replies = [await client.allocate(child(f"c{i}")) for i in range(6)]
        net = node_network(replies[0])
        assert net.prefixlen == 29
        hosts = {str(h) for h in net.hosts()}  # every address but the first and the last
        assert {r.address for r in replies} == hosts
        assert str(net.network_address) not in {r.address for r in replies}
        assert str(net.broadcast_address) not in {r.address for r in replies}

        before = await client.state()
        err = await grpc_error(client.allocate(child("c6")))
        assert err.status == Status.RESOURCE_EXHAUSTED
        assert str(net) in (err.message or "")
        assert await client.state() == before
        # The existing names still answer (idempotent allocate needs no free address).
        assert (await client.allocate(child("c3"))).address == replies[3].address

        # A second node fits in the /28; a third does not: the conduit prefix is named.
        await client.allocate(child("c0", node="node-2"))
        before = await client.state()
        err = await grpc_error(client.allocate(child("c0", node="node-3")))
        assert err.status == Status.RESOURCE_EXHAUSTED
        assert str(net.supernet(new_prefix=28)) in (err.message or "")
        assert await client.state() == before

        # Releasing one child makes exactly its address available again.
        await client.ipam.release(child("c2"))
        assert (await client.allocate(child("c6"))).address == replies[2].address


@aio_test
async def test_malformed_requests_are_invalid_and_change_nothing(
    netns: Any, tmp_path: Path
) -> None:
    async with ipam(netns, tmp_path) as (_, client):
        await client.allocate(child("existing"))
        before = await client.state()
        no_subnet = Child(name="x")
        bad = {
            "no name": child(""),
            "unknown family": child("x", 7),
            "no conduit name": child("x", conduit=""),
            "no trench name": child("x", trench=""),
            "no node": child("x", node=""),
            "no subnet": no_subnet,
            "blank name": child("   "),
            "path in a conduit name": child("x", conduit="../c\n0"),
            "control character in a node name": child("x", node="node\x01"),
            "name too long": child("x" * 254),
        }
        for what, request in bad.items():
            for call in (client.ipam.allocate, client.ipam.release):
                err = await grpc_error(call(request))
                assert err.status == Status.INVALID_ARGUMENT, (what, err)
                assert err.message, what
        assert await client.state() == before
        # The daemon still serves valid requests.
        assert (await client.allocate(child("existing"))).address == before[0][6]


@aio_test
async def test_a_batch_answers_each_child_as_allocate_would(netns: Any, tmp_path: Path) -> None:
    # /29 node prefixes: 6 addresses each
    async with ipam(
        netns, tmp_path, "--conduit-prefix-length-ipv4=28", "--node-prefix-length-ipv4=29"
    ) as (daemon, client):
        known = await client.allocate(child("c1"))
        asked = [
            child("c0"),
            child("c1"),  # allocated before: the same address
            child("c0", IpFamily.IPV6),
            child("x", trench=""),  # invalid: refused alone
            *(child(f"c{i}") for i in range(2, 7)),  # the last one does not fit
            child("c0"),  # twice in one call: the same address
        ]
        reply = await client.batch.allocate(AllocateRequest(children=asked))
        answers = reply.allocations
        assert len(answers) == len(asked)
        invalid, exhausted = Status.INVALID_ARGUMENT.value, Status.RESOURCE_EXHAUSTED.value
        assert [a.status for a in answers] == [0, 0, 0, invalid, 0, 0, 0, 0, exhausted, 0]
        assert answers[3].message and answers[8].message
        assert answers[1].prefix.address == known.address
        assert answers[9].prefix.address == answers[0].prefix.address
        too_many = AllocateRequest(children=[child(f"m{i}") for i in range(4097)])
        err = await grpc_error(client.batch.allocate(too_many))
        assert err.status == Status.INVALID_ARGUMENT
        # every answer is what Allocate answers, and stays after kill -9 (it was saved)
        daemon.kill()
        await daemon.restart()
        async with channel(daemon.socket) as ch:
            again = Client(ch)
            for request, answer in zip(asked, answers, strict=True):
                if answer.status == 0:
                    got = await again.allocate(request)
                    assert (got.address, got.prefix_length) == (
                        answer.prefix.address,
                        answer.prefix.prefix_length,
                    )


@aio_test
async def test_allocations_survive_kill_9(netns: Any, tmp_path: Path) -> None:
    requests = [
        child(f"conn-{i}-{end}", family, node=node)
        for i in range(3)
        for end in ("src", "dst")
        for family in (IpFamily.IPV4, IpFamily.IPV6)
        for node in ("node-1", "node-2")
    ]
    async with ipam(netns, tmp_path) as (daemon, client):
        first = [await client.allocate(r) for r in requests]
        await client.ipam.release(requests[0])
        state = await client.state()
    daemon.kill()
    await daemon.restart()
    async with channel(daemon.socket) as ch:
        client = Client(ch)
        assert await client.state() == state
        again = [await client.allocate(r) for r in requests[1:]]
        assert [(p.address, p.prefix_length) for p in again] == [
            (p.address, p.prefix_length) for p in first[1:]
        ]
        # New names get new addresses: never one that is already handed out.
        taken = {row[6] for row in await client.state()}
        fresh = [await client.allocate(child(f"new-{i}")) for i in range(3)]
        assert len({p.address for p in fresh}) == 3
        assert not taken & {p.address for p in fresh}
        rows = await client.state()
        assert len({(row[3], row[6]) for row in rows}) == len(rows)
    assert await daemon.stop() == 0


@aio_test
async def test_the_database_directory_is_created(netns: Any, tmp_path: Path) -> None:
    daemon = Daemon(netns, "ipam", tmp_path / "ipam", *IPAM_PREFIXES)
    daemon.extra_args.append(f"--database={tmp_path / 'new-dir' / 'ipam.db'}")
    await daemon.start()
    assert (tmp_path / "new-dir" / "ipam.db").exists()


@aio_test
async def test_a_restart_after_more_than_the_lease_time_keeps_every_allocation(
    netns: Any, tmp_path: Path
) -> None:
    """kill -9, back after more than lease-time: nothing is collected before its owner has had
    a whole lease time to refresh it; what nobody refreshes is collected, and it is logged."""
    names = ("live", "gone-1", "gone-2")
    async with ipam(netns, tmp_path, "--lease-time=1.5", "--gc-interval=0.2") as (daemon, client):
        for name in names:
            await client.allocate(child(name))
        state = await client.state()
    daemon.kill()
    await asyncio.sleep(2.0)  # longer than the lease: every last Allocate is too old now
    await daemon.restart()
    async with channel(daemon.socket) as ch:
        client = Client(ch)
        assert await client.state() == state
        restored = [r for r in daemon.log_records() if r.get("event") == "allocations restored"]
        assert [r["count"] for r in restored] == [0, 3]
        (live_address,) = [row[6] for row in state if row[5] == "live"]
        record = None
        async with asyncio.timeout(HANG):
            while record is None:  # the live one's owner keeps refreshing it, every 0.1 s
                assert (await client.allocate(child("live"))).address == live_address
                await asyncio.sleep(0.1)
                collected = [
                    r
                    for r in daemon.log_records()
                    if r.get("event") == "collected stale allocations"
                ]
                record = collected[0] if collected else None
        assert record["count"] == 2 and record["restored"] == 2
        assert [row[5] for row in await client.state()] == ["live"]
