"""The LB's side of the conduit: its connect endpoint and its announcement in NSP.

With ``connect-listen`` set, ``meridiod --role=lb`` serves ``meridio.connect.v1.Connect`` for
the network service ``<conduit>.<trench>``. Proxies propose the addresses of both ends from
their own node prefix (as Meridio's proxy does); the LB puts its end's address on the link, so
it has a connected route into every proxy's subnet and reaches the targets behind each proxy
directly, which is what its ``default via <target>`` routes need.

The LB announces the endpoint as a FRONTEND target of its conduit: ``ips`` its primary (or
advertised) address, ``context["connect"]`` where to reach the endpoint, ``context["instance"]``
its name. Registering again is the keepalive. On SIGTERM the LB first registers itself
DISABLED: proxies stop sending replies through it but keep their links, so traffic the gateway
still sends it during the drain reaches the targets; on exit it removes its links and
unregisters, and the proxies disconnect.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpclib
import trio
from grpclib.exceptions import StreamTerminatedError

from meridio.api.nsp.v1 import (
    Conduit,
    Stream,
    Target,
    TargetRegistryStub,
    TargetStatus,
    TargetType,
    Trench,
)
from meridio.connect import kernel
from meridio.connect.endpoint import (
    Assigned,
    ConnectEndpoint,
    EndpointConfig,
    EndpointConnection,
)
from meridio.core import conduit, netnsref
from meridio.core.conduit import InvalidRequest, RequestSpec
from meridio.core.proxystate import CONNECT_CONTEXT, INSTANCE_CONTEXT
from meridio.runtime.grpc import Endpoint
from meridio.settings import CommonSettings

if TYPE_CHECKING:
    from meridio.runtime import Runtime

MAIN_TABLE = 254


class LbConnectSettings(CommonSettings, kw_only=True):
    """The LB's connect settings (part of the LB role's settings)."""

    connect_listen: str = ""
    """Serve the connect API for proxies on this host:port; empty: no conduit endpoint."""
    connect_advertise: str = ""
    """host:port proxies dial (announced in NSP); default: connect-listen when its host is an
    address proxies can reach (not a wildcard)."""
    connect_mechanisms: str = "veth,vxlan"
    primary_address: str = ""
    """Underlay address for vxlan; default: the advertised host."""
    vxlan_port: int = conduit.VXLAN_PORT
    connect_mtu: int = 1500
    connect_expiry: float = 30.0
    """Seconds a proxy's connection lives without a refresh."""
    connect_netns_allow: str = ""
    """Names under /run/netns (comma-separated) a proxy's veth request may name whoever
    calls; any other namespace must be the caller's own (see docs/security.md)."""
    announce_interval: float = 10.0
    """Seconds between FRONTEND registrations in NSP (keep well under its entry-timeout)."""
    underlay_rule_priority: int = 99
    """Priority of ``from <primary-address> lookup main`` (vxlan): below the LB's fwmark rules,
    so the encapsulated packets of a marked packet are routed as underlay traffic."""


def _advertised(settings: LbConnectSettings) -> str:
    if settings.connect_advertise:
        return settings.connect_advertise
    endpoint = Endpoint.parse(settings.connect_listen)
    if endpoint.path is not None:
        return settings.connect_listen
    if not endpoint.host or ipaddress.ip_address(endpoint.host).is_unspecified:
        raise ValueError(
            "setting 'connect-advertise' is required when 'connect-listen' listens on a wildcard"
        )
    return str(endpoint)


def _primary(settings: LbConnectSettings) -> str:
    if settings.primary_address:
        return settings.primary_address
    endpoint = Endpoint.parse(_advertised(settings))
    return endpoint.host or ""


