"""Who may call what: SPIFFE IDs, the roles they name, and the one authorization table.

Pure: no I/O, no clock of its own. The gRPC runtime (``meridio.runtime.tls``) asks
:func:`decide` for every call that arrives over TLS and :func:`check_message` for the requests
whose content matters, and refuses what they refuse with PERMISSION_DENIED.

Identities are SPIFFE IDs (``spiffe://<trust-domain>/<path>``) from the certificate's URI SAN.
The role is read from the path: ``/meridio/<role>[/<name>...]`` (what ``meridioctl pki issue``
writes, and what a SPIRE registration entry can say), or from extra patterns given in the
``tls-roles`` setting (``/ns/*/sa/meridio-nsp=nsp``: one ``*`` matches one whole segment) for
identities whose path a tool fixes, such as cert-manager's ``/ns/<namespace>/sa/<account>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES: tuple[str, ...] = ("nsp", "ipam", "lb", "proxy", "target")
ADMIN = "admin"
"""The identity of ``meridioctl`` (and of people): inspection, listings and health."""
IDENTITIES: tuple[str, ...] = (*ROLES, ADMIN)

MAX_SPIFFE_ID = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class InvalidSpiffeId(ValueError):
    """Text that is not a SPIFFE ID; the message says why."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str
    """Empty, or ``/``-separated segments starting with ``/`` (no trailing ``/``)."""

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse and validate ``text`` as the SPIFFE standard defines a SPIFFE ID."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID:
        raise InvalidSpiffeId(f"longer than {MAX_SPIFFE_ID} bytes")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme != "spiffe":
        raise InvalidSpiffeId(f"{text!r} does not start with spiffe://")
    domain, slash, path = rest.partition("/")
    if not domain:
        raise InvalidSpiffeId(f"{text!r} has no trust domain")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise InvalidSpiffeId(
            f"trust domain {domain!r} of {text!r} may hold only lowercase letters, digits, "
            "'.', '-' and '_' (no port, user or upper case)"
        )
    path = slash + path
    if path:
        for segment in path.split("/")[1:]:
            if not segment:
                raise InvalidSpiffeId(f"{text!r} has an empty path segment or a trailing '/'")
            if segment in (".", ".."):
                raise InvalidSpiffeId(f"{text!r} has a '.' or '..' path segment")
            if not _SEGMENT.fullmatch(segment):
                raise InvalidSpiffeId(
                    f"path segment {segment!r} of {text!r} may hold only letters, digits, "
                    "'.', '-' and '_'"
                )
    return SpiffeId(domain, path)


def check_trust_domain(text: str) -> str:
    """``text`` if it is a valid trust domain name, else InvalidSpiffeId."""
    if not text or not _TRUST_DOMAIN.fullmatch(text):
        raise InvalidSpiffeId(
            f"trust domain {text!r} must be lowercase letters, digits, '.', '-' and '_'"
        )
    return text


def check_name(text: str) -> str:
    """``text`` if it can be one path segment of a SPIFFE ID (a role instance's name)."""
    if text in (".", "..") or not _SEGMENT.fullmatch(text):
        raise InvalidSpiffeId(f"name {text!r} must be letters, digits, '.', '-' and '_'")
    return text


def role_id(trust_domain: str, role: str, name: str) -> SpiffeId:
    """The SPIFFE ID ``meridioctl pki issue ROLE NAME`` gives: ``/meridio/<role>/<name>``."""
    if role not in IDENTITIES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(IDENTITIES)}")
    return SpiffeId(check_trust_domain(trust_domain), f"/meridio/{role}/{check_name(name)}")


# --- SPIFFE ID -> role -----------------------------------------------------------------------


@dataclass(frozen=True)
class RolePattern:
    segments: tuple[str, ...]
    """Path segments; ``*`` matches any one segment."""
    role: str

    def matches(self, segments: Sequence[str]) -> bool:
        return len(segments) == len(self.segments) and all(
            p in ("*", s) for p, s in zip(self.segments, segments, strict=True)
        )


