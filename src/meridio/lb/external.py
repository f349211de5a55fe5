"""The LB's external side: its interface toward the gateways and the egress of VIP traffic.

The LB faces the gateways through one interface, in one of three ways:

* an existing interface (``external-interface`` alone), e.g. one Multus put in the pod;
* an 802.1Q VLAN sub-interface of a parent (``external-parent``, ``external-kind=vlan``,
  ``external-vlan-id``), created by the LB;
* a macvlan of a parent (``external-parent``, ``external-kind=macvlan``), created by the LB.

It carries ``external-addresses`` (IPv4 and IPv6, with their prefix length). Replies from the
VIPs leave through the gateways only: for every VIP of the trench (as the NSP sends them) a rule
``from <VIP> lookup <gateway-table>``, and in that table a default route via the gateways
(multipath when there are several of a family) plus a blackhole default at a worse metric, so
that a reply finds no other way out when no gateway route is there. Routing is static (no BGP,
no BFD): the gateways route the VIPs over the LBs' external addresses themselves.

Everything is idempotent: a link of the wanted kind and parent that already exists is adopted,
addresses and rules are compared before they change, and a periodic call with ``check_drift``
reads the kernel back and repairs it. :meth:`External.detach` removes what the LB made: the link
it created (or, from an existing interface, only its configured addresses), the rules and the
routes.

The pure part (:func:`external_spec`, :func:`route_plan`) decides; :class:`External` applies.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyroute2.netlink.exceptions import NetlinkError

from meridio.connect import kernel
from meridio.core.proxystate import SourceRule, egress_rules
from meridio.runtime.netlink import NetlinkManager

KINDS = ("vlan", "macvlan")
MACVLAN_MODES = ("bridge", "private", "vepa", "passthru")
ALIAS = "meridio-lb-external"
DEFAULT_INTERFACE = "ext0"
BLACKHOLE_METRIC = 65535
"""Metric of the blackhole default in the gateway table: worse than any gateway route."""
RTN_UNICAST = 1
RTN_BLACKHOLE = 6
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
RESERVED_TABLES = (0, 253, 254, 255)
MAIN_RULE_PRIORITY = 32766
KERNEL_SUPPORT = {
    "vlan": "802.1Q VLAN support (CONFIG_VLAN_8021Q, module 8021q)",
    "macvlan": "macvlan support (CONFIG_MACVLAN, module macvlan)",
}


class ExternalError(Exception):
    """The external interface cannot be made as configured; the message says why."""


class ExternalSettings(Protocol):
    """The LB settings this module reads (see ``meridio.roles.lb.LbSettings``)."""

    @property
    def external_interface(self) -> str: ...
    @property
    def external_parent(self) -> str: ...
    @property
    def external_kind(self) -> str: ...
    @property
    def external_vlan_id(self) -> int: ...
    @property
    def external_macvlan_mode(self) -> str: ...
    @property
    def external_addresses(self) -> str | list[str]: ...
    @property
    def gateways(self) -> str | list[str]: ...
    @property
    def gateway_table(self) -> int: ...
    @property
    def gateway_rule_priority(self) -> int: ...


def split_list(value: str | Sequence[str]) -> tuple[str, ...]:
    """A list setting given as a list (YAML) or as comma- or space-separated text (flags)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


@dataclass(frozen=True)
class ExternalSpec:
    """What the LB's external side should be, checked and normalised."""

    interface: str
    """The interface facing the gateways ("" when only gateways are configured)."""
    parent: str = ""
    """Parent of the interface to create; "" when the interface exists already."""
    kind: str = ""
    """``vlan`` or ``macvlan`` when created, "" for an existing interface."""
    vlan_id: int = 0
    macvlan_mode: str = "bridge"
    addresses: tuple[str, ...] = ()
    """CIDRs on the interface, canonical (``192.0.2.11/24``)."""
    gateways: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    """Per IP family, the gateway addresses, sorted."""
    table: int = 4096
    priority: int = 200
    routes_from_frontend: bool = False
    """The gateway routes come from the LB's BIRD (its kernel protocol writes them into the
    table): only the rules and the blackhole are ours."""

    @property
    def creates(self) -> bool:
        return bool(self.parent)


