"""BIRD 2's control-socket answers, parsed (pure; checked against BIRD 2.0.12's own answers).

The control socket speaks lines: ``DDDD-text`` opens or continues a reply of code ``DDDD``,
`` text`` (a leading space) continues the line type before it, and ``DDDD text`` (a space after
the code) ends the reply. Codes 0xxx end a command well, 8xxx and 9xxx are errors (the text
says what). Everything here takes the raw lines and returns plain data; the socket itself is
in :mod:`meridio.lb.frontend`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

_CODED = re.compile(r"(\d{4})([- ])(.*)")
_ROUTES = re.compile(r"(\d+) imported, (?:(\d+) filtered, )?(\d+) exported")
# a protocol line of "show protocols": name, proto, table, state, since (date and time), info
_PROTOCOL = re.compile(
    r"(?P<name>\S+)\s+(?P<proto>\S+)\s+(?P<table>\S+)\s+(?P<state>\S+)\s+"
    r"(?P<since>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?|\S+)\s*(?P<info>.*)"
)
_BFD = re.compile(
    r"(?P<address>\S+)\s+(?P<interface>\S+)\s+(?P<state>\S+)\s+"
    r"(?P<since>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?|\S+)\s+(?P<interval>[\d.]+)\s+"
    r"(?P<timeout>[\d.]+)"
)


class BirdError(Exception):
    """BIRD answered a command with an error (8xxx, 9xxx); the message is BIRD's."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Reply:
    """One complete answer: the final code and every line as (code, text)."""

    code: int
    lines: tuple[tuple[int, str], ...]

    @property
    def ok(self) -> bool:
        return self.code < 8000

    @property
    def text(self) -> str:
        return "\n".join(text for _, text in self.lines)

    def check(self) -> Reply:
        if not self.ok:
            errors = "\n".join(text for code, text in self.lines if code >= 8000)
            raise BirdError(self.code, errors.strip() or f"BIRD error {self.code}")
        return self


def reply_end(buffer: bytes) -> int:
    """Offset just past the first complete reply in ``buffer``, or -1 when there is none yet."""
    start = 0
    while True:
        newline = buffer.find(b"\n", start)
        if newline < 0:
            return -1
        line = buffer[start:newline]
        if len(line) >= 5 and line[:4].isdigit() and line[4:5] == b" ":
            return newline + 1
        start = newline + 1


def parse_reply(data: bytes | str) -> Reply:
    """The lines of one reply (what :func:`reply_end` delimits)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    lines: list[tuple[int, str]] = []
    code = 0
    final = -1
    for raw in text.splitlines():
        match = _CODED.fullmatch(raw)
        if match:
            code = int(match.group(1))
            lines.append((code, match.group(3)))
            if match.group(2) == " ":
                final = code
        elif raw.startswith(" "):
            lines.append((code, raw[1:]))
        elif raw:
            lines.append((code, raw))
    if final < 0:
        raise ValueError("incomplete BIRD reply (no final line)")
    return Reply(final, tuple(lines))


def _since(text: str) -> datetime | None:
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


@dataclass
class Channel:
    family: str
    state: str = ""
    imported: int = 0
    exported: int = 0


@dataclass
class Protocol:
    """One protocol of ``show protocols all``."""

    name: str
    proto: str
    table: str
    state: str
    """BIRD's protocol state: ``up``, ``start``, ``down``, ``flush``..."""
    since: datetime | None
    info: str
    """The info column: BGP's state and its last error (``Active  Socket: Connection
    closed``), empty for most others."""
    bgp_state: str = ""
    neighbor: str = ""
    channels: dict[str, Channel] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return self.state == "up" and (self.proto != "BGP" or self.bgp_state == "Established")

    @property
    def last_error(self) -> str:
        """The info column past BGP's state (``Error: BFD session down``), or ""."""
        rest = self.info.partition(" ")[2]
        return rest.strip() if self.proto == "BGP" else self.info.strip()

    @property
    def imported(self) -> int:
        return sum(c.imported for c in self.channels.values())

    @property
    def exported(self) -> int:
        return sum(c.exported for c in self.channels.values())


def parse_protocols(reply: Reply) -> list[Protocol]:
    """The protocols of a ``show protocols [all]`` reply (header and details understood)."""
    protocols: list[Protocol] = []
    current: Protocol | None = None
    channel: Channel | None = None
    for code, text in reply.lines:
        if code == 2002:  # the header
            continue
        if code == 1002:  # one protocol's line
            match = _PROTOCOL.fullmatch(text.rstrip())
            if match is None:
                current = None
                continue
            current = Protocol(
                name=match["name"],
                proto=match["proto"],
                table=match["table"],
                state=match["state"],
                since=_since(match["since"]),
                info=match["info"].strip(),
            )
            if current.proto == "BGP":
                current.bgp_state = current.info.split(" ", 1)[0] if current.info else ""
            protocols.append(current)
            channel = None
        elif code == 1006 and current is not None:  # its details
            line = text.strip()
            key, _, value = line.partition(":")
            value = value.strip()
            if line.startswith("Channel "):
                channel = Channel(line.split()[1])
                current.channels[channel.family] = channel
            elif key == "BGP state":
                current.bgp_state = value
            elif key == "Neighbor address":
                current.neighbor = value.split("%", 1)[0]
            elif channel is not None and key == "State":
                channel.state = value
            elif channel is not None and key == "Routes":
                routes = _ROUTES.match(value)
                if routes:
                    channel.imported = int(routes.group(1))
                    channel.exported = int(routes.group(3))
    return protocols


@dataclass(frozen=True)
class BfdSession:
    address: str
    interface: str
    state: str
    """``Up``, ``Down``, ``Init`` or ``AdminDown``."""
    since: datetime | None
    interval: float
    timeout: float

    @property
    def up(self) -> bool:
        return self.state == "Up"


def parse_bfd_sessions(reply: Reply) -> list[BfdSession]:
    """The sessions of a ``show bfd sessions`` reply (every BFD protocol's)."""
    sessions = []
    for code, text in reply.lines:
        if code != 1020:
            continue
        match = _BFD.fullmatch(text.strip())
        if match:
            sessions.append(
                BfdSession(
                    address=match["address"],
                    interface=match["interface"],
                    state=match["state"],
                    since=_since(match["since"]),
                    interval=float(match["interval"]),
                    timeout=float(match["timeout"]),
                )
            )
    return sessions


def configure_result(reply: Reply) -> str:
    """What a ``configure`` reply means: ``reconfigured``, ``in-progress`` or ``queued``;
    :class:`BirdError` with BIRD's message (file, line, column) when it refused the file."""
    reply.check()
    return {3: "reconfigured", 4: "in-progress", 19: "queued"}.get(reply.code, "reconfigured")