def parse_role_patterns(text: str) -> tuple[RolePattern, ...]:
    """``PATH=ROLE[,PATH=ROLE...]`` (the ``tls-roles`` setting); ValueError naming the item."""
    out = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        path, eq, role = (p.strip() for p in item.partition("="))
        if not eq or role not in IDENTITIES:
            roles = ", ".join(IDENTITIES)
            raise ValueError(f"tls-roles item {item!r} must be PATH=ROLE with ROLE one of {roles}")
        if not path.startswith("/") or path == "/":
            raise ValueError(f"tls-roles item {item!r}: the path must start with '/'")
        segments = tuple(path.split("/")[1:])
        for segment in segments:
            if segment != "*" and (segment in (".", "..") or not _SEGMENT.fullmatch(segment)):
                raise ValueError(f"tls-roles item {item!r}: bad path segment {segment!r}")
        out.append(RolePattern(segments, role))
    return tuple(out)


@dataclass(frozen=True)
class Identity:
    """A peer as its certificate names it (or a local peer on a unix socket)."""

    spiffe_id: SpiffeId | None
    role: str | None
    """The role it may act as; None: authenticated but no role (refused everything)."""
    problem: str = ""
    """Why it has no role."""

    def __str__(self) -> str:
        return str(self.spiffe_id) if self.spiffe_id else "(no SPIFFE ID)"


def identify(
    uris: Iterable[str], trust_domain: str, patterns: Sequence[RolePattern] = ()
) -> Identity:
    """The identity of a peer whose (verified) certificate has these URI SANs.

    An X509-SVID has exactly one URI SAN, a SPIFFE ID; its trust domain must be ours.
    """
    spiffe = [u for u in uris if u.startswith("spiffe:")]
    if len(spiffe) != 1:
        problem = "no SPIFFE ID in the URI SAN" if not spiffe else "more than one SPIFFE ID"
        return Identity(None, None, problem)
    try:
        sid = parse_spiffe_id(spiffe[0])
    except InvalidSpiffeId as exc:
        return Identity(None, None, f"invalid SPIFFE ID: {exc}")
    if sid.trust_domain != trust_domain:
        return Identity(sid, None, f"trust domain {sid.trust_domain!r} is not {trust_domain!r}")
    return Identity(sid, role_of(sid, patterns), "")


def role_of(sid: SpiffeId, patterns: Sequence[RolePattern] = ()) -> str | None:
    """The role ``sid``'s path names: ``/meridio/<role>[/...]`` or a matching pattern."""
    segments = sid.segments
    if len(segments) >= 2 and segments[0] == "meridio" and segments[1] in IDENTITIES:
        return segments[1]
    for pattern in patterns:
        if pattern.matches(segments):
            return pattern.role
    return None


# --- the table -------------------------------------------------------------------------------

ANY_ROLE = frozenset(IDENTITIES)


@dataclass(frozen=True)
class Rule:
    service: str
    methods: tuple[str, ...]
    served_by: frozenset[str]
    callers: frozenset[str]
    """Who may call over TLS; empty: only local clients, on the unix socket."""
    note: str = ""


@dataclass(frozen=True)
class MessageRule:
    """A request field whose value the caller's role restricts (per method)."""

    method: str
    attribute: str
    allowed: Mapping[str, frozenset[int]]
    """role -> the values it may send; a role not listed may send any."""
    names: Mapping[int, str] = field(default_factory=dict)
    each: str = ""
    """A batch: the repeated field whose every element carries ``attribute``, or its
    sub-message that does (``updates.target``)."""


TARGET_DEFAULT, TARGET_FRONTEND = 0, 1  # nsp.v1.TargetType