def check_connect_settings(
    settings: LbConnectSettings, conduit_name: str, rule_priority: int
) -> None:
    """ValueError naming the setting when the connect settings cannot work."""
    if not settings.connect_listen:
        return
    if not 0 < settings.underlay_rule_priority < rule_priority:
        raise ValueError(
            f"setting 'underlay-rule-priority' ({settings.underlay_rule_priority}) must be "
            f"below 'rule-priority' ({rule_priority})"
        )
    if not conduit_name:
        raise ValueError("setting 'conduit' is required with 'connect-listen'")
    netnsref.parse_allow_list(settings.connect_netns_allow)  # ValueError naming the item
    mechanisms = [m.strip() for m in settings.connect_mechanisms.split(",") if m.strip()]
    unknown = set(mechanisms) - set(conduit.MECHANISMS)
    if not mechanisms or unknown:
        raise ValueError(
            f"setting 'connect-mechanisms': {settings.connect_mechanisms!r}, "
            f"expected a list of {', '.join(conduit.MECHANISMS)}"
        )
    try:
        primary = _primary(settings)
        if primary:
            ipaddress.ip_address(primary)
    except ValueError as exc:
        raise ValueError(f"setting 'primary-address' or 'connect-advertise': {exc}") from exc
    if "vxlan" in mechanisms and not primary:
        raise ValueError("setting 'primary-address' is required for the vxlan mechanism")
    if settings.connect_expiry <= 0 or settings.announce_interval <= 0:
        raise ValueError("settings 'connect-expiry' and 'announce-interval' must be positive")


class LbPolicy:
    """Addresses as the proxy proposed them; the LB's end carries its own."""

    def __init__(self, network_service: str) -> None:
        self.network_service = network_service
        self.endpoint: ConnectEndpoint | None = None

    def check(self, spec: RequestSpec) -> None:
        conduit.check_proposed_pair(spec.client_addresses, spec.endpoint_addresses)
        assert self.endpoint is not None
        mine = {a.ip for a in spec.endpoint_addresses}
        for other in self.endpoint.connections.values():
            if other.connection_id == spec.connection_id:
                continue
            clash = mine & {ipaddress.ip_interface(a).ip for a in other.assigned.on_link}
            if clash:
                raise InvalidRequest(
                    f"address {min(clash)} is already used by connection {other.connection_id}"
                )

    async def assign(self, spec: RequestSpec, previous: Assigned | None) -> Assigned:
        client = tuple(str(a) for a in spec.client_addresses)
        endpoint = tuple(str(a) for a in spec.endpoint_addresses)
        return Assigned(client, endpoint, on_link=endpoint)

    def bridge(self) -> str | None:
        return None

    async def release(self, connection: EndpointConnection, reason: str) -> None:
        return None


