"""The proxy role: one per node and conduit, the bridge between the LBs and the node's targets.

* **Addresses** come from IPAM, from this node's prefix of the conduit, named per connection
  (see :mod:`meridio.core.proxystate`), so a proxy restarted even with ``kill -9`` asks for and
  gets the same ones, and never holds one twice. Those of targets that connect together are
  asked for in one call (``meridio.ipam.v1.IpamBatch``; one call each from an IPAM without it).
* **Bridge**: the conduit's bridge carries the proxy's own address (IPAM child ``bridge``).
  Every connection, to targets (this proxy is their endpoint) and to LBs (this proxy is their
  client), is a port of it, so the LBs reach this node's targets directly on one L2 segment.
  The targets' ports are isolated from one another (targets never talk to each other over the
  conduit): what one target sends to every port is not copied to every other target.
* **Full mesh**: a connection to every LB announced in NSP as a FRONTEND target of the conduit,
  made when it appears and closed when it goes. An LB registered DISABLED (starting, or
  draining after SIGTERM) stays connected but gets no replies. The proxy proposes both
  addresses from its node prefix: its bridge address for its side and ``<connection>-dst``
  for the LB's end.
* **Targets**: each connected target is registered in NSP, once per stream it asked for in its
  extra context (``identifier/<stream>``), with its address and ``context["identifier"]``;
  disabled while its link is down, enabled when it is up, refreshed as a keepalive, and
  unregistered at once when its connection closes or its link goes away; many of these in one
  call (``meridio.nsp.v1.TargetRegistryBatch``; one call each to an NSP without it). The proxy
  registers (Meridio's early design), because it is the one that sees a target's link
  disappear, even when the target's namespace vanishes without a word.
* **Egress**: ``from <VIP>`` rules (the trench's VIPs) to a table whose default route is
  multipath over the LB-side addresses of the established LB connections; forwarding, layer-4
  multipath hashing and no reverse-path filter in this namespace (replies from VIPs arrive from
  targets and have no route back here).

On SIGTERM the proxy unregisters its targets first; on exit it closes its LB connections,
removes the links of its targets, its rules, routes and bridge. IPAM allocations stay, so a
restarted proxy gets the same addresses (a connection a client closes releases its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
from functools import partial
from typing import TYPE_CHECKING, Any

import grpclib
import trio
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError

from meridio.api.ipam.v1 import Child, IpamStub, IpFamily, Subnet
from meridio.api.nsp.v1 import (
    Conduit,
    ConfigurationManagerStub,
    Stream,
    Target,
    TargetRegistryStub,
    TargetStatus,
    TargetType,
    Trench,
    Vip,
)
from meridio.connect import kernel
from meridio.connect.client import ClientEnd, ClientSpec, ConnectClient
from meridio.connect.endpoint import (
    Assigned,
    ConnectEndpoint,
    EndpointConfig,
    EndpointConnection,
    pid_netns_path,
)
from meridio.core import conduit, identifiers, netnsref
from meridio.core.conduit import VXLAN_PORT, InvalidRequest, RequestSpec
from meridio.core.proxystate import (
    BRIDGE_CHILD,
    NODE_CONTEXT,
    DesiredRegistrations,
    Registration,
    RegistrationKey,
    Schedule,
    TargetConnection,
    allocations,
    child_bytes,
    cidr,
    delimited,
    egress_next_hops,
    egress_rules,
    lb_child,
    lb_connection_id,
    lb_peers,
    target_bytes,
    target_child,
    update_results,
)
from meridio.roles.base import Role
from meridio.roles.common import IP_FAMILIES, KERNEL_ERRORS, Egress, NspInputs, wait_any, watch
from meridio.runtime.grpc import Encoded, unary_raw
from meridio.runtime.notify import Signal
from meridio.settings import CommonSettings

if TYPE_CHECKING:
    from meridio.runtime import Runtime

IPAM_FAMILY = {4: IpFamily.IPV4, 6: IpFamily.IPV6}
IPAM_BATCH = 512  # addresses asked for in one IpamBatch call at most
IPAM_BATCHES = 4  # IpamBatch calls in flight at once
BATCH_ALLOCATE = "/meridio.ipam.v1.IpamBatch/Allocate"
BATCH_UPDATE = "/meridio.nsp.v1.TargetRegistryBatch/Update"
REGISTER_CONCURRENCY = 32  # NSP calls in flight at once (an NSP without batches)
NSP_BATCH = 512  # registrations in one TargetRegistryBatch call at most
KEEPALIVE_SLICE = 100  # keepalives sent together at most
FULL_PASS = 60.0  # seconds between two reads of every connection by the registrar
REGISTER_RETRY = 1.0  # seconds before a failed registration is tried again
UNREGISTER_ALL_TIMEOUT = 3.0
NSP_TIMEOUT = 5.0  # seconds an NSP call may take
NSP_ERRORS = (grpclib.GRPCError, StreamTerminatedError, OSError, TimeoutError)


class ProxySettings(CommonSettings, kw_only=True):
    nsp: str = "localhost:7778"
    """Address of the NSP, host:port or unix:///path."""
    ipam: str = "localhost:7777"
    """Address of the IPAM, host:port or unix:///path."""
    trench: str = ""
    conduit: str = ""
    node: str = ""
    """The node name in IPAM (one node prefix per node and conduit); default: instance."""
    connect_listen: str = "[::]:7781"
    """Where targets reach this proxy's connect endpoint (host:port or unix:///path)."""
    mechanism: str = "veth"
    """The mechanism this proxy asks the LBs for: veth or vxlan."""
    mechanisms: str = "veth,vxlan"
    """Mechanisms accepted from targets."""
    primary_address: str = ""
    """This node's underlay address for vxlan; default: the address it sends from toward each
    peer (LB or target)."""
    vxlan_port: int = VXLAN_PORT
    ip_family: str = "dualstack"
    """dualstack, ipv4 or ipv6: the families of the conduit's addresses."""
    bridge: str = "bridge0"
    mtu: int = 1500
    """MTU of veth links to targets and LBs (vxlan links get their underlay's less overhead)."""
    table: int = 1
    """Routing table of the egress (multipath default route toward the LBs)."""
    rule_priority: int = 100
    connect_expiry: float = 90.0
    """Seconds a target's connection lives without a refresh (targets refresh every third of
    it). It only ends connections whose client went silent while its link stays: a link that
    goes (the target's namespace deleted) or a Close ends a connection at once."""
    register_interval: float = 30.0
    """Seconds between NSP registrations of each target, the keepalive (keep it at most half
    of NSP's entry-timeout, 60 s by default; Meridio's TAPA refreshes every 30 s too)."""
    resync_period: float = 5.0
    netns_path: str = ""
    """This proxy's network namespace as LBs open it (veth); default /proc/<pid>/ns/net."""
    connect_netns_allow: str = ""
    """Names under /run/netns (comma-separated) a target's veth request may name whoever
    calls; any other namespace must be the caller's own (see docs/security.md)."""


