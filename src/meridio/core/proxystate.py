"""The proxy's desired state, pure: what it connects to, routes and registers.

Inputs are what NSP says (the LBs announced as FRONTEND targets of the conduit, the trench's
VIPs), what IPAM gave (the node prefix addresses) and the proxy's connections (to targets as an
endpoint, to LBs as a client). Outputs are the LB connections to hold, the ``from <VIP>`` rules
and the multipath default route of the egress table, and the NSP registrations of the targets.
The proxy role turns these into kernel state and NSP calls; nothing here does I/O.

Addresses come from IPAM, named so that a restarted proxy asks for (and gets) the same ones:
``bridge`` is the proxy's own address on the conduit bridge (also the proxy side of every
connection, as Meridio's targets route via the bridge address), ``<connection id>-src`` the
target's end of a target connection (Meridio's "source" side), ``<connection id>-dst`` the LB's
end of an LB connection (Meridio's "destination" side).
"""

from __future__ import annotations

import heapq
import ipaddress
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from meridio.api.nsp.v1 import Target, TargetStatus
from meridio.core.registry import canonical_ips
from meridio.core.wire import encode_varint, read_varint

BRIDGE_CHILD: Final = "bridge"
CONNECT_CONTEXT: Final = "connect"
INSTANCE_CONTEXT: Final = "instance"
NODE_CONTEXT: Final = "node"
"""Extra context of a connect request: the client's node (a proxy refuses another node's)."""

RegistrationKey = tuple[str, tuple[str, ...]]  # (stream, canonical ips)


def target_child(connection_id: str) -> str:
    """IPAM child name of the target's end of a target connection."""
    return f"{connection_id}-src"


def lb_child(connection_id: str) -> str:
    """IPAM child name of the LB's end of an LB connection."""
    return f"{connection_id}-dst"


def cidr(address: str, prefix_length: int) -> str:
    """``address/prefix_length`` as IPAM answers it, checked and in canonical form."""
    return str(ipaddress.ip_interface(f"{address}/{prefix_length}"))


# --- LBs ----------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class LbPeer:
    """An LB instance announced in NSP: where its connect endpoint is, its name, and whether it
    takes traffic (a FRONTEND registered DISABLED is starting or draining: the proxy connects
    to it but sends no replies through it)."""

    connect: str
    name: str
    enabled: bool = True


def lb_peers(frontends: Iterable[Target]) -> dict[str, LbPeer]:
    """The LBs to connect to, by connect endpoint, from the FRONTEND targets of the conduit."""
    peers: dict[str, LbPeer] = {}
    for target in frontends:
        connect = target.context.get(CONNECT_CONTEXT, "")
        if not connect:
            continue
        name = target.context.get(INSTANCE_CONTEXT, "") or connect
        enabled = int(target.status) == int(TargetStatus.ENABLED)
        peers[connect] = LbPeer(connect, name, enabled)
    return peers


def lb_connection_id(node: str, connect: str) -> str:
    """The id of this node's connection to the LB at ``connect``: stable across restarts of
    either side, and unique among all connections the LB holds."""
    return f"{node}>{connect}"


# --- egress -------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class SourceRule:
    """``ip rule add from <src> lookup <egress table>`` in one family."""

    family: int
    src: str


def egress_rules(vips: Iterable[str], families: Iterable[int]) -> frozenset[SourceRule]:
    """One source rule per VIP (CIDR) of a family the conduit carries."""
    served = set(families)
    rules = set()
    for vip in vips:
        try:
            net = ipaddress.ip_network(vip, strict=False)
        except ValueError:
            continue
        if net.version in served:
            rules.add(SourceRule(net.version, str(net)))
    return frozenset(rules)