class LbConnect:
    """The LB's connect endpoint and its FRONTEND announcement, run beside the LB's data path."""

    def __init__(
        self,
        runtime: Runtime,
        settings: LbConnectSettings,
        trench: str,
        conduit_name: str,
        takes_replies: Callable[[], bool] = lambda: True,
    ):
        self.runtime = runtime
        self.settings = settings
        self.log = runtime.log
        self.trench = trench
        self.conduit = conduit_name
        self.advertise = _advertised(settings)
        self.primary = _primary(settings)
        mechanisms = tuple(m.strip() for m in settings.connect_mechanisms.split(",") if m.strip())
        self.policy = LbPolicy(f"{conduit_name}.{trench}")
        self.endpoint = ConnectEndpoint(
            runtime,
            EndpointConfig(
                name=runtime.instance,
                mechanisms=mechanisms,
                link_prefix="lbc",
                mtu=settings.connect_mtu,
                primary_address=self.primary if "vxlan" in mechanisms else "",
                vxlan_port=settings.vxlan_port,
                expiry=settings.connect_expiry,
                netns_allow=netnsref.parse_allow_list(settings.connect_netns_allow),
            ),
            self.policy,
        )
        self.policy.endpoint = self.endpoint
        self.vxlan = "vxlan" in mechanisms and bool(self.primary)
        self.takes_replies = takes_replies
        self._stop = trio.Event()
        self._wake = trio.Event()
        self._announced: TargetStatus | None = None
        self._announce_done = trio.Event()
        self._announcing = False
        self._withdrawn = False
        self._registry: TargetRegistryStub | None = None

    def frontend(self, status: TargetStatus) -> Target:
        return Target(
            ips=[self.primary or Endpoint.parse(self.advertise).host or self.advertise],
            context={CONNECT_CONTEXT: self.advertise, INSTANCE_CONTEXT: self.runtime.instance},
            status=status,
            type=TargetType.FRONTEND,
            stream=Stream(conduit=Conduit(name=self.conduit, trench=Trench(name=self.trench))),
        )

    async def run(
        self, nsp: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the endpoint and keep the announcement alive; ``nsp`` is a channel to NSP."""
        check = self.runtime.health.register("Connect", ["Readiness"])
        self._registry = TargetRegistryStub(nsp, timeout=5)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.endpoint.run, [self.settings.connect_listen])
                await self._underlay_rule(present=True)
                task_status.started()
                await self._announce(check)
                await trio.sleep_forever()
        finally:
            check.set(False)
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await self.withdraw()
                await self._underlay_rule(present=False)

    async def _underlay_rule(self, *, present: bool) -> None:
        """``from <primary> lookup main`` ahead of the LB's ``fwmark`` rules (vxlan only).

        A VXLAN interface encapsulates a packet keeping its mark, and routes the outer packet
        with it: without this rule the outer packet of a packet the LB marked for a target would
        be sent by that target's table into the VXLAN interface again, and dropped.
        """
        if not self.vxlan:
            return
        netlink = kernel.serial(await self.runtime.netlink(events=True))
        network = ipaddress.ip_network(self.primary)
        rule: dict[str, Any] = {
            "family": socket.AF_INET6 if network.version == 6 else socket.AF_INET,
            "priority": self.settings.underlay_rule_priority,
            "table": MAIN_TABLE,
            "src": str(network),
        }
        if present:
            await netlink.ensure_rule(**rule)
        else:
            await netlink.ensure_rule_absent(**rule)

    def replies_changed(self) -> None:
        """Whether this LB can take replies may have changed: if so, announce it now, not at
        the next keepalive."""
        want = TargetStatus.ENABLED if self.takes_replies() else TargetStatus.DISABLED
        if want != self._announced:
            self._wake.set()

    async def _announce(self, check: Any) -> None:
        """Keep the announcement alive: ENABLED while the LB can take the targets' replies
        (its egress toward the gateways is up), DISABLED (connected, but no replies) while
        not, e.g. a new LB whose BGP sessions are still coming up."""
        self._announcing = True
        try:
            while not self._stop.is_set():
                self._wake = trio.Event()
                want = TargetStatus.ENABLED if self.takes_replies() else TargetStatus.DISABLED
                try:
                    await self._register(want)
                    if want == TargetStatus.ENABLED and self._announced != want:
                        # NSP stores a target it did not know as disabled: enable it (one it
                        # knew, e.g. after a restart of this LB, stays enabled throughout)
                        await self._register(TargetStatus.ENABLED)
                    if self._announced != want:
                        self.log.info(
                            "conduit endpoint announced",
                            connect=self.advertise,
                            replies=want == TargetStatus.ENABLED,
                        )
                    self._announced = want
                    check.set(True)
                    wait = self.settings.announce_interval
                except (grpclib.GRPCError, StreamTerminatedError, OSError, TimeoutError) as exc:
                    check.set(False)
                    self.log.warning("announcing the conduit endpoint failed", error=str(exc))
                    wait = 1.0
                try:
                    await self._underlay_rule(present=True)  # repairs drift
                except Exception as exc:
                    self.log.error("restoring the underlay rule failed", error=str(exc))
                with trio.move_on_after(wait):
                    await self._wake.wait()
        finally:
            self._announce_done.set()

    async def _register(self, status: TargetStatus) -> None:
        assert self._registry is not None
        await self.runtime.grpc.call(self._registry.register, self.frontend(status))

    async def _stop_announcing(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._announcing:
            await self._announce_done.wait()  # no registration in flight after this

    async def drain(self) -> None:
        """Announce this LB as draining (DISABLED): proxies take it out of their egress."""
        if self._stop.is_set() or self._registry is None:
            return
        await self._stop_announcing()
        try:
            await self._register(TargetStatus.DISABLED)
            self.log.info("conduit endpoint draining", connect=self.advertise)
        except (grpclib.GRPCError, StreamTerminatedError, OSError, TimeoutError) as exc:
            self.log.warning("announcing the drain failed", error=str(exc))

    async def withdraw(self) -> None:
        """Remove the announcement (proxies then close their connections); idempotent."""
        if self._withdrawn or self._registry is None:
            return
        self._withdrawn = True
        await self._stop_announcing()
        try:
            await self.runtime.grpc.call(
                self._registry.unregister, self.frontend(TargetStatus.ENABLED)
            )
            self.log.info("conduit endpoint withdrawn", connect=self.advertise)
        except (grpclib.GRPCError, StreamTerminatedError, OSError, TimeoutError) as exc:
            self.log.warning("withdrawing the conduit endpoint failed", error=str(exc))