def external_spec(
    settings: ExternalSettings, *, routes_from_frontend: bool = False
) -> ExternalSpec | None:
    """The external side as configured, or None when none is; ValueError names the setting.

    With ``routes_from_frontend`` (an attractor is set) the gateways and their routes come
    from the NSP's configuration through BIRD, not from the ``gateways`` setting."""
    interface = settings.external_interface.strip()
    parent = settings.external_parent.strip()
    addresses = split_list(settings.external_addresses)
    gateways = split_list(settings.gateways)
    if not (interface or parent or addresses or gateways or routes_from_frontend):
        return None
    if routes_from_frontend and gateways:
        raise ValueError(
            "settings 'gateways' and 'attractor' exclude each other: with an attractor the "
            "gateways come from the NSP's configuration"
        )
    if routes_from_frontend and not (interface or parent):
        raise ValueError(
            "setting 'attractor' needs 'external-interface' or 'external-parent': BIRD speaks "
            "to the gateways on the external interface only"
        )
    kind = ""
    if parent:
        kind = settings.external_kind.strip()
        if kind not in KINDS:
            raise ValueError(f"setting 'external-kind': {kind!r} is not one of {', '.join(KINDS)}")
        interface = interface or DEFAULT_INTERFACE
        if interface == parent:
            raise ValueError("settings 'external-interface' and 'external-parent' are the same")
        if not kernel_ifname_ok(parent):
            raise ValueError(f"setting 'external-parent': {parent!r} is not an interface name")
        if kind == "vlan" and not 1 <= settings.external_vlan_id <= 4094:
            raise ValueError(
                f"setting 'external-vlan-id': {settings.external_vlan_id} is not within 1..4094"
            )
        if kind == "macvlan" and settings.external_macvlan_mode not in MACVLAN_MODES:
            raise ValueError(
                f"setting 'external-macvlan-mode': {settings.external_macvlan_mode!r} is not "
                f"one of {', '.join(MACVLAN_MODES)}"
            )
    if interface and not kernel_ifname_ok(interface):
        raise ValueError(f"setting 'external-interface': {interface!r} is not an interface name")
    if addresses and not interface:
        raise ValueError(
            "setting 'external-addresses' needs 'external-interface' or 'external-parent'"
        )
    canonical = []
    for address in addresses:
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError:
            raise ValueError(
                f"setting 'external-addresses': {address!r} is not an address with a prefix "
                "length (e.g. 192.0.2.11/24)"
            ) from None
        if "/" not in address:
            raise ValueError(
                f"setting 'external-addresses': {address!r} needs a prefix length (e.g. /24)"
            )
        canonical.append(str(iface))
    per_family: dict[int, list[str]] = {}
    for gateway in gateways:
        try:
            ip = ipaddress.ip_address(gateway)
        except ValueError:
            raise ValueError(f"setting 'gateways': {gateway!r} is not an IP address") from None
        per_family.setdefault(ip.version, []).append(str(ip))
    table = settings.gateway_table
    if table in RESERVED_TABLES or not 0 < table < 2**32:
        raise ValueError(f"setting 'gateway-table': {table} is not a free routing table id")
    priority = settings.gateway_rule_priority
    if not 0 < priority < MAIN_RULE_PRIORITY:
        raise ValueError(
            f"setting 'gateway-rule-priority': {priority} must be within "
            f"1..{MAIN_RULE_PRIORITY - 1} (ahead of the main table)"
        )
    return ExternalSpec(
        interface=interface,
        parent=parent,
        kind=kind,
        vlan_id=settings.external_vlan_id if kind == "vlan" else 0,
        macvlan_mode=settings.external_macvlan_mode,
        addresses=tuple(sorted(set(canonical))),
        gateways={
            family: tuple(sorted(set(hops), key=ipaddress.ip_address))
            for family, hops in sorted(per_family.items())
        },
        table=table,
        priority=priority,
        routes_from_frontend=routes_from_frontend,
    )


def kernel_ifname_ok(name: str) -> bool:
    """A name the kernel takes for an interface (1..15 bytes, no slash, colon or space)."""
    return (
        0 < len(name.encode()) <= 15
        and not any(c in name for c in "/: \t\n")
        and name
        not in (
            ".",
            "..",
        )
    )


@dataclass(frozen=True)
class TableRoutes:
    """The default routes of one family in the gateway table."""

    gateways: tuple[str, ...]
    """Next hops of the (multipath) gateway route; empty: none."""
    blackhole: bool


def route_plan(spec: ExternalSpec) -> dict[int, TableRoutes]:
    """Per family, the default routes the gateway table must hold: the gateway route (if the
    family has gateways) and always the blackhole behind it."""
    return {f: TableRoutes(spec.gateways.get(f, ()), blackhole=True) for f in (4, 6)}


