"""The LB frontend's BIRD 2 configuration, decided and rendered without I/O.

One BIRD per LB speaks to the gateways of the LB's attractor on its external interface only:

* a gateway with protocol ``bgp`` gets a BGP session; the LB announces one host route per VIP
  it is able to forward (a blackhole in BIRD's own table, never in the kernel) and imports what
  the gateway sends back (usually a default route) for the egress of VIP replies;
* a gateway with protocol ``static`` is a default route via the gateway; with BFD the route is
  imported only while the BFD session is up, and the BFD session is what tells the gateway that
  this LB is there, so it runs only while the LB announces.

Routes from the gateways go to the kernel's gateway table (the one the ``from <VIP>`` rules
use), merged into one multipath route per prefix. The VIP host routes never do.

Announcing and withdrawing only change the contents of the ``VIP4``/``VIP6`` static protocols
(and the ``bfd`` flag of static gateways), so a BIRD ``configure`` keeps every session that did
not change (checked against BIRD 2.0.12).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_LOCAL_ASN = 8103
DEFAULT_REMOTE_ASN = 4248829953
DEFAULT_BGP_PORT = 10179
DEFAULT_BFD_INTERVAL_MS = 300
DEFAULT_BFD_MULTIPLIER = 3
TCP_MD5_KEY_MAX = 80
VIP_PROTOCOL = {4: "VIP4", 6: "VIP6"}
KERNEL_PROTOCOL = {4: "KERNEL4", 6: "KERNEL6"}
CHANNEL = {4: "ipv4", 6: "ipv6"}
# BIRD strings have no escapes: anything we put in quotes must be plain.
_PLAIN = re.compile(r"[A-Za-z0-9_.:@+/=-]+")
_KEY_CHARS = re.compile(r"[\x21\x23-\x5b\x5d-\x7e ]+")  # printable ASCII but " and \


class FrontendConfigError(ValueError):
    """A gateway or setting the frontend cannot turn into a BIRD configuration."""


@dataclass(frozen=True)
class Bfd:
    min_rx_ms: int = DEFAULT_BFD_INTERVAL_MS
    min_tx_ms: int = DEFAULT_BFD_INTERVAL_MS
    multiplier: int = DEFAULT_BFD_MULTIPLIER

    def render(self) -> str:
        return (
            f"min rx interval {self.min_rx_ms} ms; min tx interval {self.min_tx_ms} ms; "
            f"multiplier {self.multiplier};"
        )


@dataclass(frozen=True)
class Peer:
    """One gateway as the frontend uses it (from an ``nsp.v1.Gateway``)."""

    name: str
    address: str
    family: int
    protocol: str = "bgp"
    bfd: Bfd | None = None
    hold_time: int = 0
    """Seconds; 0 leaves BIRD's default."""
    local_asn: int = DEFAULT_LOCAL_ASN
    remote_asn: int = DEFAULT_REMOTE_ASN
    local_port: int = DEFAULT_BGP_PORT
    remote_port: int = DEFAULT_BGP_PORT
    password: str = ""
    """The TCP MD5 key of the session (read from the gateway's key source); "" for none."""


@dataclass(frozen=True)
class FrontendConfig:
    """Everything BIRD's configuration depends on."""

    router_id: str
    interface: str
    table: int
    """Kernel table of the ``from <VIP>`` rules, where routes from the gateways go."""
    peers: tuple[Peer, ...] = ()
    announce: tuple[str, ...] = ()
    """VIP CIDRs announced now (sorted)."""
    families: tuple[int, ...] = (4, 6)
    extra: Mapping[str, str] = field(default_factory=dict)


def peer_from_gateway(gateway: object, password: str = "") -> Peer:
    """A :class:`Peer` from an ``nsp.v1.Gateway`` (already checked by the NSP's loader; the
    zero values mean Meridio's defaults)."""
    g = gateway
    address = ipaddress.ip_address(str(getattr(g, "address", "")).strip())
    bfd = None
    if getattr(g, "bfd", False):
        spec = getattr(g, "bfd_spec", None)
        bfd = Bfd(
            min_rx_ms=int(getattr(spec, "min_rx", 0) or DEFAULT_BFD_INTERVAL_MS),
            min_tx_ms=int(getattr(spec, "min_tx", 0) or DEFAULT_BFD_INTERVAL_MS),
            multiplier=int(getattr(spec, "multiplier", 0) or DEFAULT_BFD_MULTIPLIER),
        )
    return Peer(
        name=str(getattr(g, "name", "")),
        address=str(address),
        family=address.version,
        protocol=str(getattr(g, "protocol", "") or "bgp").lower(),
        bfd=bfd,
        hold_time=int(getattr(g, "hold_time", 0) or 0),
        local_asn=int(getattr(g, "local_asn", 0) or DEFAULT_LOCAL_ASN),
        remote_asn=int(getattr(g, "remote_asn", 0) or DEFAULT_REMOTE_ASN),
        local_port=int(getattr(g, "local_port", 0) or DEFAULT_BGP_PORT),
        remote_port=int(getattr(g, "remote_port", 0) or DEFAULT_BGP_PORT),
        password=password,
    )


def check_password(gateway: str, key: str) -> str:
    """The key as BIRD may quote it; FrontendConfigError naming the gateway otherwise."""
    key = key.strip("\r\n")
    if not key:
        raise FrontendConfigError(f"gateway {gateway!r}: the BGP authentication key is empty")
    if len(key.encode()) > TCP_MD5_KEY_MAX:
        raise FrontendConfigError(
            f"gateway {gateway!r}: the BGP authentication key is longer than "
            f"{TCP_MD5_KEY_MAX} bytes (the TCP MD5 limit)"
        )
    if not _KEY_CHARS.fullmatch(key):
        raise FrontendConfigError(
            f"gateway {gateway!r}: the BGP authentication key must be printable ASCII "
            'without " or \\'
        )
    return key


