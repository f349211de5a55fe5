"""The pure core of ``meridioctl traffic``: wire format, pacing, per-connection accounting, report.

Nothing here does I/O or reads a clock: every function that needs the time is given ``now``
(seconds on any monotonic scale). The trio server and client (``server.py``, ``client.py``) are
thin drivers around it, and the unit tests exercise it directly.

Wire format (the idea is ctraffic's, see the module docstring of ``cli.py`` for the user view):

* The client sends packets of ``packet_size`` bytes (at least :data:`HEADER_SIZE`).
* The server echoes every byte back unchanged, except that the first reply bytes carry its name:
  on TCP the first ``len(name) + 1`` bytes of the connection's reply stream, on UDP the first
  bytes of *every* reply datagram, are overwritten with the name (UTF-8, at most 63 bytes)
  followed by a NUL. The reply never grows, so the UDP echo amplifies nothing.
* The client reads the name from the first :data:`HEADER_SIZE` bytes of the first reply (TCP) or
  of every reply (UDP, which also shows a flow moving to another target).

A connection's life is a small state machine (:class:`ConnectionRecord`):

    connecting --connected--> established --finish--> lasted
        |                          '------fail------> lost
        |--fail--> failed      (a failed connect)
        '--finish--> aborted   (the run ended while it was still connecting; counted nowhere)
"""

from __future__ import annotations

import ipaddress
import math
import socket
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

HEADER_SIZE = 64
MIN_PACKET_SIZE = HEADER_SIZE
# Fits a UDP datagram over IPv4 (65507) and IPv6 (65527).
MAX_PACKET_SIZE = 65000
DEFAULT_PORT = 5000
# Host key for connections that were established but never got a reply carrying a name.
NO_REPLY = "(no reply)"
REPORT_VERSION = 1

# Linux value; Python's socket module does not export it. Enables (setsockopt) and names (cmsg)
# the IPv4 packet-info ancillary data.
IP_PKTINFO = 8


# --------------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(
    text: str, default_port: int = DEFAULT_PORT, *, allow_zero: bool = False
) -> HostPort:
    """``203.0.113.1:5000``, ``[2001:db8::1]:5000``, ``[::]``, ``2001:db8::1``, ``host.name``.

    A bare IPv6 address (two or more colons, no brackets) has no port. Raises ``ValueError`` with
    a message that names the problem.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
    elif text.count(":") >= 2:
        host, port_text = text, None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: not an IPv6 address (write [ADDRESS]:PORT)") from None
    elif ":" in text:
        host, port_text = text.split(":", 1)
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"{text!r}: no host")
    if port_text is None:
        return HostPort(host, default_port)
    if not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} out of range")
    return HostPort(host, port)


def format_sockaddr(addr: object) -> str:
    """A socket address tuple (``(host, port)`` or ``(host, port, flow, scope)``) as text."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return format_hostport(str(addr[0]), int(addr[1]))
    return str(addr)


def is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# ------------------------------------------------------------------------------- wire format


def server_header(name: str) -> bytes:
    """The bytes a server writes over the start of its first reply: name (<= 63 bytes) + NUL."""
    raw = name.replace("\0", "").encode()[: HEADER_SIZE - 1]
    # Do not leave half a multi-byte character at the cut.
    raw = raw.decode(errors="ignore").encode()
    return raw + b"\0"


def stamp(chunk: bytes, offset: int, header: bytes) -> bytes:
    """``chunk``, found at ``offset`` of a reply stream, with the ``header`` bytes laid over it.

    Stamping the pieces of a stream one by one gives the same bytes as stamping the whole stream,
    however it is cut.
    """
    if offset >= len(header) or not chunk:
        return chunk
    part = header[offset : offset + len(chunk)]
    return part + chunk[len(part) :]


def parse_name(block: bytes) -> str:
    """The server name at the start of a reply (up to the first NUL, within the header size)."""
    head = block[:HEADER_SIZE]
    end = head.find(b"\0")
    if end >= 0:
        head = head[:end]
    return head.decode(errors="replace")