TABLE: tuple[Rule, ...] = (
    Rule(
        "grpc.health.v1.Health",
        ("Check", "Watch"),
        frozenset(ROLES),
        ANY_ROLE,
        "health-listen (with health-plaintext: anyone, for the kubelet)",
    ),
    Rule(
        "nsp.v1.ConfigurationManager",
        (
            "WatchTrench",
            "WatchConduit",
            "WatchStream",
            "WatchFlow",
            "WatchVip",
            "WatchAttractor",
            "WatchGateway",
        ),
        frozenset({"nsp"}),
        ANY_ROLE,
        "any role may watch the configuration",
    ),
    Rule(
        "nsp.v1.TargetRegistry",
        ("Register", "Unregister"),
        frozenset({"nsp"}),
        frozenset({"proxy", "target", "lb"}),
        "targets in a stream (type DEFAULT) only by proxy or target; frontends (type FRONTEND) "
        "only by lb",
    ),
    Rule(
        "meridio.nsp.v1.TargetRegistryBatch",
        ("Update",),
        frozenset({"nsp"}),
        frozenset({"proxy"}),
        "many registrations in one call (a proxy's targets); type DEFAULT only",
    ),
    Rule(
        "nsp.v1.TargetRegistry",
        ("Watch",),
        frozenset({"nsp"}),
        frozenset({"lb", "proxy", "target", ADMIN}),
        "meridioctl nsp targets",
    ),
    Rule(
        "ipam.v1.Ipam",
        ("Allocate", "Release"),
        frozenset({"ipam"}),
        frozenset({"proxy"}),
        "addresses for the proxy's bridge, its LB links and its targets",
    ),
    Rule(
        "meridio.ipam.v1.IpamBatch",
        ("Allocate",),
        frozenset({"ipam"}),
        frozenset({"proxy"}),
        "many of the proxy's addresses in one call (its targets, at start)",
    ),
    Rule(
        "meridio.admin.v1.IpamInspect",
        ("List",),
        frozenset({"ipam"}),
        frozenset({ADMIN}),
        "meridioctl ipam list",
    ),
    Rule(
        "meridio.connect.v1.Connect",
        ("Request", "Close"),
        frozenset({"lb"}),
        frozenset({"proxy"}),
        "an LB's conduit endpoint",
    ),
    Rule(
        "meridio.connect.v1.Connect",
        ("Request", "Close"),
        frozenset({"proxy"}),
        frozenset({"target"}),
        "a proxy's conduit endpoint",
    ),
    Rule(
        "meridio.admin.v1.LbInspect",
        ("Show", "Which", "Gateways"),
        frozenset({"lb"}),
        frozenset({ADMIN}),
        "meridioctl lb show, which, gateways (inspect-listen; lb.sock is local)",
    ),
    Rule(
        "ambassador.v1.Tap",
        ("Open", "Close", "Watch"),
        frozenset({"target"}),
        frozenset(),
        "the application beside the target, on the unix socket only",
    ),
)

MESSAGE_RULES: tuple[MessageRule, ...] = (
    *(
        MessageRule(
            f"/nsp.v1.TargetRegistry/{method}",
            "type",
            {
                "proxy": frozenset({TARGET_DEFAULT}),
                "target": frozenset({TARGET_DEFAULT}),
                "lb": frozenset({TARGET_FRONTEND}),
            },
            {TARGET_DEFAULT: "DEFAULT", TARGET_FRONTEND: "FRONTEND"},
        )
        for method in ("Register", "Unregister")
    ),
    MessageRule(
        "/meridio.nsp.v1.TargetRegistryBatch/Update",
        "type",
        {"proxy": frozenset({TARGET_DEFAULT})},
        {TARGET_DEFAULT: "DEFAULT", TARGET_FRONTEND: "FRONTEND"},
        each="updates.target",
    ),
)


def _index(table: Iterable[Rule]) -> dict[tuple[str, str], frozenset[str]]:
    out: dict[tuple[str, str], frozenset[str]] = {}
    for rule in table:
        for method in rule.methods:
            path = f"/{rule.service}/{method}"
            for server in rule.served_by:
                if (server, path) in out:
                    raise ValueError(f"{path} served by {server} is in the table twice")
                out[(server, path)] = rule.callers
    return out