def router_id(setting: str, addresses: Iterable[str], instance: str) -> str:
    """BIRD's router ID: the setting, else the first external IPv4 address, else a stable
    hash of the instance name (so an IPv6-only LB starts, which Meridio's frontend does not)."""
    if setting:
        try:
            rid = ipaddress.IPv4Address(setting.strip())
        except ValueError:
            raise FrontendConfigError(
                f"setting 'router-id': {setting!r} is not an IPv4 address (a 32-bit ID)"
            ) from None
        if int(rid) == 0:
            raise FrontendConfigError("setting 'router-id': 0.0.0.0 is not a valid router ID")
        return str(rid)
    v4 = sorted(
        (ipaddress.ip_interface(a).ip for a in addresses if ipaddress.ip_interface(a).version == 4),
        key=int,
    )
    if v4:
        return str(v4[0])
    digest = hashlib.blake2b(f"meridio-router-id/{instance}".encode(), digest_size=4).digest()
    value = int.from_bytes(digest, "big") or 1
    return str(ipaddress.IPv4Address(value))


def _quote_name(name: str) -> str:
    """A protocol name as BIRD's grammar takes it: in single quotes (``gw`` alone is a
    keyword), from a safe alphabet."""
    if not _PLAIN.fullmatch(name) or len(name) > 60:
        raise FrontendConfigError(
            f"gateway name {name!r}: use letters, digits and . _ - : only (at most 60)"
        )
    return f"'{name}'"


def check_peers(peers: Sequence[Peer]) -> None:
    seen: set[str] = set()
    for peer in peers:
        _quote_name(peer.name)
        if peer.name in seen:
            raise FrontendConfigError(f"gateway {peer.name!r} appears twice")
        if peer.name in VIP_PROTOCOL.values() or peer.name in KERNEL_PROTOCOL.values():
            raise FrontendConfigError(f"gateway name {peer.name!r} is reserved")
        seen.add(peer.name)
        if peer.protocol not in ("bgp", "static"):
            raise FrontendConfigError(f"gateway {peer.name!r}: protocol {peer.protocol!r}")


def render(config: FrontendConfig) -> str:
    """BIRD's configuration file for ``config``."""
    check_peers(config.peers)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", config.interface):
        raise FrontendConfigError(f"interface {config.interface!r} cannot be named in BIRD")
    iface = config.interface
    families = sorted(set(config.families) | {p.family for p in config.peers})
    lines = [
        "# Written by meridiod (the LB frontend) at every change; do not edit.",
        f"router id {config.router_id};",
        "timeformat protocol iso long ms;",
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        "",
        "protocol device {}",
        "",
    ]
    # Interface-wide BFD timers serve the static gateways (BGP sessions carry their own).
    static_bfd = [p.bfd for p in config.peers if p.protocol == "static" and p.bfd]
    if any(p.bfd for p in config.peers):
        timers = static_bfd[0] if static_bfd else Bfd()
        lines += [
            "protocol bfd {",
            f'  interface "{iface}" {{ {timers.render()} }};',
            "}",
            "",
        ]
    by_family: dict[int, list[str]] = {}
    for cidr in config.announce:
        net = ipaddress.ip_network(cidr, strict=False)
        by_family.setdefault(net.version, []).append(str(net))
    for family in families:
        channel = CHANNEL[family]
        vip = VIP_PROTOCOL[family]
        lines += [
            f"protocol kernel {KERNEL_PROTOCOL[family]} {{",
            f'  {channel} {{ import none; export where proto != "{vip}"; }};',
            f"  kernel table {config.table};",
            "  merge paths on;",
            "}",
            "",
            f"protocol static {vip} {{",
            f"  {channel};",
            *(f"  route {net} blackhole;" for net in sorted(by_family.get(family, []))),
            "}",
            "",
        ]
    announcing = bool(config.announce)
    for peer in config.peers:
        lines += _render_peer(peer, iface, announcing)
    return "\n".join(lines) + "\n"


def _render_peer(peer: Peer, iface: str, announcing: bool) -> list[str]:
    name = _quote_name(peer.name)
    channel = CHANNEL[peer.family]
    if peer.protocol == "static":
        default = "0.0.0.0/0" if peer.family == 4 else "::/0"
        # BFD here is the attraction: the gateway sees this LB only while the session runs
        bfd = " bfd" if peer.bfd and announcing else ""
        return [
            f"protocol static {name} {{",
            f"  {channel};",
            f"  route {default} via {peer.address}%'{iface}'{bfd};",
            "}",
            "",
        ]
    body = [
        f"protocol bgp {name} {{",
        f'  interface "{iface}";',
        "  direct;",
        f"  local port {peer.local_port} as {peer.local_asn};",
        f"  neighbor {peer.address} port {peer.remote_port} as {peer.remote_asn};",
        # BIRD waits 5 s before the first connect and 60-300 s after an error (a gateway that
        # restarted, a BFD flap): an LB must be attracted again within seconds
        "  connect delay time 1;",
        "  connect retry time 5;",
        "  error wait time 1, 10;",
    ]
    if peer.bfd:
        body.append(f"  bfd {{ {peer.bfd.render()} }};")
    if peer.hold_time:
        body.append(f"  hold time {peer.hold_time};")
    if peer.password:
        body.append(f'  password "{peer.password}";')
    body += [
        f'  {channel} {{ import all; export where proto = "{VIP_PROTOCOL[peer.family]}"; }};',
        "}",
        "",
    ]
    return body
