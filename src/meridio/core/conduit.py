"""The connect model, pure: what a connect request means and the names and numbers it implies.

A client (a proxy toward an LB, a target toward its proxy) asks an endpoint for a link with a
``ConnectRequest`` (``meridio.connect.v1``). This module turns such a request into a validated
:class:`RequestSpec` (or says exactly what is wrong with it), and computes what both sides must
agree on without talking: interface names derived from the connection id, VXLAN VNI proposals,
MTUs after encapsulation, and checks of proposed address pairs. No I/O and no clock here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from meridio.api.meridio.connect.v1 import ConnectRequest, Mechanism
from meridio.core.wire import encode_varint

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

VETH: Final = "veth"
VXLAN: Final = "vxlan"
MECHANISMS: Final = (VETH, VXLAN)
VXLAN_PORT: Final = 4789
#: Bytes VXLAN adds to every frame: outer IP header + UDP (8) + VXLAN (8) + inner Ethernet (14).
VXLAN_OVERHEAD: Final = {4: 20 + 8 + 8 + 14, 6: 40 + 8 + 8 + 14}
MAX_VNI: Final = (1 << 24) - 1
#: Longest interface name Linux accepts (IFNAMSIZ minus the terminating NUL).
MAX_IFNAME: Final = 15
MAX_CONNECTION_ID: Final = 200
MAX_NAME: Final = 253
MAX_CONTEXT_ENTRIES: Final = 32
MIN_MTU: Final = 1280  # IPv6's minimum; a conduit below it could not carry IPv6
MAX_MTU: Final = 65535
#: Interface aliases (IFLA_IFALIAS) that mark a link as owned by a connection, so a restarted
#: endpoint or client recognises its links and their connections.
ENDPOINT_ALIAS: Final = "meridio-endpoint:"
CLIENT_ALIAS: Final = "meridio-client:"


class InvalidRequest(ValueError):
    """A connect request that must be refused; the message says why (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class MechanismSpec:
    """One acceptable mechanism with the client's parameters."""

    type: str
    interface: str
    netns_path: str = ""  # veth
    client_address: str = ""  # vxlan: the client's primary address
    vni: int = 0  # vxlan: proposed by the client, then agreed
    port: int = VXLAN_PORT


@dataclass(frozen=True)
class RequestSpec:
    network_service: str
    connection_id: str
    client_name: str
    mechanisms: tuple[MechanismSpec, ...]
    context: Mapping[str, str] = field(default_factory=dict)
    client_addresses: tuple[Interface, ...] = ()
    endpoint_addresses: tuple[Interface, ...] = ()
    mtu: int = 0

    def mechanism(self, kind: str) -> MechanismSpec | None:
        return next((m for m in self.mechanisms if m.type == kind), None)


def valid_ifname(name: str) -> bool:
    """Whether Linux accepts ``name`` as an interface name."""
    return (
        0 < len(name) <= MAX_IFNAME
        and name not in (".", "..")
        and name.isascii()
        and name.isprintable()
        and not any(c in name for c in "/: \t")
    )


def _check_text(what: str, value: str, limit: int) -> None:
    if not value:
        raise InvalidRequest(f"{what} is empty")
    if len(value) > limit:
        raise InvalidRequest(f"{what} is longer than {limit} characters")
    if not (value.isascii() and value.isprintable()) or any(c.isspace() for c in value):
        raise InvalidRequest(f"{what} {value!r} must be printable ASCII without spaces")


def parse_address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidRequest(f"{what} {text!r} is not an IP address") from None


def parse_interfaces(texts: Sequence[str], what: str) -> tuple[Interface, ...]:
    """CIDRs with host bits (``198.18.1.5/24``), at most one per family, no network/broadcast."""
    out: list[Interface] = []
    for text in texts:
        if "/" not in text:
            raise InvalidRequest(f"{what} {text!r} has no prefix length")
        try:
            iface = ipaddress.ip_interface(text)
        except ValueError:
            raise InvalidRequest(f"{what} {text!r} is not an address with a prefix") from None
        if any(o.version == iface.version for o in out):
            raise InvalidRequest(f"{what}: more than one IPv{iface.version} address")
        net = iface.network
        if net.num_addresses > 2 and iface.ip in (net.network_address, net.broadcast_address):
            raise InvalidRequest(f"{what} {text!r} is not a host address of {net}")
        out.append(iface)
    return tuple(out)


def _mechanism(m: Mechanism, index: int) -> MechanismSpec:
    kind = str(m.type)
    where = f"mechanism {index + 1} ({kind or 'no type'})"
    if kind not in MECHANISMS:
        raise InvalidRequest(f"{where}: unknown type, expected one of {', '.join(MECHANISMS)}")
    interface = str(m.interface_name)
    if not valid_ifname(interface):
        raise InvalidRequest(f"{where}: interface name {interface!r} is not a valid Linux name")
    if kind == VETH:
        path = str(m.veth.netns_path)
        if not path.startswith("/") or "\0" in path or len(path) > 4096:
            raise InvalidRequest(f"{where}: netns path {path!r} must be an absolute path")
        return MechanismSpec(VETH, interface, netns_path=path)
    address = str(m.vxlan.client_address)
    parse_address(address, f"{where}: client address")
    vni = int(m.vxlan.vni)
    if not 1 <= vni <= MAX_VNI:
        raise InvalidRequest(f"{where}: VNI {vni} outside 1..{MAX_VNI}")
    port = int(m.vxlan.port) or VXLAN_PORT
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"{where}: UDP port {port} outside 1..65535")
    return MechanismSpec(VXLAN, interface, client_address=address, vni=vni, port=port)


