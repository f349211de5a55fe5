"""The IPAM role: Meridio's ``ipam.v1.Ipam`` over a persistent allocator.

Every allocation is committed to sqlite before it is answered, so a restart (even after
``kill -9``) gives every child name the address it had and never hands an address out twice.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from functools import partial
from pathlib import Path
from typing import Any

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
from meridio.core.ipam import IpamConfig, IpamExhausted, IpamInvalid
from meridio.roles.base import Role
from meridio.settings import CommonSettings
from meridio.store.ipam import PersistentIpam

FAMILIES = {IpFamily.IPV4.value: "ipv4", IpFamily.IPV6.value: "ipv6"}


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
    def __init__(self, ipam: PersistentIpam, trench: str) -> None:
        self.ipam = ipam
        self.trench = trench

    def _where(self, child: Child) -> tuple[str, str, str, str, str]:
        """Validate a Child; returns (trench, conduit, node, family, name)."""
        if not child.name:
            raise _invalid("child name is empty")
        subnet = child.subnet
        if not betterproto.serialized_on_wire(subnet):
            raise _invalid(f"child {child.name!r} has no subnet")
        conduit = subnet.conduit
        trench = conduit.trench.name if conduit else ""
        if not conduit or not conduit.name:
            raise _invalid(f"child {child.name!r}: subnet has no conduit name")
        if not trench:
            raise _invalid(f"child {child.name!r}: conduit {conduit.name!r} has no trench name")
        if self.trench and trench != self.trench:
            raise _invalid(f"unknown trench {trench!r}: this IPAM serves {self.trench!r}")
        if not subnet.node:
            raise _invalid(f"child {child.name!r}: subnet has no node name")
        family = FAMILIES.get(int(subnet.ip_family))
        if family is None:
            raise _invalid(f"child {child.name!r}: unknown IP family {int(subnet.ip_family)}")
        return trench, conduit.name, subnet.node, family, child.name

    async def _run(self, fn: Any) -> Any:
        # sqlite commits fsync: keep them off the event loop.
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except IpamInvalid as exc:
            raise _invalid(str(exc)) from exc
        except IpamExhausted as exc:
            raise grpclib.GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)) from exc

    async def allocate(self, child: Child) -> Prefix:
        trench, conduit, node, family, name = self._where(child)
        address, length = await self._run(
            partial(self.ipam.allocate, trench, conduit, node, family, name, time.time())
        )
        return Prefix(address=address, prefix_length=length)

    async def release(self, child: Child) -> Empty:
        trench, conduit, node, family, name = self._where(child)
        await self._run(partial(self.ipam.release, trench, conduit, node, family, name))
        return Empty()


class IpamInspectService(IpamInspectBase):
    def __init__(self, ipam: PersistentIpam) -> None:
        self.ipam = ipam

    async def list(
        self, list_allocations_request: ListAllocationsRequest
    ) -> ListAllocationsResponse:
        req = list_allocations_request
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


class IpamRole(Role):
    name = "ipam"
    Settings = IpamSettings

    @classmethod
    def check_settings(cls, settings: CommonSettings) -> None:
        assert isinstance(settings, IpamSettings)
        ipam_config(settings)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        assert isinstance(settings, IpamSettings)
        check = self.runtime.health.register("IPAM")
        Path(settings.database).parent.mkdir(parents=True, exist_ok=True)
        ipam = await trio.to_thread.run_sync(
            PersistentIpam, settings.database, ipam_config(settings)
        )
        try:
            await self.runtime.grpc.serve(
                [IpamService(ipam, settings.trench), IpamInspectService(ipam)], [settings.listen]
            )
            check.set(True)
            task_status.started()
            while True:
                await trio.sleep(settings.gc_interval)
                if settings.lease_time:
                    removed = await trio.to_thread.run_sync(ipam.collect, time.time())
                    if removed:
                        self.runtime.log.info("collected stale allocations", count=len(removed))
        finally:
            check.set(False)
            ipam.close()