def reply_ancillary(ancdata: Iterable[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """From the packet info of a received UDP datagram, the packet info to send its reply with.

    A server bound to a wildcard address must answer from the address the request was sent to
    (a VIP on ``lo``, say); left to itself the kernel would pick the outgoing interface's
    address and the client's connected socket would drop the reply. Multicast destinations get
    no packet info (the kernel picks a unicast source).
    """
    out: list[tuple[int, int, bytes]] = []
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            _ifindex, spec_dst, _addr = struct.unpack("=i4s4s", data[:12])
            if ipaddress.IPv4Address(spec_dst).is_multicast:
                continue
            out.append((level, kind, struct.pack("=i4s4s", 0, spec_dst, bytes(4))))
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            addr, ifindex = struct.unpack("=16si", data[:20])
            ip = ipaddress.IPv6Address(addr)
            if ip.is_multicast:
                continue
            # A link-local source only means something on its own link.
            keep = ifindex if ip.is_link_local else 0
            out.append((level, kind, struct.pack("=16si", addr, keep)))
    return out


# ---------------------------------------------------------------------------------- pacing

# A packet sent at most this late is still sent (the sender catches up back to back); one due
# earlier than that is skipped and counted as dropped, as in ctraffic.
PACING_SLACK = 0.1


def connection_interval(rate: float, connections: int) -> float:
    """Seconds between two packets of one connection, for a total ``rate`` in packets/s."""
    if rate <= 0 or connections <= 0:
        raise ValueError("rate and connections must be positive")
    return connections / rate


def start_offset(index: int, connections: int, interval: float) -> float:
    """When connection ``index``'s paced packets start, after the one it sends on connecting.

    The offsets spread over ``(0, interval]`` so that the connections' packets interleave.
    """
    return interval * (index % connections + 1) / connections


@dataclass
class Pacer:
    """The send schedule of one connection: a packet every ``interval`` from ``due``.

    Call :meth:`take` once the time has reached :attr:`due`; it returns how many earlier
    scheduled packets were skipped (dropped) and moves :attr:`due` to the next packet.
    """

    interval: float
    due: float
    slack: float = PACING_SLACK
    dropped: int = 0

    def take(self, now: float) -> int:
        lag = now - self.due
        missed = 0
        if lag > self.slack:
            missed = math.floor(lag / self.interval)
        self.due += (missed + 1) * self.interval
        self.dropped += missed
        return missed


def backoff(attempt: int, base: float, cap: float = 1.0) -> float:
    """Delay before reconnect ``attempt`` (1, 2, ...): ``base`` doubling up to ``cap``."""
    if attempt < 1:
        return 0.0
    return float(min(cap, base * 2 ** min(attempt - 1, 30)))


# ----------------------------------------------------------------------- stall detection


@dataclass
class ReplyWatch:
    """Tells when a connection stopped answering.

    It is stalled once it has been waiting for a reply for longer than ``timeout`` and at least
    ``min_unanswered`` packets were sent since the last reply. TCP (reliable, ``still_waiting``
    known exactly) uses 1; UDP, where a single datagram may be lost without the flow being
    broken, uses several.
    """

    timeout: float
    min_unanswered: int = 1
    waiting_since: float | None = None
    unanswered: int = 0

    def on_send(self, now: float) -> None:
        if self.waiting_since is None:
            self.waiting_since = now
        self.unanswered += 1

    def on_reply(self, now: float, still_waiting: bool = False) -> None:
        self.unanswered = 0
        self.waiting_since = now if still_waiting else None
        if still_waiting:
            self.unanswered = 1

    def stalled(self, now: float) -> bool:
        return (
            self.waiting_since is not None
            and self.unanswered >= self.min_unanswered
            and now - self.waiting_since > self.timeout
        )


# ----------------------------------------------------------------------- connection records


class State(StrEnum):
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    LASTED = "lasted"
    LOST = "lost"
    FAILED = "failed"
    ABORTED = "aborted"


TERMINAL = frozenset({State.LASTED, State.LOST, State.FAILED, State.ABORTED})


class TransitionError(ValueError):
    pass


@dataclass
class ConnectionRecord:
    """One connection attempt of one client slot, from connect to its end.

    Times are seconds since the start of the run.
    """

    id: int
    attempt: int
    protocol: str
    remote: str
    started: float
    local: str | None = None
    host: str | None = None
    state: State = State.CONNECTING
    connected: float | None = None
    ended: float | None = None
    error: str | None = None
    sent: int = 0
    received: int = 0
    dropped: int = 0
    retransmits: int = 0
    host_changes: int = 0

    def _require(self, *states: State) -> None:
        if self.state not in states:
            raise TransitionError(f"connection {self.id}.{self.attempt} is {self.state.value}")

    def mark_connected(self, now: float, local: str | None = None) -> None:
        self._require(State.CONNECTING)
        self.state = State.ESTABLISHED
        self.connected = now
        if local is not None:
            self.local = local

    def see_host(self, name: str) -> None:
        """A reply named its server: the first names the connection, later different ones count."""
        if self.host is None:
            self.host = name
        elif name != self.host:
            self.host_changes += 1

    def fail(self, now: float, error: str) -> None:
        """It broke: a failed connect while connecting, a lost connection once established."""
        self._require(State.CONNECTING, State.ESTABLISHED)
        self.state = State.FAILED if self.state is State.CONNECTING else State.LOST
        self.ended = now
        self.error = error

    def finish(self, now: float) -> None:
        """The run ended with it still up (lasted), or still connecting (aborted)."""
        self._require(State.CONNECTING, State.ESTABLISHED)
        self.state = State.ABORTED if self.state is State.CONNECTING else State.LASTED
        self.ended = now

    @property
    def host_key(self) -> str:
        return self.host if self.host is not None else NO_REPLY

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "attempt": self.attempt,
            "protocol": self.protocol,
            "state": self.state.value,
            "host": self.host,
            "local": self.local,
            "remote": self.remote,
            "started": _round(self.started),
            "connected": _round(self.connected),
            "ended": _round(self.ended),
            "error": self.error,
            "sent": self.sent,
            "received": self.received,
            "dropped": self.dropped,
            "retransmits": self.retransmits,
            "host_changes": self.host_changes,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass(frozen=True)
class Totals:
    sent: int = 0
    received: int = 0
    dropped: int = 0
    active: int = 0
    connecting: int = 0
    failed_connects: int = 0
    lost_connections: int = 0

    @classmethod
    def of(cls, records: Iterable[ConnectionRecord]) -> Totals:
        sent = received = dropped = 0
        states: Counter[State] = Counter()
        for record in records:
            sent += record.sent
            received += record.received
            dropped += record.dropped
            states[record.state] += 1
        return cls(
            sent=sent,
            received=received,
            dropped=dropped,
            active=states[State.ESTABLISHED],
            connecting=states[State.CONNECTING],
            failed_connects=states[State.FAILED],
            lost_connections=states[State.LOST],
        )


@dataclass
class Sampler:
    """Per-interval samples: packets sent, received and dropped in the interval (not totals)."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    _last: Totals = field(default_factory=Totals)

    def sample(self, time: float, totals: Totals) -> dict[str, Any]:
        entry = {
            "time": round(time, 3),
            "sent": totals.sent - self._last.sent,
            "received": totals.received - self._last.received,
            "dropped": totals.dropped - self._last.dropped,
            "active": totals.active,
            "connecting": totals.connecting,
            "failed_connects": totals.failed_connects,
            "lost_connections": totals.lost_connections,
        }
        self._last = totals
        self.samples.append(entry)
        return entry


def progress_line(elapsed: float, duration: float, totals: Totals) -> str:
    """The live status line (ctraffic's monitor line, plus lost connections and the clock)."""
    return (
        f"conn active/failed/connecting: {totals.active}/{totals.failed_connects}/"
        f"{totals.connecting}  lost: {totals.lost_connections}  "
        f"packets sent/received/dropped: {totals.sent}/{totals.received}/{totals.dropped}  "
        f"{elapsed:5.1f}/{duration:g}s"
    )


# ---------------------------------------------------------------------------------- report


def _count(keys: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(keys).items()))


def build_report(
    settings: Mapping[str, Any],
    records: Sequence[ConnectionRecord],
    samples: Sequence[Mapping[str, Any]],
    *,
    started: str,
    elapsed: float,
) -> dict[str, Any]:
    """The client's report (the JSON of ``-o json``) from the connection records."""
    established = [r for r in records if r.connected is not None]
    lost = [r for r in records if r.state is State.LOST]
    totals = Totals.of(records)
    return {
        "version": REPORT_VERSION,
        "started": started,
        "elapsed": round(elapsed, 3),
        "settings": dict(settings),
        "hosts": _count(r.host_key for r in established),
        "lost_per_host": _count(r.host_key for r in lost),
        "lost_connections": len(lost),
        "failed_connects": totals.failed_connects,
        "aborted_connects": sum(1 for r in records if r.state is State.ABORTED),
        "sent": totals.sent,
        "received": totals.received,
        "dropped": totals.dropped,
        "retransmits": sum(r.retransmits for r in records),
        "host_changes": sum(r.host_changes for r in records),
        "connections": [r.to_json() for r in records],
        "samples": [dict(s) for s in samples],
    }


REQUIRED_COUNTS = ("lost_connections", "failed_connects", "sent", "received", "dropped")


def validate_report(obj: object) -> dict[str, Any]:
    """Check that ``obj`` looks like a client report; ``ValueError`` names the first problem."""
    if not isinstance(obj, dict):
        raise ValueError("not a traffic report: the top level is not an object")
    for key in ("hosts", "lost_per_host"):
        value = obj.get(key, {} if key == "lost_per_host" else None)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in value.items()
        ):
            raise ValueError(f"not a traffic report: {key!r} must map host names to counts")
    for key in REQUIRED_COUNTS:
        value = obj.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"not a traffic report: {key!r} must be an integer")
    for key in ("connections", "samples"):
        if not isinstance(obj.get(key, []), list):
            raise ValueError(f"not a traffic report: {key!r} must be a list")
    return obj


@dataclass(frozen=True)
class HostRow:
    host: str
    connections: int
    lasting: int
    lost: int
    share: float  # of all connections served, 0..1


def host_rows(report: Mapping[str, Any]) -> list[HostRow]:
    """Per-host lines of a report: connections served, how many lasted and how many were lost."""
    hosts: Mapping[str, int] = report["hosts"]
    lost: Mapping[str, int] = report.get("lost_per_host", {})
    total = sum(hosts.values())
    rows = []
    for host in sorted(set(hosts) | set(lost)):
        served = hosts.get(host, 0)
        gone = lost.get(host, 0)
        rows.append(
            HostRow(
                host=host,
                connections=served,
                lasting=max(0, served - gone),
                lost=gone,
                share=served / total if total else 0.0,
            )
        )
    return rows