def parse_request(req: ConnectRequest) -> RequestSpec:
    """Validate a request (raising :class:`InvalidRequest`) and return its spec."""
    _check_text("network service", req.network_service, MAX_NAME)
    _check_text("connection id", req.connection_id, MAX_CONNECTION_ID)
    _check_text("client name", req.client_name, MAX_NAME)
    context = dict(req.extra_context)
    if len(context) > MAX_CONTEXT_ENTRIES:
        raise InvalidRequest(f"extra context has more than {MAX_CONTEXT_ENTRIES} entries")
    for key, value in context.items():
        if not key or len(key) > 64 or len(value) > 1024:
            raise InvalidRequest(f"extra context entry {key[:64]!r}: empty or too long")
    if not req.mechanisms:
        raise InvalidRequest("no mechanism offered")
    mechanisms = tuple(_mechanism(m, i) for i, m in enumerate(req.mechanisms))
    mtu = int(req.mtu)
    if mtu and not MIN_MTU <= mtu <= MAX_MTU:
        raise InvalidRequest(f"MTU {mtu} outside {MIN_MTU}..{MAX_MTU}")
    return RequestSpec(
        network_service=req.network_service,
        connection_id=req.connection_id,
        client_name=req.client_name,
        mechanisms=mechanisms,
        context=context,
        client_addresses=parse_interfaces(req.client_addresses, "client address"),
        endpoint_addresses=parse_interfaces(req.endpoint_addresses, "endpoint address"),
        mtu=mtu,
    )


def check_proposed_pair(client: Sequence[Interface], endpoint: Sequence[Interface]) -> None:
    """Proposed addresses for both ends: the same families, each pair in one subnet, distinct."""
    if not client or not endpoint:
        raise InvalidRequest("addresses for both ends must be proposed")
    by_family = {a.version: a for a in endpoint}
    if {a.version for a in client} != set(by_family):
        raise InvalidRequest("client and endpoint addresses must be of the same IP families")
    for mine in client:
        theirs = by_family[mine.version]
        if mine.network != theirs.network:
            raise InvalidRequest(f"addresses {mine} and {theirs} are not in one subnet")
        if mine.ip == theirs.ip:
            raise InvalidRequest(f"both ends proposed with the same address {mine.ip}")


def _digest(text: str, size: int) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def link_name(prefix: str, connection_id: str) -> str:
    """A stable interface name for a connection: ``prefix`` and a hash of the id (<= 15 chars)."""
    room = MAX_IFNAME - len(prefix)
    if room < 6:
        raise ValueError(f"interface name prefix {prefix!r} is too long")
    return prefix + _digest(connection_id, 8).hex()[:room]