def read_table_routes(messages: Iterable[Any], table: int) -> TableRoutes:
    """What the default routes of ``table`` in a route dump of one family amount to."""
    hops: list[str] = []
    blackhole = False
    for msg in messages:
        if msg["dst_len"] != 0 or (msg.get("RTA_TABLE") or msg["table"]) != table:
            continue
        if msg["type"] == RTN_BLACKHOLE:
            blackhole = True
        elif msg["type"] == RTN_UNICAST:
            gateway = msg.get("RTA_GATEWAY")
            if gateway:
                hops.append(gateway)
            for nexthop in msg.get("RTA_MULTIPATH") or ():
                gateway = nexthop.get("RTA_GATEWAY")
                if gateway:
                    hops.append(gateway)
    canonical = sorted({str(ipaddress.ip_address(h)) for h in hops}, key=ipaddress.ip_address)
    return TableRoutes(tuple(canonical), blackhole)


def missing_support(kind: str, exc: NetlinkError) -> str | None:
    """The kernel support a failed link creation points at (EOPNOTSUPP: unknown link kind)."""
    if exc.code == errno.EOPNOTSUPP:
        return KERNEL_SUPPORT.get(kind)
    return None


class External:
    """Applies an :class:`ExternalSpec` through the runtime's netlink manager."""

    def __init__(self, netlink: NetlinkManager, spec: ExternalSpec, log: Any) -> None:
        self.netlink = kernel.serial(netlink)
        self.spec = spec
        self.log = log
        self.owned_link = False
        """The interface is ours to delete (created by this LB, or by an earlier instance)."""
        self._rules: frozenset[SourceRule] | None = None
        self._routes: dict[int, TableRoutes] = {}

    # --- the interface --------------------------------------------------------------------

    async def attach(self) -> None:
        """Make (or adopt) the interface, bring it up and give it its addresses."""
        spec = self.spec
        if not spec.interface:
            return
        links = await kernel.read_links(self.netlink)
        if spec.creates:
            await self._create(links)
        elif spec.interface not in links:
            raise ExternalError(
                f"external interface {spec.interface} does not exist (set 'external-parent' to "
                "have the LB create it)"
            )
        # Announce the addresses (gratuitous ARP, unsolicited NA) when the link comes up: an
        # LB that replaces another takes its addresses with a new MAC address, and the gateway
        # must not keep sending to the old one.
        kernel.write_sysctl(f"net/ipv4/conf/{spec.interface}/arp_notify", "1")
        kernel.write_sysctl(f"net/ipv6/conf/{spec.interface}/ndisc_notify", "1")
        if spec.addresses:
            if any(ipaddress.ip_interface(a).version == 6 for a in spec.addresses):
                kernel.no_dad(spec.interface)
            have = {
                str(ipaddress.ip_interface(a)) for a in await self.netlink.addresses(spec.interface)
            }
            for address in spec.addresses:
                if address not in have:
                    await self.netlink.ensure_address(spec.interface, address)
        await self.netlink.ensure_link_up(spec.interface)
        self.log.info(
            "external interface attached",
            interface=spec.interface,
            kind=spec.kind or "existing",
            parent=spec.parent or None,
            addresses=list(spec.addresses),
            gateways=[g for hops in spec.gateways.values() for g in hops],
        )

    async def _create(self, links: Mapping[str, kernel.LinkInfo]) -> None:
        spec = self.spec
        parent = links.get(spec.parent)
        if parent is None:
            raise ExternalError(f"parent interface {spec.parent} of {spec.interface} not found")
        existing = links.get(spec.interface)
        if existing is not None:
            if existing.kind != spec.kind:
                raise ExternalError(
                    f"interface {spec.interface} exists and is a {existing.kind or 'plain'} "
                    f"link, not a {spec.kind} of {spec.parent}"
                )
            self.owned_link = existing.alias == ALIAS
            self.log.info("external interface adopted", interface=spec.interface)
        else:
            attrs: dict[str, Any] = {"link": parent.index}
            if spec.kind == "vlan":
                attrs["vlan_id"] = spec.vlan_id
            else:
                attrs["macvlan_mode"] = spec.macvlan_mode
            try:
                await self.netlink.ensure_link(spec.interface, spec.kind, **attrs)
            except NetlinkError as exc:
                support = missing_support(spec.kind, exc)
                if support is not None:
                    raise ExternalError(
                        f"cannot create the {spec.kind} interface {spec.interface} on "
                        f"{spec.parent}: this kernel has no {support}"
                    ) from exc
                raise ExternalError(
                    f"cannot create the {spec.kind} interface {spec.interface} on "
                    f"{spec.parent}: {exc}"
                ) from exc
            self.owned_link = True
        if self.owned_link:
            await self.netlink.set_link(spec.interface, ifalias=ALIAS)
        if not parent.up:
            await self.netlink.ensure_link_up(spec.parent)

    # --- egress ---------------------------------------------------------------------------

    async def reconcile(self, vips: Iterable[str], *, check_drift: bool) -> bool:
        """``from <VIP>`` rules for exactly ``vips``, and the gateway table's routes; True when
        something changed."""
        spec = self.spec
        want = egress_rules(vips, (4, 6))
        have = await self._read_rules() if check_drift or self._rules is None else self._rules
        changed = False
        for rule in sorted(have - want):
            await self.netlink.ensure_rule_absent(
                family=FAMILY[rule.family], priority=spec.priority, table=spec.table, src=rule.src
            )
            changed = True
        for rule in sorted(want - have):
            await self.netlink.ensure_rule(
                family=FAMILY[rule.family], priority=spec.priority, table=spec.table, src=rule.src
            )
            changed = True
        self._rules = want
        for family, wanted in route_plan(spec).items():
            current = self._routes.get(family)
            if check_drift or current is None:
                current = read_table_routes(
                    await self.netlink.routes(spec.table, FAMILY[family]), spec.table
                )
            if current.gateways != wanted.gateways and not spec.routes_from_frontend:
                if wanted.gateways:
                    await self.netlink.ensure_route(
                        "default",
                        table=spec.table,
                        family=FAMILY[family],
                        **(
                            {"gateway": wanted.gateways[0]}
                            if len(wanted.gateways) == 1
                            else {"multipath": list(wanted.gateways)}
                        ),
                    )
                else:  # a gateway route nobody asked for (drift): start the table afresh
                    await self._delete_defaults(family)
                    current = TableRoutes((), blackhole=False)
                changed = True
            if wanted.blackhole and not current.blackhole:
                await self.netlink.ensure_route(
                    "default",
                    table=spec.table,
                    family=FAMILY[family],
                    type="blackhole",
                    priority=BLACKHOLE_METRIC,
                )
                changed = True
            self._routes[family] = wanted
        if changed:
            self.log.info(
                "egress reconciled",
                vips=sorted(r.src for r in want),
                table=spec.table,
                drift=check_drift,
            )
        return changed

    async def _delete_defaults(self, family: int) -> None:
        """Delete every default route of the gateway table in ``family``."""
        spec = self.spec
        routes = await self.netlink.routes(spec.table, FAMILY[family])
        count = sum(
            1
            for msg in routes
            if msg["dst_len"] == 0 and (msg.get("RTA_TABLE") or msg["table"]) == spec.table
        )
        for _ in range(count):  # each deletion takes the first default route left
            await self.netlink.ensure_route_absent(
                "default", table=spec.table, family=FAMILY[family]
            )

    async def _read_rules(self) -> frozenset[SourceRule]:
        found = set()
        for msg in await self.netlink.rules():
            table = msg.get("FRA_TABLE") or msg["table"]
            src = msg.get("FRA_SRC")
            if table == self.spec.table and msg.get("FRA_PRIORITY") == self.spec.priority and src:
                net = ipaddress.ip_network(f"{src}/{msg['src_len']}", strict=False)
                found.add(SourceRule(net.version, str(net)))
        return frozenset(found)

    # --- removal --------------------------------------------------------------------------

    async def detach(self) -> None:
        """Remove the rules, the gateway table's routes and the interface it made (from an
        existing interface: the configured addresses)."""
        spec = self.spec
        for rule in sorted(await self._read_rules()):
            await self.netlink.ensure_rule_absent(
                family=FAMILY[rule.family], priority=spec.priority, table=spec.table, src=rule.src
            )
        for family in (4, 6):
            await self._delete_defaults(family)
        self._rules = None
        self._routes.clear()
        if spec.interface and self.owned_link:
            await kernel.remove_link(self.netlink, spec.interface)
        elif spec.interface:  # the configured addresses are the LB's; the rest is not
            for address in spec.addresses:
                await self.netlink.ensure_address_absent(spec.interface, address)
        self.log.info("external interface and egress removed", interface=spec.interface or None)
