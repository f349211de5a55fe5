"""The IPAM role: Meridio's ``ipam.v1.Ipam`` over a persistent allocator.

Beside it, ``meridio.ipam.v1.IpamBatch`` (our own) allocates many children in one call, each
as ``Allocate`` would: a proxy that starts with many targets asks for all their addresses at
once instead of two calls each (Meridio's clients keep using ``ipam.v1.Ipam``).

Every allocation is committed to sqlite before it is answered, so a restart (even after
``kill -9``) gives every child name the address it had and never hands an address out twice.
Allocations are committed in groups (:mod:`meridio.runtime.commit`): one transaction, off the
event loop, for every request made while the previous one was written. With a lease time, a
restarted IPAM gives every restored child a whole lease time from its own start before it may
be collected; it logs how many allocations it restored and how many of those were collected.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import betterproto
import grpclib
import trio
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status

from meridio.api.ipam.v1 import Child, IpamBase, IpFamily, Prefix
from meridio.api.meridio.admin.v1 import (
    Allocation,
    IpamInspectBase,
    ListAllocationsRequest,
    ListAllocationsResponse,
)
from meridio.api.meridio.ipam.v1 import (
    AllocateRequest,
    AllocateResponse,
    IpamBatchBase,
)
from meridio.api.meridio.ipam.v1 import Allocation as BatchAllocation
from meridio.core.ipam import ChildRemoved, IpamConfig, IpamExhausted, IpamInvalid
from meridio.core.names import describe, name_problem, show
from meridio.roles.base import Role
from meridio.runtime.commit import GroupCommit
from meridio.settings import CommonSettings
from meridio.store.ipam import IpamBatch, IpamStoreError, PersistentIpam

FAMILIES = {IpFamily.IPV4.value: "ipv4", IpFamily.IPV6.value: "ipv6"}
MAX_BATCH = 4096
"""Children one ``meridio.ipam.v1.IpamBatch/Allocate`` call may ask for."""


class IpamSettings(CommonSettings, kw_only=True):
    listen: str = "[::]:7777"
    database: str = "/var/lib/meridio/ipam.db"
    trench: str = ""
    """Serve only this trench (empty: any trench name is accepted)."""
    prefix_ipv4: str = "169.255.0.0/16"
    prefix_ipv6: str = "fd00::/48"
    """Trench prefixes; an empty value disables that family."""
    conduit_prefix_length_ipv4: int = 20
    conduit_prefix_length_ipv6: int = 56
    node_prefix_length_ipv4: int = 24
    node_prefix_length_ipv6: int = 64
    lease_time: float = 0.0
    """Seconds after its last Allocate that a child may be collected; 0 keeps children forever."""
    gc_interval: float = 60.0


def ipam_config(settings: IpamSettings) -> IpamConfig:
    """Build the allocator's configuration; ValueError names the bad setting."""
    try:
        v4 = ipaddress.IPv4Network(settings.prefix_ipv4) if settings.prefix_ipv4 else None
    except ValueError as exc:
        raise ValueError(f"setting 'prefix-ipv4': {exc}") from exc
    try:
        v6 = ipaddress.IPv6Network(settings.prefix_ipv6) if settings.prefix_ipv6 else None
    except ValueError as exc:
        raise ValueError(f"setting 'prefix-ipv6': {exc}") from exc
    return IpamConfig(
        ipv4_trench_prefix=v4,
        ipv4_conduit_prefix_length=settings.conduit_prefix_length_ipv4,
        ipv4_node_prefix_length=settings.node_prefix_length_ipv4,
        ipv6_trench_prefix=v6,
        ipv6_conduit_prefix_length=settings.conduit_prefix_length_ipv6,
        ipv6_node_prefix_length=settings.node_prefix_length_ipv6,
        lease_time=settings.lease_time or None,
    )


def _invalid(message: str) -> grpclib.GRPCError:
    return grpclib.GRPCError(Status.INVALID_ARGUMENT, message)


