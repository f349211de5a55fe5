"""Lean rtnetlink dumps of rules and routes: the requests and the answers (pure, no I/O).

Reading back thousands of rules and routes is what the LB's resync does; pyroute2's generic
parser costs tens of microseconds per message, which at a thousand targets made a resync pass
take longer than the resync period. This module builds the dump requests and decodes only the
fields the roles compare (family, table, priority, fwmark, source; destination length, type and
next hops), straight from the bytes.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTM_NEWRULE = 32
RTM_GETRULE = 34
RTA_DST = 1
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_MULTIPATH = 9
RTA_TABLE = 15
FRA_SRC = 2
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15
RTN_UNICAST = 1
RTN_BLACKHOLE = 6

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")  # also fib_rule_hdr: same size and the fields we use
_RTATTR = struct.Struct("=HH")
_RTNEXTHOP = struct.Struct("=HBBi")
_U32 = struct.Struct("=I")


class NetlinkDumpError(OSError):
    """The kernel answered a dump with an error."""


@dataclass(frozen=True, slots=True)
class Rule:
    family: int
    priority: int
    table: int
    fwmark: int | None
    src: str | None
    """Source prefix as ``address/length``, or None."""


@dataclass(frozen=True, slots=True)
class Route:
    family: int
    table: int
    type: int
    dst: str | None
    """Destination as ``address/length``; None for a default route."""
    gateways: tuple[str, ...]
    """The next hop, or every next hop of a multipath route."""
    priority: int


def dump_request(kind: str, family: int, seq: int) -> bytes:
    """An ``RTM_GETRULE`` or ``RTM_GETROUTE`` dump request for one family."""
    msg_type = {"rule": RTM_GETRULE, "route": RTM_GETROUTE}[kind]
    body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


def messages(data: bytes, seq: int) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each message of ``seq`` in ``data``; NLMSG_DONE ends it with type
    NLMSG_DONE; an error message raises :class:`NetlinkDumpError`."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            raise ValueError("netlink message shorter than its header")
        payload = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if msg_seq != seq:
            continue
        if msg_type == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", payload)
            if code:
                raise NetlinkDumpError(-code, f"netlink dump failed: {_strerror(-code)}")
            continue
        yield msg_type, payload
        if msg_type == NLMSG_DONE:
            return


def _strerror(code: int) -> str:
    return os.strerror(code)


def _attrs(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw)


def parse_rule(payload: bytes) -> Rule:
    family, _dst_len, src_len, _tos, table, *_rest = _RTMSG.unpack_from(payload)
    priority = 0
    fwmark: int | None = None
    src: str | None = None
    for kind, value in _attrs(payload, _RTMSG.size):
        if kind == FRA_TABLE:
            (table,) = _U32.unpack_from(value)
        elif kind == FRA_PRIORITY:
            (priority,) = _U32.unpack_from(value)
        elif kind == FRA_FWMARK:
            (fwmark,) = _U32.unpack_from(value)
        elif kind == FRA_SRC:
            src = f"{_address(family, value)}/{src_len}"
    return Rule(family, priority, table, fwmark, src)


def parse_route(payload: bytes) -> Route:
    family, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(
        payload
    )
    dst: str | None = None
    gateways: list[str] = []
    priority = 0
    for kind, value in _attrs(payload, _RTMSG.size):
        if kind == RTA_TABLE:
            (table,) = _U32.unpack_from(value)
        elif kind == RTA_DST:
            dst = f"{_address(family, value)}/{dst_len}"
        elif kind == RTA_GATEWAY:
            gateways.append(_address(family, value))
        elif kind == RTA_PRIORITY:
            (priority,) = _U32.unpack_from(value)
        elif kind == RTA_MULTIPATH:
            offset = 0
            while offset + _RTNEXTHOP.size <= len(value):
                length, _nh_flags, _hops, _ifindex = _RTNEXTHOP.unpack_from(value, offset)
                if length < _RTNEXTHOP.size:
                    break
                nested = value[offset : offset + length]
                for nkind, nvalue in _attrs(nested, _RTNEXTHOP.size):
                    if nkind == RTA_GATEWAY:
                        gateways.append(_address(family, nvalue))
                offset += (length + 3) & ~3
    return Route(family, table, rtype, dst, tuple(gateways), priority)
