"""The proxy's addresses from IPAM: many in one IpamBatch call, one call each without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpclib
import trio
from grpclib.const import Status

from meridio.api.ipam.v1 import Child, IpamBase, IpamStub, Prefix
from meridio.api.meridio.ipam.v1 import (
    AllocateRequest,
    AllocateResponse,
    Allocation,
    IpamBatchBase,
)
from meridio.api.nsp.v1 import Conduit, Trench
from meridio.roles.proxy import AddressBatches, ProxyRole
from meridio.runtime.grpc import Endpoint, GrpcStack


class Ipam(IpamBase):
    """Addresses by child name and family, in order: the n-th in 198.18.0.0/16, fd00::/64."""

    def __init__(self) -> None:
        self.given: dict[tuple[str, int], int] = {}
        self.unary = 0

    def answer(self, child: Child) -> Prefix:
        if child.name.startswith("full"):
            raise grpclib.GRPCError(Status.RESOURCE_EXHAUSTED, "node prefix full")
        family = int(child.subnet.ip_family)
        n = self.given.setdefault((child.name, family), len(self.given) + 1)
        if family == 0:
            return Prefix(address=f"198.18.{n >> 8}.{n & 255}", prefix_length=16)
        return Prefix(address=f"fd00::{n:x}", prefix_length=64)

    async def allocate(self, child: Child) -> Prefix:
        self.unary += 1
        return self.answer(child)


class Batches(IpamBatchBase):
    def __init__(self, ipam: Ipam) -> None:
        self.ipam = ipam
        self.calls: list[int] = []

    async def allocate(self, allocate_request: AllocateRequest) -> AllocateResponse:
        self.calls.append(len(allocate_request.children))
        out = []
        for child in allocate_request.children:
            try:
                out.append(Allocation(prefix=self.ipam.answer(child)))
            except grpclib.GRPCError as exc:
                out.append(Allocation(status=exc.status.value, message=exc.message or ""))
        return AllocateResponse(allocations=out)


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, event: str, **_: Any) -> None:
        self.lines.append(event)


class Role:
    """What AddressBatches uses of the proxy role (the role's own methods to make children)."""

    families = (4, 6)

    def __init__(self, stack: GrpcStack, ipam: IpamStub) -> None:
        self.runtime = type("Runtime", (), {"grpc": stack})()
        self.log = Log()
        self.ipam = ipam
        self.conduit_msg = Conduit(name="conduit-a", trench=Trench(name="trench-a"))
        self.node = "node-1"
        self._subnets: dict[int, bytes] = {}

    _child = ProxyRole._child
    _encoded_child = ProxyRole._encoded_child
    allocate_each = ProxyRole.allocate_each


async def _run(tmp_path: Path, *, batches: bool, names: list[str]) -> tuple[Any, ...]:
    ipam = Ipam()
    served: list[Any] = [ipam]
    batch = Batches(ipam)
    if batches:
        served.append(batch)
    stack = GrpcStack()
    try:
        sock = tmp_path / "ipam.sock"
        await stack.serve(served, [Endpoint(path=str(sock))])
        channel = await stack.channel(f"unix://{sock}")
        role = Role(stack, IpamStub(channel, timeout=5))
        addresses = AddressBatches(role)  # type: ignore[arg-type]
        results: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(addresses.run, channel)
            await trio.sleep(0.01)

            async def one(name: str) -> None:
                try:
                    results[name] = await addresses.allocate(name)
                except grpclib.GRPCError as exc:
                    results[name] = exc.status

            async with trio.open_nursery() as asking:
                for name in names:
                    asking.start_soon(one, name)
            nursery.cancel_scope.cancel()
        return results, batch.calls, ipam.unary, addresses.batched, role.log.lines
    finally:
        await stack.close()


async def test_addresses_asked_together_go_in_one_call(aio_loop: object, tmp_path: Path) -> None:
    names = [f"t{i}-src" for i in range(300)] + ["full-src"]
    results, calls, unary, batched, _ = await _run(tmp_path, batches=True, names=names)
    assert batched and unary == 0
    assert sum(calls) == 2 * len(names)
    assert len(calls) <= 3  # at most 512 addresses a call
    assert max(calls) <= 512
    assert results["full-src"] == Status.RESOURCE_EXHAUSTED  # refused alone
    got = [results[n] for n in names[:-1]]
    assert all(len(r) == 2 and r[0].endswith("/16") and r[1].endswith("/64") for r in got)
    assert len({r[0] for r in got}) == len(got)  # each its own


async def test_an_ipam_without_batches_is_asked_one_address_at_a_time(
    aio_loop: object, tmp_path: Path
) -> None:
    names = [f"t{i}-src" for i in range(20)]
    results, calls, unary, batched, log = await _run(tmp_path, batches=False, names=names)
    assert not batched and calls == []
    assert log == ["the IPAM has no batch allocation: one call per address"]
    assert unary == 2 * len(names)
    assert all(len(results[n]) == 2 for n in names)