_CALLERS = _index(TABLE)
_SERVERS: dict[str, frozenset[str]] = {}
for _rule in TABLE:
    for _method in _rule.methods:
        _path = f"/{_rule.service}/{_method}"
        _SERVERS[_path] = _SERVERS.get(_path, frozenset()) | _rule.served_by
_MESSAGES = {rule.method: rule for rule in MESSAGE_RULES}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


def decide(server_role: str, method: str, peer: Identity) -> Decision:
    """May ``peer`` call ``method`` (``/package.Service/Method``) on a ``server_role``?"""
    if peer.role is None:
        return Decision(False, f"{peer} names no meridio role ({peer.problem or 'unknown path'})")
    callers = _CALLERS.get((server_role, method))
    if callers is None:
        return Decision(False, f"{method} is not served to remote peers by the {server_role} role")
    if peer.role not in callers:
        allowed = ", ".join(sorted(callers)) or "local clients on the unix socket"
        return Decision(False, f"role {peer.role} may not call {method} (allowed: {allowed})")
    return Decision(True)


def has_message_rule(method: str) -> bool:
    return method in _MESSAGES


def check_message(method: str, role: str, message: Any) -> str | None:
    """Why ``role`` may not send this request to ``method``, or None when it may."""
    rule = _MESSAGES.get(method)
    if rule is None or role not in rule.allowed:
        return None
    items = [message]
    if rule.each:
        field_name, _, sub = rule.each.partition(".")
        items = [getattr(i, sub) if sub else i for i in getattr(message, field_name, ())]
    allowed = rule.allowed[role]
    refused = [
        v for v in (int(getattr(i, rule.attribute, 0) or 0) for i in items) if v not in allowed
    ]
    if not refused:
        return None
    value = refused[0]
    name = rule.names.get(value, str(value))
    ok = ", ".join(rule.names.get(v, str(v)) for v in sorted(allowed))
    return f"role {role} may not send {rule.attribute} {name} to {method} (allowed: {ok})"


def servers_of(method: str) -> frozenset[str]:
    """The roles that serve ``method`` (a client refuses a server of any other role)."""
    return _SERVERS.get(method, frozenset())


def markdown_table() -> str:
    """The table as the README shows it (a test keeps the two equal)."""
    lines = [
        "| service | methods | served by | callers over TLS | notes |",
        "|---|---|---|---|---|",
    ]
    for rule in TABLE:
        callers = ", ".join(r for r in IDENTITIES if r in rule.callers) or "none: unix socket"
        if rule.callers == ANY_ROLE:
            callers = "every role, admin"
        served = ", ".join(r for r in ROLES if r in rule.served_by)
        if rule.served_by == frozenset(ROLES):
            served = "every role"
        lines.append(
            f"| `{rule.service}` | {', '.join(rule.methods)} | {served} | {callers} | {rule.note} |"
        )
    return "\n".join(lines)


# --- refusal logging -------------------------------------------------------------------------


@dataclass
class RefusalLog:
    """Log a refusal once per key (peer and what it asked) per ``window`` seconds.

    :meth:`note` says whether to log this one, and how many like it were not logged since;
    every refusal is counted elsewhere (a metric) whatever this says.
    """

    window: float = 60.0
    max_keys: int = 4096
    _last: dict[Any, tuple[float, int]] = field(default_factory=dict)

    def note(self, key: Any, now: float) -> int | None:
        """None: do not log (a repeat within the window); else the repeats not logged."""
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.window:
            self._last[key] = (seen[0], seen[1] + 1)
            return None
        if len(self._last) >= self.max_keys:
            cutoff = now - self.window
            for stale in [k for k, (t, _) in self._last.items() if t < cutoff]:
                del self._last[stale]
            if len(self._last) >= self.max_keys:
                self._last.clear()
        self._last[key] = (now, 0)
        return 0 if seen is None else seen[1]