def propose_vni(connection_id: str, attempt: int, used: Iterable[int] = ()) -> int:
    """The VNI a client proposes: a hash of its connection id and the attempt, skipping ``used``.

    Deterministic, so a restarted client proposes what it proposed before; an endpoint that
    refuses one (ALREADY_EXISTS) gets the next attempt.
    """
    taken = set(used)
    n = attempt
    while True:
        vni = 1 + int.from_bytes(_digest(f"{connection_id}#{n}", 4), "big") % (MAX_VNI - 1)
        if vni not in taken:
            return vni
        n += 1


def vxlan_mtu(underlay_mtu: int, family: int) -> int:
    """The MTU of a VXLAN interface over an underlay of ``underlay_mtu`` in IPv``family``."""
    return underlay_mtu - VXLAN_OVERHEAD[family]


def agree_mtu(endpoint_limit: int, client_limit: int) -> int:
    """The MTU both ends use: the smaller limit (a client limit of 0 means none)."""
    return min(endpoint_limit, client_limit) if client_limit else endpoint_limit


def alias_of(prefix: str, connection_id: str) -> str:
    return f"{prefix}{connection_id}"


def connection_of(prefix: str, alias: str | None) -> str | None:
    """The connection id a link alias names, or None if the link is not owned that way."""
    if alias and alias.startswith(prefix) and len(alias) > len(prefix):
        return alias[len(prefix) :]
    return None


def family(address: str) -> int:
    """4 or 6 for an address or CIDR."""
    return ipaddress.ip_interface(address).version


def host(cidr: str | Interface) -> str:
    """The address of a CIDR, without the prefix length."""
    return str(ipaddress.ip_interface(cidr).ip)


def _delimited(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (``number`` below 16: its key is one byte)."""
    return bytes((number << 3 | 2,)) + encode_varint(len(data)) + data


def _varint_field(number: int, value: int) -> bytes:
    return bytes((number << 3,)) + encode_varint(value) if value else b""


def _string_field(number: int, value: str) -> bytes:
    return _delimited(number, value.encode()) if value else b""


def connection_bytes(
    *,
    connection_id: str,
    network_service: str,
    endpoint_name: str,
    mechanism: MechanismSpec,
    endpoint_address: str,
    client_addresses: Iterable[str],
    endpoint_addresses: Iterable[str],
    endpoint_interface: str,
    mtu: int,
    expiry_seconds: float,
    context: Mapping[str, str],
) -> bytes:
    """An endpoint's reply, a ``meridio.connect.v1.Connection``, as bytes: those betterproto
    makes of it (fields in order, zero values left out, the mechanism and its veth or vxlan
    part always written) in a twentieth of the time (building and serializing the message
    took 0.7 ms: most of a second when a thousand targets connect at once). The veth part
    carries ``mechanism.netns_path``; the vxlan part ``mechanism.client_address``, ``vni``,
    ``port`` and ``endpoint_address``, this side's underlay address."""
    if mechanism.type == VETH:
        part = _delimited(3, _string_field(1, mechanism.netns_path))
    else:
        part = _delimited(
            4,
            _string_field(1, mechanism.client_address)
            + _string_field(2, endpoint_address)
            + _varint_field(3, mechanism.vni)
            + _varint_field(4, mechanism.port),
        )
    out = [
        _string_field(1, connection_id),
        _string_field(2, network_service),
        _string_field(3, endpoint_name),
        _delimited(
            4, _string_field(1, mechanism.type) + _string_field(2, mechanism.interface) + part
        ),
    ]
    out += [_delimited(5, cidr.encode()) for cidr in client_addresses]
    out += [_delimited(6, cidr.encode()) for cidr in endpoint_addresses]
    out.append(_string_field(7, endpoint_interface))
    out.append(_varint_field(8, mtu))
    if expiry_seconds:
        out.append(b"\x49" + struct.pack("<d", expiry_seconds))  # field 9, 64-bit
    for key, value in context.items():
        entry = _string_field(1, key) + _string_field(2, value)
        if entry:
            out.append(_delimited(10, entry))
    return b"".join(out)