class IpamService(IpamBase):
    def __init__(self, ipam: PersistentIpam, commits: GroupCommit[IpamBatch], trench: str) -> None:
        self.ipam = ipam
        self.commits = commits
        self.trench = trench

    def _where(self, child: Child) -> tuple[str, str, str, str, str]:
        """Validate a Child; returns (trench, conduit, node, family, name).

        Every name must be a valid name (:mod:`meridio.core.names`): printable, no whitespace,
        no path separator, at most 253 characters.
        """
        name = child.name
        subnet = child.subnet
        if not betterproto.serialized_on_wire(subnet):
            problem = name_problem(name)
            shown = show(name) if problem is None else "(no valid name)"
            raise _invalid(f"child {shown} has no subnet")
        conduit = subnet.conduit
        trench = conduit.trench.name
        for what, value in (
            ("child", name),
            ("conduit", conduit.name),
            ("trench", trench),
            ("node", subnet.node),
        ):
            problem = name_problem(value)
            if problem is not None:
                raise _invalid(f"child {show(name)}: " + describe(what, value, problem))
        if self.trench and trench != self.trench:
            raise _invalid(f"unknown trench {show(trench)}: this IPAM serves {show(self.trench)}")
        family = FAMILIES.get(int(subnet.ip_family))
        if family is None:
            raise _invalid(f"child {show(name)}: unknown IP family {int(subnet.ip_family)}")
        return trench, conduit.name, subnet.node, family, name

    async def _committed(self, seq: int) -> None:
        try:
            await self.commits.wait(seq)
        except IpamStoreError as exc:
            raise grpclib.GRPCError(Status.UNAVAILABLE, f"allocation not saved: {exc}") from exc

    def stage(self, child: Child, now: float) -> tuple[Prefix, int]:
        """Allocate ``child`` (not yet saved): its prefix and the batch to wait for."""
        trench, conduit, node, family, name = self._where(child)
        try:
            address, length, seq = self.ipam.stage_allocate(
                trench, conduit, node, family, name, now
            )
        except IpamInvalid as exc:
            raise _invalid(str(exc)) from exc
        except IpamExhausted as exc:
            raise grpclib.GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)) from exc
        except IpamStoreError as exc:
            raise grpclib.GRPCError(Status.UNAVAILABLE, str(exc)) from exc
        return Prefix(address=address, prefix_length=length), seq

    async def allocate(self, child: Child) -> Prefix:
        prefix, seq = self.stage(child, time.time())
        await self._committed(seq)
        return prefix

    async def release(self, child: Child) -> Empty:
        trench, conduit, node, family, name = self._where(child)
        try:
            _, seq = self.ipam.stage_release(trench, conduit, node, family, name)
        except IpamInvalid as exc:
            raise _invalid(str(exc)) from exc
        except IpamStoreError as exc:
            raise grpclib.GRPCError(Status.UNAVAILABLE, str(exc)) from exc
        if seq:
            await self._committed(seq)
        return Empty()


class IpamBatchService(IpamBatchBase):
    """``meridio.ipam.v1.IpamBatch``: many ``Allocate`` calls in one, saved together."""

    def __init__(self, service: IpamService) -> None:
        self.service = service

    async def allocate(self, allocate_request: AllocateRequest) -> AllocateResponse:
        children = allocate_request.children
        if len(children) > MAX_BATCH:
            raise _invalid(f"{len(children)} children in one call; at most {MAX_BATCH}")
        now = time.time()
        answers: list[BatchAllocation] = []
        last = 0
        for child in children:
            try:
                prefix, seq = self.service.stage(child, now)
            except grpclib.GRPCError as exc:
                answers.append(BatchAllocation(status=exc.status.value, message=exc.message or ""))
                continue
            answers.append(BatchAllocation(prefix=prefix))
            last = max(last, seq)
        if last:
            await self.service._committed(last)
        return AllocateResponse(allocations=answers)


class IpamInspectService(IpamInspectBase):
    def __init__(self, ipam: PersistentIpam, commits: GroupCommit[IpamBatch]) -> None:
        self.ipam = ipam
        self.commits = commits

    async def list(
        self, list_allocations_request: ListAllocationsRequest
    ) -> ListAllocationsResponse:
        req = list_allocations_request
        pending = self.ipam.pending_seq()
        if pending:  # list what is committed: wait for what is being written
            try:
                await self.commits.wait(pending)
            except IpamStoreError as exc:
                raise grpclib.GRPCError(Status.UNAVAILABLE, str(exc)) from exc
        rows = [
            Allocation(
                trench=c.trench,
                conduit=c.conduit,
                node=c.node,
                family=c.family.value,
                prefix=str(c.prefix),
                name=c.name,
                address=str(c.address),
                updated=c.updated,
            )
            for c in self.ipam.list_children()
            if (not req.trench or c.trench == req.trench)
            and (not req.conduit or c.conduit == req.conduit)
            and (not req.node or c.node == req.node)
        ]
        return ListAllocationsResponse(allocations=rows)


class IpamRole(Role[IpamSettings]):
    name = "ipam"
    Settings = IpamSettings

    @classmethod
    def check_settings(cls, settings: IpamSettings) -> None:
        ipam_config(settings)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        log = self.runtime.log
        check = self.runtime.health.register("IPAM")
        Path(settings.database).parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        ipam = await trio.to_thread.run_sync(
            lambda: PersistentIpam(settings.database, ipam_config(settings), now=started)
        )
        log.info(
            "allocations restored",
            count=ipam.restored,
            lease_grace_seconds=settings.lease_time if ipam.restored else 0,
        )
        commits: GroupCommit[IpamBatch] = GroupCommit(ipam, name="ipam")
        try:
            service = IpamService(ipam, commits, settings.trench)
            await self.runtime.grpc.serve(
                [service, IpamBatchService(service), IpamInspectService(ipam, commits)],
                [settings.listen],
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(commits.run)
                check.set(True)
                task_status.started()
                while settings.lease_time:
                    await trio.sleep(settings.gc_interval)
                    restored_before = ipam.restored_pending
                    removed, seq = ipam.stage_collect(time.time())
                    if not removed:
                        continue
                    try:
                        await commits.wait_trio(seq)
                    except IpamStoreError:
                        continue  # logged by the writer; collected again next time
                    children = sum(isinstance(c, ChildRemoved) for c in removed)
                    log.info(
                        "collected stale allocations",
                        count=children,
                        node_prefixes=len(removed) - children,
                        restored=restored_before - ipam.restored_pending,
                    )
        finally:
            check.set(False)
            ipam.close()