def _mechanism_list(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


class ProxyPolicy:
    """The proxy as an endpoint for targets: addresses from IPAM, links join the bridge."""

    def __init__(self, role: ProxyRole) -> None:
        self.role = role
        self.network_service = f"proxy.{role.proxy.conduit}.{role.proxy.trench}"

    def check(self, spec: RequestSpec) -> None:
        try:
            identifiers.decode(spec.context)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        node = spec.context.get(NODE_CONTEXT)
        if node and node != self.role.node:
            raise InvalidRequest(
                f"the target is on node {node} but this proxy serves node {self.role.node}"
            )

    async def assign(self, spec: RequestSpec, previous: Assigned | None) -> Assigned:
        role = self.role
        if previous is not None:
            return previous
        client = await role.allocate_all(target_child(spec.connection_id))
        endpoint = tuple(role.bridge_addresses[f] for f in role.families)
        return Assigned(client, endpoint)

    def bridge(self) -> str | None:
        return self.role.proxy.bridge

    async def release(self, connection: EndpointConnection, reason: str) -> None:
        await self.role.release_all(target_child(connection.connection_id))


class _Ask:
    """The addresses of one name (a child per family), as a batch answers them."""

    __slots__ = ("children", "done", "error", "result")

    def __init__(self, children: list[bytes]) -> None:
        self.children = children
        self.done = trio.Event()
        self.result: tuple[str, ...] | None = None
        self.error: Exception | None = None


class AddressBatches:
    """The targets' addresses from IPAM, many in one ``meridio.ipam.v1.IpamBatch`` call.

    What is asked for while IPAM_BATCHES calls are on their way goes in the next one (at most
    IPAM_BATCH children): alone, an address waits for one round trip as before; a thousand
    targets that connect together cost tens of calls instead of two thousand, and addresses
    keep coming while the IPAM saves those of a call. An IPAM that does not have the
    service (Meridio's, an older one: UNIMPLEMENTED) is asked one ``Allocate`` per address
    from then on.
    """

    def __init__(self, role: ProxyRole) -> None:
        self.role = role
        self.batched = True
        self._channel: Any = None
        self._waiting: list[_Ask] = []
        self._wake = trio.Event()

    async def allocate(self, name: str) -> tuple[str, ...]:
        role = self.role
        if self.batched and self._channel is not None:
            ask = _Ask([role._encoded_child(name, f).data for f in role.families])
            self._waiting.append(ask)
            self._wake.set()
            await ask.done.wait()
            if ask.error is not None:
                raise ask.error
            if ask.result is not None:
                return ask.result
        return await role.allocate_each(name)  # the IPAM has no batches

    async def run(self, channel: Any) -> None:
        self._channel = channel
        limit = trio.Semaphore(IPAM_BATCHES)
        async with trio.open_nursery() as nursery:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await trio.sleep(0)  # the others that ask at this very moment join
                while self._waiting:
                    await limit.acquire()  # meanwhile, more join the next call
                    count = size = 0
                    for ask in self._waiting:
                        if size and size + len(ask.children) > IPAM_BATCH:
                            break
                        count, size = count + 1, size + len(ask.children)
                    asks, self._waiting = self._waiting[:count], self._waiting[count:]
                    nursery.start_soon(self._send_released, asks, limit)

    async def _send_released(self, asks: list[_Ask], limit: trio.Semaphore) -> None:
        try:
            await self._send(asks)
        finally:
            limit.release()

    async def _send(self, asks: list[_Ask]) -> None:
        request = b"".join(delimited(1, child) for ask in asks for child in ask.children)
        try:
            reply = await self.role.runtime.grpc.call(
                unary_raw, self._channel, BATCH_ALLOCATE, Encoded(request), timeout=NSP_TIMEOUT
            )
            answers = allocations(reply)
            if len(answers) != sum(len(ask.children) for ask in asks):
                raise ValueError(f"IPAM answered {len(answers)} of the addresses asked for")
            at = 0
            for ask in asks:
                got, at = answers[at : at + len(ask.children)], at + len(ask.children)
                refused = next((a for a in got if a[2]), None)
                if refused is not None:
                    ask.error = grpclib.GRPCError(Status(refused[2]), refused[3])
                else:
                    ask.result = tuple(cidr(address, length) for address, length, _, _ in got)
        except grpclib.GRPCError as exc:
            if not _unimplemented(exc):
                for ask in asks:
                    ask.error = exc
            elif self.batched:  # the askers ask one address at a time, from now on
                self.batched = False
                self.role.log.info("the IPAM has no batch allocation: one call per address")
        except (*NSP_ERRORS, ValueError) as exc:  # the requests fail: their clients ask again
            for ask in asks:
                ask.error = exc
        finally:
            for ask in asks:
                ask.done.set()


class _NoBatches(Exception):
    """The server has no batch service (an older one, or Meridio's)."""


def _unimplemented(exc: grpclib.GRPCError) -> bool:
    """The server has no such method: UNIMPLEMENTED, or how grpclib's client reads a grpclib
    server's answer to it (sent without a content type, which that client checks first)."""
    return exc.status == Status.UNIMPLEMENTED or (
        exc.status == Status.UNKNOWN and exc.message == "Missing content-type header"
    )


class ProxyRole(NspInputs, Role[ProxySettings]):
    name = "proxy"
    Settings = ProxySettings

    @classmethod
    def check_settings(cls, settings: ProxySettings) -> None:
        for name in ("trench", "conduit"):
            if not getattr(settings, name):
                raise ValueError(f"setting '{name}' is required")
        if settings.mechanism not in conduit.MECHANISMS:
            raise ValueError(f"setting 'mechanism': {settings.mechanism!r} is not veth or vxlan")
        accepted = _mechanism_list(settings.mechanisms)
        if not accepted or set(accepted) - set(conduit.MECHANISMS):
            raise ValueError(f"setting 'mechanisms': {settings.mechanisms!r}, use veth,vxlan")
        if settings.ip_family not in IP_FAMILIES:
            raise ValueError(
                f"setting 'ip-family': {settings.ip_family!r}, use one of {', '.join(IP_FAMILIES)}"
            )
        if settings.primary_address:
            try:
                ipaddress.ip_address(settings.primary_address)
            except ValueError as exc:
                raise ValueError(f"setting 'primary-address': {exc}") from None
        netnsref.parse_allow_list(settings.connect_netns_allow)  # ValueError naming the item
        if not conduit.valid_ifname(settings.bridge):
            raise ValueError(f"setting 'bridge': {settings.bridge!r} is not an interface name")
        if not 0 < settings.table < 253 and not 255 < settings.table < 2**32:
            raise ValueError(f"setting 'table': {settings.table} is not a free routing table id")
        for name in ("connect_expiry", "register_interval", "resync_period"):
            if getattr(settings, name) <= 0:
                raise ValueError(f"setting '{name.replace('_', '-')}' must be positive")

    def __init__(self, settings: ProxySettings, runtime: Runtime) -> None:
        super().__init__(settings, runtime)
        self.proxy = settings
        self.log = runtime.log
        self.families = IP_FAMILIES[settings.ip_family]
        self.node = settings.node or runtime.instance
        self.bridge_addresses: dict[int, str] = {}
        self.lb_addresses: dict[str, tuple[str, ...]] = {}  # LB connection id -> LB-side CIDRs
        self.lb_enabled: dict[str, bool] = {}  # LB connection id -> takes replies
        self.frontends: list[Target] | None = None
        self.vips: list[str] | None = None
        self.connected: dict[str, bool] = {}
        self.registered: dict[RegistrationKey, Registration] = {}
        self.draining = False
        self._registry_wake = Signal()
        self._messages: dict[Registration, Encoded] = {}
        self._streams: dict[str, bytes] = {}  # stream name -> its Stream message, serialized
        self._nsp_batched = True  # until the NSP says it has no TargetRegistryBatch
        self._wanted = DesiredRegistrations()  # the registrations the targets call for
        self._subnets: dict[int, bytes] = {}  # family -> a Child with only its subnet
        self.addresses = AddressBatches(self)
        self._inputs_changed = trio.Event()
        trench = Trench(name=settings.trench)
        self.conduit_msg = Conduit(name=settings.conduit, trench=trench)

    # --- IPAM ---------------------------------------------------------------------------------

    def _child(self, name: str, family: int) -> Child:
        return Child(
            name=name,
            subnet=Subnet(conduit=self.conduit_msg, node=self.node, ip_family=IPAM_FAMILY[family]),
        )

    def _encoded_child(self, name: str, family: int) -> Encoded:
        subnet = self._subnets.get(family)
        if subnet is None:
            subnet = self._subnets[family] = bytes(self._child("", family))
        return Encoded(child_bytes(name, subnet))

    async def allocate(self, name: str, family: int) -> str:
        prefix = await self.runtime.grpc.call(self.ipam.allocate, self._child(name, family))
        return cidr(prefix.address, prefix.prefix_length)

    async def allocate_all(self, name: str) -> tuple[str, ...]:
        """``name``'s address in every family of the conduit (with other names asked for at
        the same moment: :class:`AddressBatches`)."""
        return await self.addresses.allocate(name)

    async def allocate_each(self, name: str) -> tuple[str, ...]:
        """``name``'s address in every family of the conduit, a call each, at once."""

        async def both() -> tuple[str, ...]:
            prefixes = await asyncio.gather(
                *(self.ipam.allocate(self._encoded_child(name, f)) for f in self.families)
            )
            return tuple(cidr(p.address, p.prefix_length) for p in prefixes)

        result: tuple[str, ...] = await self.runtime.grpc.call(both)
        return result

    async def release(self, name: str, family: int) -> None:
        await self.runtime.grpc.call(self.ipam.release, self._child(name, family))

    async def release_all(self, name: str) -> None:
        """Release ``name``'s address in every family, at once."""

        async def both() -> None:
            await asyncio.gather(*(self.ipam.release(self._child(name, f)) for f in self.families))

        await self.runtime.grpc.call(both)

    async def _allocate_bridge(self) -> None:
        delay = 0.1
        while True:
            try:
                for family in self.families:
                    self.bridge_addresses[family] = await self.allocate(BRIDGE_CHILD, family)
                return
            except NSP_ERRORS as exc:
                self.log.warning("IPAM not answering, retrying", error=str(exc), delay=delay)
                await trio.sleep(delay)
                delay = min(5.0, delay * 2)

    # --- kernel -------------------------------------------------------------------------------

    def _sysctls(self) -> None:
        for path, value in (
            ("net/ipv4/conf/all/forwarding", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
            ("net/ipv4/fib_multipath_hash_policy", "1"),
            ("net/ipv6/fib_multipath_hash_policy", "1"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
        ):
            kernel.write_sysctl(path, value)

    async def _ensure_bridge(self) -> None:
        netlink = self.netlink
        name = self.proxy.bridge
        index = await netlink.ensure_link(name, "bridge")
        # No multicast snooping: with no querier on the conduit (there is none) the bridge
        # floods multicast to every port anyway, and snooping only costs: the kernel walks
        # every port at each port's state change (a thousand targets starting: a million
        # walks, a quarter of the time their links take) and follows each target's MLD.
        await netlink.set_link_index(index, kind="bridge", br_mcast_snooping=0)
        await self._pin_bridge_mac(name)
        kernel.write_sysctl(f"net/ipv4/conf/{name}/rp_filter", "0")
        info = (await kernel.read_links(netlink))[name]
        await kernel.configure_link(
            netlink, info, addresses=[self.bridge_addresses[f] for f in self.families]
        )

    async def _pin_bridge_mac(self, name: str) -> None:
        """Set the bridge's MAC address (to the one it has), so that it stays.

        A bridge whose address was never set takes the lowest address of its ports and changes
        it when that port goes (an LB leaving): targets would keep the old address of their
        next hop in their neighbour cache and lose replies until it expires.
        """
        link = await self.netlink.link_get(name)
        if link is not None and link.lladdr:
            await self.netlink.set_link_index(link.index, address=link.lladdr)

    # --- life ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.proxy
        health = self.runtime.health
        self.nsp_check = health.register("NSPCli", ["Readiness"])
        ipam_check = health.register("IPAM", ["Startup", "Readiness"])
        health.register("Proxy", ["Liveness"]).set(True)
        self._sysctls()
        self.netlink = kernel.serial(await self.runtime.netlink(events=True))
        ipam_channel = await self.runtime.grpc.channel(settings.ipam)
        self.ipam = IpamStub(ipam_channel, timeout=5)
        nsp = await self.runtime.grpc.channel(settings.nsp)
        # calls go in batches, with a deadline for each batch (see _nsp_batch)
        self.registry = TargetRegistryStub(nsp)
        self.nsp_channel = nsp
        # streams live as long as the proxy: no deadline (the stub's 5 s would end them)
        watcher = TargetRegistryStub(nsp)
        config = ConfigurationManagerStub(nsp)
        accepted = _mechanism_list(settings.mechanisms)
        self.endpoint = ConnectEndpoint(
            self.runtime,
            EndpointConfig(
                name=self.runtime.instance,
                mechanisms=accepted,
                link_prefix="tgt",
                mtu=settings.mtu,
                primary_address=settings.primary_address,
                vxlan_port=settings.vxlan_port,
                expiry=settings.connect_expiry,
                resync_period=settings.resync_period,
                track_changes=True,
                # targets talk to the LBs and to this proxy, never to one another over the
                # conduit: what one sends to every port (IPv6 neighbour discovery, MLD, ARP)
                # is not copied to every other target (N^2 packets when a node's N start)
                isolate_ports=True,
                netns_allow=netnsref.parse_allow_list(settings.connect_netns_allow),
            ),
            ProxyPolicy(self),
        )
        self.client = ConnectClient(
            self.runtime, f"proxy/{self.node}", ClientEnd(bridge=settings.bridge)
        )
        self.egress = Egress(self.netlink, settings.table, settings.rule_priority)
        try:
            await self._allocate_bridge()
            ipam_check.set(True)
            await self._ensure_bridge()
            self.log.info(
                "conduit bridge ready",
                bridge=settings.bridge,
                addresses=list(self.bridge_addresses.values()),
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.addresses.run, ipam_channel)
                await nursery.start(self.endpoint.run, [settings.connect_listen])
                await nursery.start(self.client.run)
                frontend_filter = Target(
                    status=TargetStatus.ANY,
                    type=TargetType.FRONTEND,
                    stream=Stream(conduit=self.conduit_msg),
                )
                nursery.start_soon(
                    watch,
                    self.runtime,
                    "frontends",
                    lambda: watcher.watch(frontend_filter),
                    self._store_frontends,
                    self._on_watch_state,
                )
                nursery.start_soon(
                    watch,
                    self.runtime,
                    "vips",
                    lambda: config.watch_vip(Vip(trench=Trench(name=settings.trench))),
                    self._store_vips,
                    self._on_watch_state,
                )
                nursery.start_soon(self._lb_loop)
                nursery.start_soon(self._registrar)
                nursery.start_soon(self._egress_loop)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    def _on_watch_state(self, name: str, up: bool) -> None:
        self.connected[name] = up
        self.nsp_check.set(len(self.connected) == 2 and all(self.connected.values()))

    def _store_frontends(self, message: Any) -> None:
        self.frontends = list(message.targets)
        self.lb_enabled = {
            lb_connection_id(self.node, connect): peer.enabled
            for connect, peer in lb_peers(self.frontends).items()
        }
        self._kick()

    async def drain(self) -> None:
        self.draining = True
        self._registry_wake.bump()  # the registrar stops registering
        await self._unregister_all()

    async def _cleanup(self) -> None:
        try:
            await self._unregister_all()
            await self.egress.clear()
            await kernel.remove_link(self.netlink, self.proxy.bridge)
            self.log.info("proxy state removed")
        except Exception as exc:  # never mask the original exit reason
            self.log.error("cleanup failed", error=str(exc))

    # --- LB connections (full mesh) ----------------------------------------------------------

    async def _lb_loop(self) -> None:
        """Hold a connection to every LB announced in NSP."""
        releasing: set[str] = set()
        while True:
            wake = self._inputs_changed
            seen = self.client.changes.version
            if self.frontends is not None:
                peers = lb_peers(self.frontends)
                wanted = {lb_connection_id(self.node, c): p for c, p in peers.items()}
                try:
                    for cid in wanted:
                        if cid not in self.lb_addresses:
                            self.lb_addresses[cid] = tuple(
                                [await self.allocate(lb_child(cid), f) for f in self.families]
                            )
                except NSP_ERRORS as exc:
                    self.log.warning("IPAM allocation for an LB failed", error=str(exc))
                    await trio.sleep(1)
                    continue
                self.client.set_desired(
                    {cid: self._lb_spec(cid, p.connect) for cid, p in wanted.items()}
                )
                releasing |= set(self.lb_addresses) - set(wanted)
                for cid in sorted(releasing):
                    if cid in self.client.connections or cid in wanted:
                        continue
                    try:
                        for family in self.families:
                            await self.release(lb_child(cid), family)
                    except NSP_ERRORS as exc:
                        self.log.warning("IPAM release failed", error=str(exc))
                        continue
                    releasing.discard(cid)
                    self.lb_addresses.pop(cid, None)
            await wait_any(
                trio.current_time() + self.proxy.resync_period,
                partial(self.client.changes.wait_past, seen),
                wake.wait,
            )

    def _lb_spec(self, cid: str, connect: str) -> ClientSpec:
        settings = self.proxy
        return ClientSpec(
            connection_id=cid,
            endpoint=connect,
            network_service=f"{settings.conduit}.{settings.trench}",
            mechanism=settings.mechanism,
            interface=conduit.link_name("lb", cid),
            netns_path=settings.netns_path or pid_netns_path(),
            primary_address=settings.primary_address,
            vxlan_port=settings.vxlan_port,
            context={NODE_CONTEXT: self.node},
            client_addresses=tuple(self.bridge_addresses[f] for f in self.families),
            endpoint_addresses=self.lb_addresses[cid],
            mtu=settings.mtu,
        )

    # --- egress -------------------------------------------------------------------------------

    async def _egress_loop(self) -> None:
        next_resync = trio.current_time() + self.proxy.resync_period
        known: set[int] = set()  # the established LB connections seen so far (by identity)
        while True:
            wake = self._inputs_changed
            seen = self.client.changes.version
            drift = trio.current_time() >= next_resync
            if drift:
                next_resync = trio.current_time() + self.proxy.resync_period
            established = list(self.client.established())
            for conn in established:
                if id(conn) not in known:
                    # An LB that comes back gets its old addresses on a new link: forget the
                    # bridge's entries with the old MAC, or replies go astray for seconds.
                    for address in conn.endpoint_addresses:
                        with contextlib.suppress(*KERNEL_ERRORS):
                            await self.netlink.forget_neighbour(address)
            known = {id(c) for c in established}
            if self.vips is not None:
                rules = egress_rules(self.vips, self.families)
                hops = egress_next_hops(
                    a
                    for c in established
                    if self.lb_enabled.get(c.spec.connection_id, False)
                    for a in c.endpoint_addresses
                )
                try:
                    if await self.egress.update(rules, hops, check_drift=drift):
                        self.log.info(
                            "egress updated",
                            vips=sorted(r.src for r in rules),
                            next_hops={f"ipv{f}": list(h) for f, h in hops.items()},
                        )
                except KERNEL_ERRORS as exc:  # anything else is a bug: crash, be restarted
                    self.log.error("egress update failed, retrying", error=str(exc))
                    await trio.sleep(1)
                    continue
            await wait_any(next_resync, partial(self.client.changes.wait_past, seen), wake.wait)

    # --- target registrations ----------------------------------------------------------------

    def _target(self, connection_id: str) -> TargetConnection | None:
        """What the registrations of a connection come from (None: gone, or no streams)."""
        conn = self.endpoint.connections.get(connection_id)
        if conn is None:
            return None
        try:
            ids = identifiers.decode(conn.context)
        except ValueError:
            return None
        return TargetConnection(conn.connection_id, conn.assigned.client, ids, conn.up)

    def _target_bytes(self, reg: Registration, status: TargetStatus) -> Encoded:
        """``reg`` as an NSP ``Target`` with ``status``, serialized (its stream once)."""
        stream = self._streams.get(reg.stream)
        if stream is None:
            stream = self._streams[reg.stream] = bytes(
                Stream(name=reg.stream, conduit=self.conduit_msg)
            )
        context = {identifiers.IDENTIFIER_KEY: str(reg.identifier)}
        return Encoded(target_bytes(reg.ips, context, int(status), stream))

    def _encoded(self, reg: Registration) -> Encoded:
        """``reg`` as NSP is sent it, serialized once (a keepalive sends the same bytes)."""
        data = self._messages.get(reg)
        if data is None:
            status = TargetStatus.ENABLED if reg.enabled else TargetStatus.DISABLED
            data = self._messages[reg] = self._target_bytes(reg, status)
        return data

    async def _registrar(self) -> None:
        """Keep NSP's registrations equal to the connected targets, each refreshed every
        ``register-interval``.

        The registrations wanted are kept per connection and follow the connections that
        changed (all of them are read again every FULL_PASS seconds, which would repair
        anything missed). A pass registers what is new or changed and unregisters what is
        gone, all at once (at most REGISTER_CONCURRENCY calls in flight). Keepalives go on
        beside the passes (:meth:`_keepalive_loop`), so a change never waits for them; a
        registration has at most one call in flight at a time (a change waits for its
        keepalive to answer), so NSP never sees them out of order. A registration that fails
        is tried again REGISTER_RETRY seconds later (not on every change meanwhile).
        """
        interval = self.proxy.register_interval
        keepalives: Schedule[RegistrationKey] = Schedule()
        retry: dict[RegistrationKey, float] = {}
        in_flight: set[RegistrationKey] = set()
        landed = Signal()  # a keepalive answered: what waited for it can go
        waiting: set[RegistrationKey] = set()  # affected, but in flight when last looked at
        next_full = -math.inf
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive_loop, keepalives, in_flight, landed)
            while True:
                seen = (
                    self.endpoint.changes.version,
                    self._registry_wake.version,
                    landed.version,
                )
                now = trio.current_time()
                changed, self.endpoint.changed = self.endpoint.changed, set()
                affected = waiting | {k for k, when in retry.items() if when <= now}
                if self.draining:
                    affected |= set(self._wanted.desired) | set(self.registered)
                    self._wanted = DesiredRegistrations()
                else:
                    if now >= next_full:
                        next_full = now + FULL_PASS
                        changed |= set(self.endpoint.connections) | self._wanted.connections()
                        affected |= set(self.registered)
                    for cid in changed:
                        affected |= self._wanted.update(cid, self._target(cid))
                desired = self._wanted.desired
                waiting = affected & in_flight
                affected -= in_flight
                unregister = [
                    self.registered[k]
                    for k in affected
                    if k in self.registered and k not in desired
                ]
                register = [
                    desired[k]
                    for k in affected
                    if k in desired
                    and desired[k] != self.registered.get(k)
                    and retry.get(k, -math.inf) <= now
                ]
                jobs = [(reg, "unregister") for reg in unregister] + [
                    (reg, "new" if reg.key not in self.registered else "change") for reg in register
                ]
                in_flight.update(reg.key for reg, _ in jobs)
                try:
                    results = await self.runtime.grpc.call(self._nsp_batch, jobs) if jobs else []
                finally:
                    in_flight.difference_update(reg.key for reg, _ in jobs)
                now = trio.current_time()
                for reg, what, ok in results:
                    if what == "unregister":
                        self._forget(reg.key)
                        keepalives.discard(reg.key)
                        retry.pop(reg.key, None)
                    elif ok:
                        old = self.registered.get(reg.key)
                        if old is not None and old != reg:
                            self._messages.pop(old, None)
                        self.registered[reg.key] = reg
                        retry.pop(reg.key, None)
                        keepalives.set(reg.key, now + interval)
                    else:
                        retry[reg.key] = now + REGISTER_RETRY
                for key in [k for k in retry if k not in desired and k not in self.registered]:
                    del retry[key]
                wake = min(retry.values(), default=math.inf)
                with trio.move_on_at(max(wake, now + 0.05)):
                    await wait_any(
                        math.inf,
                        partial(self.endpoint.changes.wait_past, seen[0]),
                        partial(self._registry_wake.wait_past, seen[1]),
                        *([partial(landed.wait_past, seen[2])] if waiting else []),
                    )

    async def _keepalive_loop(
        self,
        keepalives: Schedule[RegistrationKey],
        in_flight: set[RegistrationKey],
        landed: Signal,
    ) -> None:
        """Refresh each registration when its keepalive is due (those due within a tenth of
        the interval go together, at most KEEPALIVE_SLICE at a time), beside the registrar's
        passes. A registration being changed, or with a call in flight, is not refreshed: the
        change refreshes it, or its keepalive is put off a little."""
        interval = self.proxy.register_interval
        while True:
            now = trio.current_time()
            batch = []
            for key in keepalives.due(now + interval / 10, KEEPALIVE_SLICE):
                reg = self.registered.get(key)
                if reg is None:
                    continue  # unregistered
                if key in in_flight:
                    keepalives.set(key, now + 1)
                elif self._wanted.desired.get(key) == reg and not self.draining:
                    batch.append(reg)
                # else a change of it is due: the registrar's pass refreshes it
            if batch:
                keys = [reg.key for reg in batch]
                in_flight.update(keys)
                try:
                    results = await self.runtime.grpc.call(
                        self._nsp_batch, [(reg, "keepalive") for reg in batch]
                    )
                finally:
                    in_flight.difference_update(keys)
                    landed.bump()
                now = trio.current_time()
                for reg, _what, ok in results:
                    if reg.key in self.registered:
                        keepalives.set(reg.key, now + (interval if ok else REGISTER_RETRY))
                continue  # more may be due
            await trio.sleep_until(max(min(keepalives.next(), now + 1.0), now + 0.05))

    async def _nsp_batch(
        self, jobs: list[tuple[Registration, str]]
    ) -> list[tuple[Registration, str, bool]]:
        """(asyncio) Send every job (unregister, new, change, keepalive); each with whether
        it succeeded. In ``meridio.nsp.v1.TargetRegistryBatch`` calls (NSP_BATCH updates
        each); to an NSP without it, a call per job, at most REGISTER_CONCURRENCY at once."""
        if jobs and self._nsp_batched:
            try:
                return await self._nsp_updates(jobs)
            except _NoBatches:
                self._nsp_batched = False
                self.log.info("the NSP has no batch registration: one call per registration")
        limit = asyncio.Semaphore(REGISTER_CONCURRENCY)

        async def one(reg: Registration, what: str) -> bool:
            async with limit:
                if what == "unregister":
                    return await self._unregister_aio(reg)
                return await self._register_aio(reg, what)

        if not jobs:
            return []
        # One deadline for the batch rather than one per call (a timer each): what has not
        # answered by then failed, and is tried again.
        tasks = [asyncio.ensure_future(one(reg, what)) for reg, what in jobs]
        deadline = NSP_TIMEOUT * (1 + len(jobs) // REGISTER_CONCURRENCY)
        try:
            _done, pending = await asyncio.wait(tasks, timeout=deadline)
        finally:
            for task in tasks:
                task.cancel()
        if pending:
            self.log.warning("NSP did not answer in time", calls=len(pending))
        return [
            (reg, what, task.done() and not task.cancelled() and task.result())
            for (reg, what), task in zip(jobs, tasks, strict=True)
        ]

    async def _nsp_updates(
        self, jobs: list[tuple[Registration, str]]
    ) -> list[tuple[Registration, str, bool]]:
        """(asyncio) The jobs in TargetRegistryBatch calls, sent together; _NoBatches when
        the NSP does not have the service. A registration new to the NSP that asks to be
        enabled is two updates in the same call (NSP stores a new target disabled)."""
        chunks: list[list[tuple[Registration, str, list[bytes]]]] = [[]]
        size = 0
        for reg, what in jobs:
            if what == "unregister":
                updates = [delimited(1, self._target_bytes(reg, TargetStatus.ENABLED).data)]
                updates[0] += b"\x10\x01"  # unregister = true
            else:
                message = delimited(1, self._encoded(reg).data)
                updates = [message, message] if what == "new" and reg.enabled else [message]
            if size and size + len(updates) > NSP_BATCH:
                chunks.append([])
                size = 0
            chunks[-1].append((reg, what, updates))
            size += len(updates)
        answers = await asyncio.gather(
            *(self._nsp_update_call(chunk) for chunk in chunks), return_exceptions=True
        )
        out: list[tuple[Registration, str, bool]] = []
        for chunk, answer in zip(chunks, answers, strict=True):
            if isinstance(answer, grpclib.GRPCError) and _unimplemented(answer):
                raise _NoBatches
            if isinstance(answer, BaseException):
                if not isinstance(answer, (*NSP_ERRORS, ValueError)):
                    raise answer
                self.log.warning("registering targets failed", count=len(chunk), error=str(answer))
                out += [(reg, what, False) for reg, what, _ in chunk]
                continue
            at = 0
            for reg, what, updates in chunk:
                results, at = answer[at : at + len(updates)], at + len(updates)
                refused = next((r for r in results if r[0]), None)
                out.append((reg, what, refused is None))
                self._log_update(reg, what, refused[1] if refused is not None else None)
        return out

    async def _nsp_update_call(
        self, chunk: list[tuple[Registration, str, list[bytes]]]
    ) -> list[tuple[int, str]]:
        request = b"".join(delimited(1, u) for _reg, _what, updates in chunk for u in updates)
        reply = await unary_raw(
            self.nsp_channel, BATCH_UPDATE, Encoded(request), timeout=NSP_TIMEOUT
        )
        results = update_results(reply)
        if len(results) != sum(len(updates) for _reg, _what, updates in chunk):
            raise ValueError(f"the NSP answered {len(results)} of the updates sent")
        return results

    def _log_update(self, reg: Registration, what: str, refused: str | None) -> None:
        if refused is not None:
            action = "unregistering" if what == "unregister" else "registering"
            self.log.warning(
                f"{action} a target failed", ips=list(reg.ips), stream=reg.stream, error=refused
            )
        elif what == "unregister":
            self.log.info("target unregistered", ips=list(reg.ips), stream=reg.stream)
        elif what != "keepalive":
            self.log.info(
                "target registered",
                ips=list(reg.ips),
                stream=reg.stream,
                identifier=reg.identifier,
                status="ENABLED" if reg.enabled else "DISABLED",
            )

    async def _register_aio(self, reg: Registration, what: str) -> bool:
        """(asyncio) Register ``reg``: ``new`` (NSP does not have it), ``change`` or
        ``keepalive``."""
        message = self._encoded(reg)
        try:
            await self.registry.register(message)
            if what == "new" and reg.enabled:
                # NSP stores a target it did not know as disabled whatever it asks for; the
                # second registration enables it (one that NSP knew stays enabled throughout,
                # e.g. after a restart of this proxy)
                await self.registry.register(message)
        except NSP_ERRORS as exc:
            self._log_update(reg, what, str(exc))
            return False
        self._log_update(reg, what, None)
        return True

    async def _unregister_aio(self, reg: Registration) -> bool:
        try:
            await self.registry.unregister(self._target_bytes(reg, TargetStatus.ENABLED))
        except NSP_ERRORS as exc:
            self.log.warning("unregistering a target failed", ips=list(reg.ips), error=str(exc))
            return False
        self.log.info("target unregistered", ips=list(reg.ips), stream=reg.stream)
        return True

    def _forget(self, key: RegistrationKey) -> None:
        reg = self.registered.pop(key, None)
        if reg is not None:
            self._messages.pop(reg, None)

    async def _unregister_all(self) -> None:
        """Unregister every target, several at once, in at most UNREGISTER_ALL_TIMEOUT."""
        with trio.move_on_after(UNREGISTER_ALL_TIMEOUT):
            await self.runtime.grpc.call(
                self._nsp_batch, [(reg, "unregister") for reg in self.registered.values()]
            )
        self.registered.clear()
        self._messages.clear()
