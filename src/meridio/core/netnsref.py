"""Which network namespace references a connect endpoint accepts, and from whom (pure).

A veth connection puts one end of a pair into the namespace the client names
(``Veth.netns_path``), with the endpoint's privileges. The endpoint therefore accepts only a
reference it can prove belongs to the caller:

* The reference must have one of two forms: ``/proc/<pid>/ns/net`` or ``/run/netns/<name>``
  (also ``/var/run/netns/<name>``). Anything else (``/proc/self/ns/net``, which would be the
  endpoint's own, another file, a path with ``..``) is refused before it is opened.
* **A unix socket** gives the caller's process (SO_PEERCRED): the reference must name the
  namespace that process is in (same device and inode as ``/proc/<peer pid>/ns/net``).
* **TCP** (mutual TLS or plain): a TCP peer's process cannot be read, but its connection can.
  The reference is accepted when the namespace it names holds the client's end of the very
  connection the request came on: an established TCP socket whose local end is the peer's
  address and port as the endpoint sees them and whose remote end is the endpoint's. Only a
  process inside that namespace can have made that socket. (A NAT between the two, which
  changes the addresses, defeats the proof: then use the allow-list.)
* **The allow-list** (setting ``connect-netns-allow``): ``/run/netns/<name>`` references whose
  name is listed are accepted from any caller the authorization table admits.

Everything else is PERMISSION_DENIED with a message that says which rule was not met.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

_PID = re.compile(r"/proc/([1-9][0-9]{0,9})/ns/net")
_NAMED = re.compile(r"(?:/var)?/run/netns/([A-Za-z0-9_.-]{1,255})")
TCP_ESTABLISHED = 1

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(Exception):
    """The reference is not accepted from this caller; the message says why."""


@dataclass(frozen=True)
class NetnsRef:
    path: str
    pid: int | None = None
    """``/proc/<pid>/ns/net``: the process."""
    name: str | None = None
    """``/run/netns/<name>``: the name."""


def parse_reference(path: str) -> NetnsRef:
    """The reference ``path`` as one of the accepted forms, or Refused."""
    m = _PID.fullmatch(path)
    if m is not None:
        return NetnsRef(path, pid=int(m.group(1)))
    m = _NAMED.fullmatch(path)
    if m is not None and m.group(1) not in (".", ".."):
        return NetnsRef(path, name=m.group(1))
    raise Refused(
        f"netns {path!r} is not a reference this endpoint accepts "
        "(/proc/<pid>/ns/net of a process in the caller's namespace, or /run/netns/<name>)"
    )


def parse_allow_list(text: str) -> frozenset[str]:
    """The ``connect-netns-allow`` setting: comma-separated names under /run/netns (or their
    whole paths); ValueError naming the item."""
    out = set()
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name = item
        if "/" in item:
            m = _NAMED.fullmatch(item)
            if m is None:
                raise ValueError(
                    f"connect-netns-allow item {item!r} must be a name under /run/netns"
                )
            name = m.group(1)
        if name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.-]{1,255}", name):
            raise ValueError(f"connect-netns-allow item {item!r} is not a namespace name")
        out.add(name)
    return frozenset(out)


# --- the TCP tables of /proc/net/tcp and /proc/net/tcp6 -------------------------------------


@dataclass(frozen=True)
class TcpSocket:
    local: tuple[Address, int]
    remote: tuple[Address, int]
    state: int


def _address(text: str) -> Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in the host's (little-endian)
    byte order, as hex."""
    raw = bytes.fromhex(text)
    if len(raw) not in (4, 16):
        raise ValueError(f"address {text!r} is neither 4 nor 16 bytes")
    if sys.byteorder == "big":
        return ipaddress.ip_address(raw)
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(ordered)


def _end(text: str) -> tuple[Address, int]:
    address, _, port = text.partition(":")
    return _address(address), int(port, 16)


def parse_tcp_table(text: str) -> list[TcpSocket]:
    """The sockets of a /proc/net/tcp or /proc/net/tcp6 table (lines that do not parse are
    skipped: the header)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1]:
            continue
        try:
            out.append(TcpSocket(_end(fields[1]), _end(fields[2]), int(fields[3], 16)))
        except ValueError:
            continue
    return out


def normal(host: str | Address) -> Address:
    """An address with IPv4-mapped IPv6 (a dual-stack listener's view of IPv4) unmapped and
    any scope dropped."""
    address = ipaddress.ip_address(str(host).split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def socket_end(end: tuple[object, ...] | None) -> tuple[Address, int] | None:
    """A socket address tuple (``getpeername()``, ``getsockname()``) as an end, or None."""
    if not end or len(end) < 2 or not isinstance(end[1], int):
        return None
    try:
        return normal(str(end[0])), end[1]
    except ValueError:
        return None


def holds_connection(
    sockets: Iterable[TcpSocket], client: tuple[Address, int], server: tuple[Address, int]
) -> bool:
    """Whether one of ``sockets`` is the client's end of the connection between ``client``
    (the peer as the endpoint sees it) and ``server`` (the endpoint's end)."""
    for s in sockets:
        if s.state != TCP_ESTABLISHED:
            continue
        local = (normal(s.local[0]), s.local[1])
        remote = (normal(s.remote[0]), s.remote[1])
        if local == client and remote == server:
            return True
    return False


__all__ = [
    "NetnsRef",
    "Refused",
    "TcpSocket",
    "holds_connection",
    "normal",
    "parse_allow_list",
    "parse_reference",
    "parse_tcp_table",
    "socket_end",
]
