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

The probe (``traffic probe``, a new connection every 1/rate s) has its schedule, error kinds
and report (with the failure window) at the end of this module.
"""

from __future__ import annotations

import errno
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
    """Check that ``obj`` looks like a client (or probe) report; ``ValueError`` names the first
    problem."""
    if not isinstance(obj, dict):
        raise ValueError("not a traffic report: the top level is not an object")
    if obj.get("kind") == PROBE_REPORT_KIND:
        return validate_probe_report(obj)
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


# ----------------------------------------------------------------------------------- probe
#
# ``traffic probe`` measures how long *new* connections fail (a load balancer's failover: the
# time it takes to notice a dead target): it opens a fresh connection every 1/rate seconds, each
# of which sends one request, reads the reply that names the server, and closes. Attempt i is
# due at i/rate whatever the earlier ones are doing; one that would start more than
# PACING_SLACK late is skipped (counted, never sent in a burst).

PROBE_REPORT_KIND = "probe"
PROBE_ERROR_KINDS = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "reset",
    errno.ECONNABORTED: "reset",
    errno.EPIPE: "reset",
    errno.ETIMEDOUT: "timeout",
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTUNREACH: "unreachable",
    errno.EHOSTDOWN: "unreachable",
    errno.ENETDOWN: "unreachable",
    # connect(2) found no free local port (TIME_WAIT from earlier attempts, a small port range).
    errno.EADDRNOTAVAIL: "local-port",
    errno.EADDRINUSE: "local-port",
    errno.EMFILE: "resources",
    errno.ENFILE: "resources",
    errno.ENOBUFS: "resources",
    errno.ENOMEM: "resources",
    # A local firewall rejected the packet (or the ICMP error said "administratively prohibited").
    errno.EPERM: "denied",
    errno.EACCES: "denied",
}


def classify_errno(number: int) -> str:
    """A short failure kind for an errno: ``refused``, ``reset``, ``unreachable``, ...

    Errnos without a kind of their own are named by their symbol in lower case (``eproto``).
    """
    if number in PROBE_ERROR_KINDS:
        return PROBE_ERROR_KINDS[number]
    return errno.errorcode.get(number, f"errno-{number}").lower()


def classify_error(exc: BaseException) -> str:
    """The failure kind of an exception from a probe attempt (see :func:`classify_errno`).

    A wrapper without an errno (trio's ``BrokenResourceError``) is classified by the ``OSError``
    it was raised from. Timeouts of the caller's own (trio's ``TooSlowError``) are the caller's to
    name ``timeout``.
    """
    if isinstance(exc, socket.gaierror):
        return "resolve"
    if isinstance(exc, OSError) and exc.errno is not None:
        return classify_errno(exc.errno)
    if isinstance(exc, TimeoutError):
        return "timeout"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        return classify_error(cause)
    return "error"


@dataclass(frozen=True)
class ProbeSchedule:
    """When a probe's attempts are due: attempt ``i`` at ``i / rate`` seconds, for ``i < count``.

    An attempt is *late* once the time is more than ``slack`` past its due time; the prober
    skips late attempts (:meth:`first_on_time`) instead of starting them in a burst.
    """

    rate: float
    duration: float
    slack: float = PACING_SLACK

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.duration > 0 and math.isfinite(self.rate * self.duration)):
            raise ValueError("rate and duration must be positive")

    @property
    def count(self) -> int:
        """Attempts due within the duration (``i / rate < duration``)."""
        n = max(0, math.ceil(self.rate * self.duration))
        while n > 0 and self.due(n - 1) >= self.duration:
            n -= 1
        while self.due(n) < self.duration:
            n += 1
        return n

    def due(self, index: int) -> float:
        return index / self.rate

    def late(self, index: int, now: float) -> bool:
        return now - self.due(index) > self.slack

    def first_on_time(self, index: int, now: float) -> int:
        """The first attempt from ``index`` on that is not late at ``now`` (at most ``count``)."""
        if not self.late(index, now):
            return index
        first = max(index + 1, math.ceil((now - self.slack) * self.rate))
        while first > index + 1 and not self.late(first - 1, now):
            first -= 1
        while self.late(first, now):
            first += 1
        return min(first, self.count)

    def second(self, index: int) -> int:
        """The second of the run (0, 1, ...) in which attempt ``index`` is due."""
        return math.floor(self.due(index))

    def per_second(self, start: int, stop: int) -> dict[int, int]:
        """How many of the attempts ``start <= i < stop`` are due in each second."""
        counts: dict[int, int] = {}
        i = start
        while i < stop:
            sec = self.second(i)
            # The first attempt of the next second, found without walking every index.
            nxt = max(i + 1, math.ceil((sec + 1) * self.rate))
            while nxt > i + 1 and self.second(nxt - 1) > sec:
                nxt -= 1
            while nxt < stop and self.second(nxt) == sec:
                nxt += 1
            nxt = min(nxt, stop)
            counts[sec] = counts.get(sec, 0) + nxt - i
            i = nxt
        return counts


@dataclass(frozen=True)
class ProbeSettings:
    addresses: tuple[HostPort, ...]
    udp: bool = False
    rate: float = 100.0
    duration: float = 10.0
    connect_timeout: float = 1.0

    @property
    def protocol(self) -> str:
        return "udp" if self.udp else "tcp"

    @property
    def schedule(self) -> ProbeSchedule:
        return ProbeSchedule(self.rate, self.duration)

    def address(self, index: int) -> HostPort:
        """Attempts take the addresses round-robin."""
        return self.addresses[index % len(self.addresses)]


@dataclass
class ProbeAttempt:
    """One new connection of a probe: ``started`` and ``ended`` are seconds since the start.

    Neither :meth:`succeed` nor :meth:`fail` called: aborted (the run was stopped meanwhile).
    """

    index: int
    address: str
    started: float
    ended: float | None = None
    host: str | None = None
    error: str | None = None

    def succeed(self, now: float, host: str) -> None:
        self.ended, self.host = now, host

    def fail(self, now: float, error: str) -> None:
        self.ended, self.error = now, error

    @property
    def ok(self) -> bool:
        return self.ended is not None and self.error is None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class ProbeCounts:
    attempts: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    in_flight: int = 0


def probe_progress_line(elapsed: float, duration: float, counts: ProbeCounts) -> str:
    return (
        f"new connections ok/failed/skipped: {counts.ok}/{counts.failed}/{counts.skipped}  "
        f"in flight: {counts.in_flight}  {elapsed:5.1f}/{duration:g}s"
    )


def failure_end(attempt: ProbeAttempt, timeout: float) -> float:
    """When a failed attempt stopped counting: its end, at most its start plus the timeout."""
    ended = attempt.ended if attempt.ended is not None else attempt.started + timeout
    return min(ended, attempt.started + timeout)


def failure_periods(
    attempts: Iterable[ProbeAttempt], timeout: float
) -> list[tuple[float, float, int]]:
    """Runs of failed attempts with no successful one started between them.

    Each is ``(start of its first attempt, latest end of its attempts, attempts)``.
    """
    periods: list[tuple[float, float, int]] = []
    current: tuple[float, float, int] | None = None
    for attempt in sorted(attempts, key=lambda a: (a.started, a.index)):
        if attempt.ok:
            if current is not None:
                periods.append(current)
                current = None
        elif attempt.failed:
            end = failure_end(attempt, timeout)
            if current is None:
                current = (attempt.started, end, 1)
            else:
                current = (current[0], max(current[1], end), current[2] + 1)
    if current is not None:
        periods.append(current)
    return periods


def build_probe_report(
    settings: ProbeSettings,
    attempts: Sequence[ProbeAttempt],
    skipped: Iterable[tuple[int, int]] = (),
    *,
    started: str,
    elapsed: float,
    stopped_by: str | None = None,
) -> dict[str, Any]:
    """The probe's report (the JSON of ``probe -o json``).

    ``skipped`` holds the index ranges ``(start, stop)`` of the attempts skipped for being late.
    The failure window runs from the start of the first failed attempt to the end of the last
    one to end (an attempt that timed out ends at its start plus the timeout); it is 0 when
    nothing failed. Samples count attempts by the second they were due in.
    """
    schedule = settings.schedule
    timeout = settings.connect_timeout
    ok = [a for a in attempts if a.ok]
    failed = sorted((a for a in attempts if a.failed), key=lambda a: (a.started, a.index))
    skipped_per_second: Counter[int] = Counter()
    for start, stop in skipped:
        skipped_per_second.update(schedule.per_second(start, stop))
    seconds = max(
        [schedule.second(schedule.count - 1) + 1 if schedule.count else 0]
        + [schedule.second(a.index) + 1 for a in attempts]
        + [s + 1 for s in skipped_per_second]
    )
    ok_per_second = Counter(schedule.second(a.index) for a in ok)
    failed_per_second = Counter(schedule.second(a.index) for a in failed)
    window = 0.0
    if failed:
        window = max(failure_end(a, timeout) for a in failed) - failed[0].started
    return {
        "kind": PROBE_REPORT_KIND,
        "version": REPORT_VERSION,
        "started": started,
        "elapsed": round(elapsed, 3),
        "protocol": settings.protocol,
        "addresses": [str(a) for a in settings.addresses],
        "rate": settings.rate,
        "duration": settings.duration,
        "connect_timeout": timeout,
        "stopped_by": stopped_by,
        "attempts": len(ok) + len(failed),
        "ok": len(ok),
        "failed": len(failed),
        "skipped": sum(skipped_per_second.values()),
        "aborted": sum(1 for a in attempts if a.ended is None),
        "hosts": _count(a.host or NO_REPLY for a in ok),
        "errors": _count(a.error or "" for a in failed),
        "failures": [
            {"t": _round(a.started), "address": a.address, "error": a.error} for a in failed
        ],
        "first_failure": _round(failed[0].started) if failed else None,
        "last_failure": _round(failed[-1].started) if failed else None,
        "failure_window": round(window, 4),
        "failure_periods": [
            {"start": _round(start), "end": _round(end), "failed": n}
            for start, end, n in failure_periods(attempts, timeout)
        ],
        "samples": [
            {
                "t": sec,
                "ok": ok_per_second[sec],
                "failed": failed_per_second[sec],
                "skipped": skipped_per_second[sec],
            }
            for sec in range(seconds)
        ],
    }


PROBE_REQUIRED_COUNTS = ("attempts", "ok", "failed", "skipped")


def validate_probe_report(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Check that ``obj`` looks like a probe report; ``ValueError`` names the first problem."""
    hosts = obj.get("hosts")
    if not isinstance(hosts, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in hosts.items()
    ):
        raise ValueError("not a probe report: 'hosts' must map host names to counts")
    for key in PROBE_REQUIRED_COUNTS:
        value = obj.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"not a probe report: {key!r} must be an integer")
    window = obj.get("failure_window")
    if not isinstance(window, (int, float)) or isinstance(window, bool):
        raise ValueError("not a probe report: 'failure_window' must be a number")
    for key in ("failures", "samples"):
        if not isinstance(obj.get(key, []), list):
            raise ValueError(f"not a probe report: {key!r} must be a list")
    return dict(obj)