def egress_next_hops(lb_addresses: Iterable[str]) -> dict[int, tuple[str, ...]]:
    """Per family, the LB-side addresses (CIDRs) of the LB connections as sorted next hops."""
    hops: dict[int, set[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
    for address in lb_addresses:
        ip = ipaddress.ip_interface(address).ip
        hops.setdefault(ip.version, set()).add(ip)
    return {fam: tuple(str(ip) for ip in sorted(ips)) for fam, ips in sorted(hops.items())}


# --- target registrations -----------------------------------------------------------------------


@dataclass(frozen=True)
class TargetConnection:
    """What the proxy knows of a connected target."""

    connection_id: str
    addresses: tuple[str, ...]  # the target's end, CIDRs
    identifiers: Mapping[str, int]  # stream -> identifier
    up: bool  # the link is up


@dataclass(frozen=True, order=True)
class Registration:
    stream: str
    ips: tuple[str, ...]
    identifier: int
    enabled: bool

    @property
    def key(self) -> RegistrationKey:
        return self.stream, self.ips


def registrations(connections: Iterable[TargetConnection]) -> dict[RegistrationKey, Registration]:
    """One registration per (target, stream); disabled while the target's link is not up."""
    out: dict[RegistrationKey, Registration] = {}
    for conn in sorted(connections, key=lambda c: c.connection_id):
        if not conn.addresses:
            continue
        ips = tuple(canonical_ips(conn.addresses))
        for stream, identifier in sorted(conn.identifiers.items()):
            reg = Registration(stream, ips, identifier, conn.up)
            out.setdefault(reg.key, reg)
    return out


@dataclass(frozen=True)
class RegistrationPlan:
    register: tuple[Registration, ...]  # new or changed: register now
    unregister: tuple[Registration, ...]  # gone: unregister now


def plan_registrations(
    current: Mapping[RegistrationKey, Registration],
    desired: Mapping[RegistrationKey, Registration],
) -> RegistrationPlan:
    register = tuple(r for k, r in sorted(desired.items()) if current.get(k) != r)
    unregister = tuple(r for k, r in sorted(current.items()) if k not in desired)
    return RegistrationPlan(register, unregister)


class DesiredRegistrations:
    """The registrations the connected targets call for, kept per connection, so that a
    change costs what it touches rather than a pass over every target.

    After any sequence of :meth:`update` calls, :attr:`desired` equals
    ``registrations(<every connection last updated, not removed>)``: one registration per
    (target, stream), and when two connections would register the same (stream, addresses)
    the one with the lowest connection id does.
    """

    def __init__(self) -> None:
        self.desired: dict[RegistrationKey, Registration] = {}
        self._mine: dict[str, dict[RegistrationKey, Registration]] = {}
        self._holders: dict[RegistrationKey, set[str]] = {}

    def update(self, connection_id: str, conn: TargetConnection | None) -> set[RegistrationKey]:
        """Set one connection (None: it is gone); the keys whose registration may change."""
        affected: set[RegistrationKey] = set()
        for key in self._mine.pop(connection_id, {}):
            holders = self._holders[key]
            holders.discard(connection_id)
            if not holders:
                del self._holders[key]
            affected.add(key)
        mine = registrations([conn]) if conn is not None else {}
        if mine:
            self._mine[connection_id] = mine
            for key in mine:
                self._holders.setdefault(key, set()).add(connection_id)
                affected.add(key)
        for key in affected:
            holding = self._holders.get(key)
            if holding:
                self.desired[key] = self._mine[min(holding)][key]
            else:
                self.desired.pop(key, None)
        return affected

    def connections(self) -> set[str]:
        """The ids of the connections that call for a registration."""
        return set(self._mine)


K = TypeVar("K")


class Schedule(Generic[K]):
    """When each key is next due (a keepalive): the earliest ones first, in O(log n) a key."""

    def __init__(self) -> None:
        self._when: dict[K, tuple[float, int]] = {}  # key -> (time, its entry's number)
        self._heap: list[tuple[float, int, K]] = []
        self._count = 0  # numbers entries: ties in time go first set, first due, and an
        # entry replaced by a later set of its key is recognised as stale

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: object) -> bool:
        return key in self._when

    def get(self, key: K) -> float | None:
        entry = self._when.get(key)
        return entry[0] if entry is not None else None

    def set(self, key: K, when: float) -> None:
        self._count += 1
        self._when[key] = (when, self._count)
        heapq.heappush(self._heap, (when, self._count, key))
        if len(self._heap) > 4 * len(self._when) + 64:  # mostly stale entries: rebuild
            self._heap = [(w, n, k) for k, (w, n) in self._when.items()]
            heapq.heapify(self._heap)

    def discard(self, key: K) -> None:
        self._when.pop(key, None)

    def next(self) -> float:
        """When the earliest key is due (inf: none)."""
        heap = self._heap
        while heap:
            when, number, key = heap[0]
            if self._when.get(key) == (when, number):
                return when
            heapq.heappop(heap)
        return math.inf

    def due(self, horizon: float, limit: int) -> list[K]:
        """Take (remove) the keys due by ``horizon``, earliest first, at most ``limit``."""
        out: list[K] = []
        while len(out) < limit:
            when = self.next()
            if when == math.inf or when > horizon:
                break
            _, _, key = heapq.heappop(self._heap)
            del self._when[key]
            out.append(key)
        return out


def delimited(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (``number`` below 16: its key is one byte)."""
    return bytes((number << 3 | 2,)) + encode_varint(len(data)) + data


def child_bytes(name: str, subnet_only: bytes) -> bytes:
    """An IPAM ``Child`` message as bytes, from its ``name`` and the bytes of a ``Child`` that
    has only its subnet (serialized once per family): the same bytes betterproto makes, which
    spends most of an allocation's encoding on the nested subnet, conduit and trench."""
    return delimited(1, name.encode()) + subnet_only if name else subnet_only


def target_bytes(
    ips: Iterable[str], context: Mapping[str, str], status: int, stream: bytes, type_: int = 0
) -> bytes:
    """An NSP ``Target`` message as bytes, with the bytes of its ``Stream`` made once: the
    bytes betterproto makes (fields in order, zero values left out) in a hundredth of the
    time (a proxy that starts with a thousand targets serializes two thousand of them)."""
    out = [delimited(1, ip.encode()) for ip in ips]
    for key, value in context.items():
        entry = (delimited(1, key.encode()) if key else b"") + (
            delimited(2, value.encode()) if value else b""
        )
        if entry:
            out.append(delimited(2, entry))
    if status:
        out.append(bytes((3 << 3,)) + encode_varint(status))
    if type_:
        out.append(bytes((4 << 3,)) + encode_varint(type_))
    if stream:
        out.append(delimited(5, stream))
    return b"".join(out)


def _fields(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, Any]]:
    """(number, value) of each field of a message: an int (varint), the bytes of a
    length-delimited value, or a 1-tuple of the bytes of a fixed-size one; ValueError when the
    data is not well formed (groups refused)."""
    end = len(data) if end is None else end
    i = start
    while i < end:
        key, i = read_varint(data, i, end)
        number, wire = key >> 3, key & 7
        # as the strict decoder (meridio.core.wire): a tag fits in 32 bits, a field number is
        # within 1..2**29-1
        if key >= 1 << 32:
            raise ValueError("a tag does not fit in 32 bits")
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, i = read_varint(data, i, end)
            yield number, value
        elif wire == 2:
            length, i = read_varint(data, i, end)
            if i + length > end:
                raise ValueError("a length-delimited value runs past its message")
            yield number, data[i : i + length]
            i += length
        elif wire in (1, 5):
            begin, i = i, i + (8 if wire == 1 else 4)
            if i > end:
                raise ValueError("a fixed-size value runs past its message")
            # neither an int nor bytes: a field that must be one of those refuses it
            yield number, (data[begin:i],)
        else:
            raise ValueError(f"wire type {wire}")


def update_results(data: bytes) -> list[tuple[int, str]]:
    """(status, message) of each result of a ``meridio.nsp.v1.UpdateResponse``, strictly
    decoded (ValueError otherwise): a thousand results in a millisecond, where the generic
    decoder takes tens of them."""
    out: list[tuple[int, str]] = []
    for number, value in _fields(data):
        if number != 1:
            continue
        if not isinstance(value, bytes):
            raise ValueError("results is not length-delimited")
        status, message = 0, ""
        for n, v in _fields(value):
            if n == 1:
                if not isinstance(v, int) or v > 0xFFFFFFFF:
                    raise ValueError("status is not a uint32")
                status = v
            elif n == 2:
                if not isinstance(v, bytes):
                    raise ValueError("message is not length-delimited")
                message = v.decode()
        out.append((status, message))
    return out


def allocations(data: bytes) -> list[tuple[str, int, int, str]]:
    """(address, prefix length, status, message) of each allocation of a
    ``meridio.ipam.v1.AllocateResponse``, strictly decoded (ValueError otherwise)."""
    out: list[tuple[str, int, int, str]] = []
    for number, value in _fields(data):
        if number != 1:
            continue
        if not isinstance(value, bytes):
            raise ValueError("allocations is not length-delimited")
        address, length, status, message = "", 0, 0, ""
        for n, v in _fields(value):
            if n == 1:
                if not isinstance(v, bytes):
                    raise ValueError("prefix is not length-delimited")
                for pn, pv in _fields(v):
                    if pn == 1:
                        if not isinstance(pv, bytes):
                            raise ValueError("address is not length-delimited")
                        address = pv.decode()
                    elif pn == 2:
                        if not isinstance(pv, int):
                            raise ValueError("prefixLength is not a varint")
                        length = pv - (1 << 64) if pv >= 1 << 63 else pv
                        if not -(1 << 31) <= length < 1 << 31:
                            raise ValueError("prefixLength is not an int32")
            elif n == 2:
                if not isinstance(v, int) or v > 0xFFFFFFFF:
                    raise ValueError("status is not a uint32")
                status = v
            elif n == 3:
                if not isinstance(v, bytes):
                    raise ValueError("message is not length-delimited")
                message = v.decode()
        out.append((address, length, status, message))
    return out
