"""Meridio configuration: loading, validation and the NSP watch filters.

This is the pure core behind the NSP's ``ConfigurationManager``. It reads Meridio's own
configuration format (the ``meridio-configuration-<trench>`` ConfigMap written by the operator),
checks it, and turns it into the ``nsp.v1`` messages the NSP serves. Nothing here does I/O except
:func:`load_file`, a convenience for reading one file.

Format
------
Seven keys: ``trench``, ``conduits``, ``streams``, ``flows``, ``vips``, ``attractors`` and
``gateways``. Each value is YAML; every key except ``trench`` holds a list under ``items``;
fields are kebab-case (``max-targets``, ``destination-port-ranges``, ...). A file may hold:

(a) the ConfigMap manifest itself (``apiVersion: v1``, ``kind: ConfigMap``, ``data: {...}``),
    whose ``data`` values are YAML documents in strings;
(b) that ``data`` mapping alone, each value a YAML document in a string;
(c) the same mapping with each value written inline as a YAML structure.

The shape is detected automatically: a mapping with ``kind`` or ``apiVersion`` is a manifest;
otherwise each value is parsed as YAML when it is a string and taken as it is when not, so
(b) and (c) may even be mixed. A missing key means an empty list (a missing ``trench`` means
the trench name comes from the ``default_trench`` argument, or stays unknown).

Converted messages
------------------
As Meridio's NSP does it, references are filled with the full messages: ``Stream.conduit`` is
the configured Conduit (with its Trench), ``Flow.stream`` the full Stream, ``Flow.vips``,
``Attractor.vips``, ``Attractor.gateways`` and ``Conduit.PortNat.vips`` the full messages, and
every object's ``trench`` is the configured Trench. Referenced messages are shared, not copied:
treat everything in an :class:`NspConfig` as read-only.

Normalisation: VIP addresses become CIDRs (``203.0.113.1`` -> ``203.0.113.1/32``, IPv6
compressed lower case); source subnets become network CIDRs (host bits cleared); port ranges
become ``any``, ``N`` or ``N-M``; flow and port-NAT protocols, gateway protocol and ip-family
are lower case; a stream without ``max-targets`` gets 100; a gateway without ``protocol`` gets
``bgp`` and one without ``ip-family`` gets the family of its address. As in Meridio, a
gateway's ``bfd-spec`` (min-tx, min-rx, multiplier) is only filled when ``bfd`` is true.

Gateways: a missing ``local-asn``, ``remote-asn``, ``local-port``, ``remote-port``, ``min-tx``,
``min-rx`` or ``multiplier`` is 0 in the message, which the LB's frontend reads as its default
(AS 8103 and 4248829953, port 10179, BFD 300 ms x 3); an explicit 0 is refused, as are AS
numbers above 4294967295, ports above 65535, BFD intervals (milliseconds) above 4294967 and
multipliers above 255. ``hold-time`` is 0 (the default, written or not) or 3..65535 seconds.
These are checked whatever the protocol (BGP fields on a ``static`` gateway are ignored, not
refused) and whether or not ``bfd`` is set. ``bgp-auth`` needs ``key`` and ``source``: the LB
reads the key at run time from ``source``, an absolute path, either the key file itself or a
directory (a mounted Secret) holding a file named ``key`` (so ``key`` has no ``/``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import betterproto
import msgspec
import yaml

from meridio.api.nsp.v1 import (
    Attractor,
    AttractorResponse,
    Conduit,
    ConduitPortNat,
    ConduitResponse,
    Flow,
    FlowResponse,
    Gateway,
    GatewayBfdSpec,
    GatewayBgpAuth,
    GatewayResponse,
    Stream,
    StreamResponse,
    Trench,
    TrenchResponse,
    Vip,
    VipResponse,
)
from meridio.core.names import describe, name_problem

__all__ = [
    "DEFAULT_GATEWAY_PROTOCOL",
    "DEFAULT_MAX_TARGETS",
    "KEYS",
    "MAX_TARGETS_LIMIT",
    "ConfigError",
    "NspConfig",
    "Source",
    "config_digest",
    "filter_attractors",
    "filter_conduits",
    "filter_flows",
    "filter_gateways",
    "filter_streams",
    "filter_trench",
    "filter_vips",
    "load_file",
    "parse_config",
    "parse_source",
    "parse_text",
    "read_source",
    "section_digests",
    "source_is_empty",
]

KEYS: Final = ("trench", "conduits", "streams", "flows", "vips", "attractors", "gateways")
"""The configuration keys, in the order they are reported and hashed."""

DEFAULT_MAX_TARGETS: Final = 100
MAX_TARGETS_LIMIT: Final = 10000
DEFAULT_GATEWAY_PROTOCOL: Final = "bgp"

_PROTOCOLS: Final = ("tcp", "udp", "sctp")
_GATEWAY_PROTOCOLS: Final = ("bgp", "static")
_IP_FAMILIES: Final = ("ipv4", "ipv6")
_MANIFEST_FIELDS: Final = ("apiVersion", "kind", "metadata", "data", "immutable")
_UINT32_MAX: Final = 2**32 - 1
_INT32_MAX: Final = 2**31 - 1
_PORT_MAX: Final = 65535
# BFD carries its intervals in microseconds in 32 bits (RFC 5880); the configuration in ms.
_BFD_INTERVAL_MAX_MS: Final = _UINT32_MAX // 1000

_PORT_RANGE_RE: Final = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?")
_NUMBER: Final = r"(?:0x[0-9a-f]+|[0-9]+)"
_BYTE_MATCH_RE: Final = re.compile(
    rf"(tcp|udp|sctp)\[\s*([0-9]+)\s*:\s*([0-9]+)\s*\]"
    rf"(?:\s*&\s*({_NUMBER}))?\s*=\s*({_NUMBER})",
    re.IGNORECASE,
)
_BYTE_MATCH_HEADER: Final = {"tcp": 20, "udp": 8, "sctp": 12}


# --------------------------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """An invalid configuration.

    The message names the key and the item, e.g.
    ``streams: item 1 ("stream-b"): max-targets must be 1..10000, got 0``.
    ``key`` (a configuration key, or None for file or document level errors), ``index`` and
    ``name`` (of the offending item, when known) are also available as attributes.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        index: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.index = index
        self.name = name

    def with_prefix(self, prefix: str) -> ConfigError:
        """The same error with ``"<prefix>: "`` in front of the message."""
        return ConfigError(f"{prefix}: {self}", key=self.key, index=self.index, name=self.name)


def _q(text: object) -> str:
    return f'"{text}"'


@dataclass(frozen=True, slots=True)
class _Where:
    """Where in the configuration something is: a key, and an item of its list."""

    key: str
    index: int | None = None
    name: str | None = None

    def __str__(self) -> str:
        if self.index is None:
            return self.key
        label = f"item {self.index}"
        if self.name:
            label += f" ({_q(self.name)})"
        return f"{self.key}: {label}"

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self}: {message}", key=self.key, index=self.index, name=self.name)


_MSGSPEC_AT: Final = re.compile(r"(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)


def _msgspec_message(err: msgspec.ValidationError) -> str:
    """``Expected `int`, got `str` - at `$.max-targets``` -> ``max-targets: Expected ...``."""
    match = _MSGSPEC_AT.fullmatch(str(err))
    if match is None:  # pragma: no cover - the pattern matches any text
        return str(err)
    path = (match["path"] or "").lstrip(".")
    return f"{path}: {match['msg']}" if path else match["msg"]


# --------------------------------------------------------------------------------------------
# Typed decoding (msgspec): one Struct per YAML object, field names as in Meridio's reader


class _Spec(msgspec.Struct, rename="kebab", forbid_unknown_fields=True, kw_only=True):
    pass


class _TrenchSpec(_Spec):
    name: str


class _PortNatSpec(_Spec):
    port: int
    target_port: int
    protocol: str
    vips: list[str] = []


class _ConduitSpec(_Spec):
    name: str
    trench: str = ""
    destination_port_nats: list[_PortNatSpec] = []


class _StreamSpec(_Spec):
    name: str
    conduit: str
    max_targets: int | None = None


class _FlowSpec(_Spec):
    name: str
    stream: str
    source_subnets: list[str] = []
    destination_port_ranges: list[str | int] = []
    source_port_ranges: list[str | int] = []
    protocols: list[str] = []
    vips: list[str] = []
    priority: int = 0
    byte_matches: list[str] = []


class _VipSpec(_Spec):
    name: str
    address: str
    trench: str = ""


class _AttractorSpec(_Spec):
    name: str
    vips: list[str] = []
    gateways: list[str] = []
    trench: str = ""


class _BgpAuthSpec(_Spec):
    key: str = ""
    source: str = ""


class _GatewaySpec(_Spec):
    # None: the key is missing, i.e. "use the frontend's default"; an explicit 0 is refused.
    name: str
    address: str
    remote_asn: int | None = None
    local_asn: int | None = None
    remote_port: int | None = None
    local_port: int | None = None
    ip_family: str = ""
    bfd: bool = False
    protocol: str = ""
    hold_time: int = 0  # 0, written or not, is the default (not BIRD's "no keepalives")
    min_tx: int | None = None
    min_rx: int | None = None
    multiplier: int | None = None
    trench: str = ""
    bgp_auth: _BgpAuthSpec | None = None


_S = TypeVar("_S", bound=_Spec)


# --------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class NspConfig:
    """A checked configuration, as ``nsp.v1`` messages with their references filled in.

    ``trench`` is None when the configuration names no trench and no default was given. The
    messages are shared between the lists (a Flow's ``stream`` is the very Stream object in
    ``streams``): do not mutate them.
    """

    trench: Trench | None = None
    conduits: tuple[Conduit, ...] = ()
    streams: tuple[Stream, ...] = ()
    flows: tuple[Flow, ...] = ()
    vips: tuple[Vip, ...] = ()
    attractors: tuple[Attractor, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    _stream_index: dict[tuple[str, str, str], Stream] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {_stream_key(s): s for s in self.streams}
        object.__setattr__(self, "_stream_index", index)

    def stream_by_key(self, trench: str, conduit: str, stream: str) -> Stream | None:
        """The configured stream ``stream`` of conduit ``conduit`` in trench ``trench``.

        All three names must match exactly (no wildcards); None when there is no such stream.
        """
        return self._stream_index.get((trench, conduit, stream))

    def max_targets_of(self, stream: Stream) -> int | None:
        """The configured max-targets of the stream a request names (by its name hierarchy).

        ``stream`` is typically ``Target.stream`` of a registration: only its name,
        ``conduit.name`` and ``conduit.trench.name`` count, not its own ``max_targets``.
        None when no such stream is configured.
        """
        found = self._stream_index.get(_stream_key(stream))
        return None if found is None else int(found.max_targets)


def _stream_key(stream: Stream) -> tuple[str, str, str]:
    return (str(stream.conduit.trench.name), str(stream.conduit.name), str(stream.name))


# --------------------------------------------------------------------------------------------
# Reading YAML


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error_message(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        parts = [p for p in (err.context, err.problem) if p]
        text = ": ".join(parts) if parts else str(err)
        mark = err.problem_mark or err.context_mark
        if mark is not None:
            return f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {text}"
        return f"YAML error: {text}"
    return f"YAML error: {err}"


def _load_yaml(text: str) -> object:
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


# --------------------------------------------------------------------------------------------
# Public entry points


Source = str | dict[str, str]
"""A configuration as read: a file's text, or a mounted ConfigMap directory's files by name."""


def read_source(path: str | os.PathLike[str]) -> Source:
    """Read a configuration file (UTF-8) or a mounted ConfigMap directory, without parsing.

    A directory holds one file per key (Kubernetes mounts each key of Meridio's ConfigMap as a
    file of that name); its dot-files and ``..data`` link are the mount's own and are skipped.
    Kubernetes updates such a mount by swapping the ``..data`` link, so the files read are one
    version of the ConfigMap. Unreadable files raise :class:`ConfigError` naming the path.
    """
    name = os.fspath(path)
    if Path(name).is_dir():
        data: dict[str, str] = {}
        for entry in sorted(Path(name).iterdir()):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            try:
                data[entry.name] = entry.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"{entry}: cannot read: {err}") from None
        return data
    try:
        return Path(name).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{name}: not valid UTF-8 (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigError(f"{name}: cannot read: {err.strerror or err}") from None


def source_is_empty(source: Source) -> bool:
    """Whether a configuration as read holds nothing at all: no text but whitespace and YAML
    comments, or a directory with no file that does. That is what a file being rewritten in
    place (``cat > file``, an editor's save) shows for a moment, so the NSP never applies it.
    """
    texts = list(source.values()) if isinstance(source, dict) else [source]
    return not any(_has_content(text) for text in texts)


def _has_content(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())


def parse_source(
    source: Source, *, default_trench: str | None = None, where: str = ""
) -> NspConfig:
    """Check a configuration as read by :func:`read_source`; errors are prefixed ``<where>: ``."""
    try:
        if isinstance(source, dict):
            return parse_config(source, default_trench=default_trench)
        return parse_text(source, default_trench=default_trench)
    except ConfigError as err:
        raise (err.with_prefix(where) if where else err) from None


def load_file(path: str | os.PathLike[str], *, default_trench: str | None = None) -> NspConfig:
    """Read and check a configuration file (UTF-8) or mounted ConfigMap directory.

    Every error, unreadable file and YAML syntax error included, is raised as
    :class:`ConfigError` with the message prefixed by ``"<path>: "``.
    """
    return parse_source(read_source(path), default_trench=default_trench, where=os.fspath(path))


def parse_text(text: str, *, default_trench: str | None = None) -> NspConfig:
    """Parse and check YAML text in any of the three shapes (see the module documentation)."""
    try:
        doc = _load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_error_message(err)) from None
    return parse_config(doc, default_trench=default_trench)


def parse_config(doc: object, *, default_trench: str | None = None) -> NspConfig:
    """Check an already loaded YAML document (any shape) and convert it.

    ``default_trench`` names the trench when the configuration has no ``trench`` key; the
    ``trench`` key wins when both are given. Raises :class:`ConfigError`.
    """
    data = _data_mapping(doc)
    values = {key: _section_value(key, value) for key, value in data.items()}
    return _Builder(values, default_trench or None).build()


def _data_mapping(doc: object) -> Mapping[str, object]:
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"the configuration must be a mapping, got {_kind_of(doc)}")
    if "kind" in doc or "apiVersion" in doc:
        doc = _configmap_data(doc)
    for key in doc:
        if key not in KEYS:
            raise ConfigError(
                f"unknown key {_q(key)} (expected one of {', '.join(KEYS)})", key=str(key)
            )
    return doc


def _configmap_data(manifest: Mapping[Any, Any]) -> Mapping[Any, Any]:
    kind = manifest.get("kind")
    if kind != "ConfigMap":
        raise ConfigError(f"kind: expected {_q('ConfigMap')}, got {_q(kind)}")
    for name in manifest:
        if name not in _MANIFEST_FIELDS:
            raise ConfigError(f"unknown ConfigMap field {_q(name)}")
    data = manifest.get("data")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"data: expected a mapping, got {_kind_of(data)}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise ConfigError(
                f"{key}: ConfigMap data values must be strings, got {_kind_of(value)}",
                key=str(key),
            )
    return data


def _section_value(key: str, value: object) -> object:
    if value is None:
        # What a file cut short after "conduits:" reads as; a ConfigMap value is a string.
        raise ConfigError(
            f"{key}: has no value (a file cut short?); write {{items: []}} for none, "
            "or leave the key out",
            key=key,
        )
    if not isinstance(value, str):
        return value
    try:
        return _load_yaml(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: {_yaml_error_message(err)}", key=key) from None


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Decoding sections


def _decode_trench(value: object) -> _TrenchSpec | None:
    if value is None:
        return None
    where = _Where("trench")
    if not isinstance(value, Mapping):
        raise where.error(f"expected a mapping with {_q('name')}, got {_kind_of(value)}")
    try:
        spec = msgspec.convert(value, _TrenchSpec)
    except msgspec.ValidationError as err:
        raise where.error(_msgspec_message(err)) from None
    problem = name_problem(spec.name)
    if problem is not None:
        raise where.error(describe("", spec.name, problem).lstrip())
    return spec


def _decode_items(key: str, value: object, spec_type: type[_S]) -> list[tuple[_Where, _S]]:
    """Decode ``{items: [...]}`` one item at a time (so errors name the item)."""
    if value is None:
        return []
    where = _Where(key)
    if not isinstance(value, Mapping):
        raise where.error(f"expected a mapping with {_q('items')}, got {_kind_of(value)}")
    for name in value:
        if name != "items":
            raise where.error(f"unknown field {_q(name)} (expected {_q('items')})")
    items = value.get("items")
    if items is None:
        return []
    if not isinstance(items, list):
        raise where.error(f"items: expected a list, got {_kind_of(items)}")
    decoded: list[tuple[_Where, _S]] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(items):
        raw_name = raw.get("name") if isinstance(raw, Mapping) else None
        shown = raw_name if isinstance(raw_name, str) and raw_name.isprintable() else None
        item = _Where(key, index, shown)
        if not isinstance(raw, Mapping):
            raise item.error(f"expected a mapping, got {_kind_of(raw)}")
        try:
            spec = msgspec.convert(raw, spec_type)
        except msgspec.ValidationError as err:
            raise item.error(_msgspec_message(err)) from None
        name = getattr(spec, "name", "")
        if not name:
            raise item.error("name must not be empty")
        problem = name_problem(name)
        if problem is not None:
            raise item.error(describe("", name, problem).lstrip())
        if name in seen:
            raise item.error(f"duplicate name {_q(name)} (also item {seen[name]})")
        seen[name] = index
        decoded.append((item, spec))
    return decoded


# --------------------------------------------------------------------------------------------
# Semantic checks and conversion


_M = TypeVar("_M")


def _resolve(
    where: _Where,
    what: str,
    names: Sequence[str],
    table: Mapping[str, _M],
    *,
    context: str = "",
) -> list[_M]:
    """Look each name up in ``table``: unknown and repeated names are errors."""
    found: list[_M] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise where.error(f"{context}{what} {_q(name)} is listed twice")
        seen.add(name)
        target = table.get(name)
        if target is None:
            raise where.error(f"{context}unknown {what} {_q(name)}")
        found.append(target)
    return found


def _check_range(where: _Where, field_name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise where.error(f"{field_name} must be {low}..{high}, got {value}")
    return value


def _check_given(where: _Where, field_name: str, value: int | None, high: int) -> int:
    """A field whose missing key means "the default" (0 in the Gateway message): a 0 written
    in the file is refused, as it would silently mean the default too."""
    if value is None:
        return 0
    if value == 0:
        raise where.error(
            f"{field_name} must be 1..{high}, got 0 (leave {field_name} out for the default)"
        )
    return _check_range(where, field_name, value, 1, high)


def _bgp_auth(where: _Where, spec: _BgpAuthSpec) -> GatewayBgpAuth:
    """The LB reads the key at run time from ``source``: a file, or a directory (a mounted
    Secret) holding a file named ``key``; so ``source`` is an absolute path and ``key`` a file
    name."""
    key, source = spec.key, spec.source
    if not key or not source:
        raise where.error('bgp-auth needs both "key" and "source"')
    if "/" in key or key in (".", ".."):
        raise where.error(f"bgp-auth: key must be a file name (no {_q('/')}), got {_q(key)}")
    if not source.startswith("/"):
        raise where.error(
            "bgp-auth: source must be an absolute path (the key file, or a directory holding "
            f"a file named by key), got {_q(source)}"
        )
    return GatewayBgpAuth(key_name=key, key_source=source)


def _vip_address(where: _Where, text: str) -> str:
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError:
        raise where.error(f"address {_q(text)} is not a CIDR") from None
    if isinstance(iface, ipaddress.IPv6Interface) and iface.ip.scope_id:
        raise where.error(f"address {_q(text)} is not a CIDR")
    if iface.network.prefixlen != iface.max_prefixlen:
        raise where.error(
            f"address {_q(text)} must be a single address (/{iface.max_prefixlen}); "
            "ranges are not supported"
        )
    return iface.with_prefixlen


def _subnet(where: _Where, text: str) -> str:
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise where.error(f"source-subnets: {_q(text)} is not a CIDR") from None
    return network.with_prefixlen


def _port_range(where: _Where, field_name: str, value: str | int) -> str:
    text = str(value).strip().lower()
    if text == "any":
        return "any"
    match = _PORT_RANGE_RE.fullmatch(text)
    if match is None:
        raise where.error(f'{field_name}: {_q(value)} is not "any", "N" or "N-M"')
    low = int(match[1])
    high = low if match[2] is None else int(match[2])
    if high > _PORT_MAX:
        raise where.error(f"{field_name}: {_q(value)} is outside 0..{_PORT_MAX}")
    if low > high:
        raise where.error(f"{field_name}: {_q(value)} starts after it ends")
    return str(low) if match[2] is None else f"{low}-{high}"


def _protocol(where: _Where, field_name: str, value: str) -> str:
    proto = value.strip().lower()
    if proto not in _PROTOCOLS:
        raise where.error(f"{field_name}: {_q(value)} is not one of {', '.join(_PROTOCOLS)}")
    return proto


def _byte_match(where: _Where, value: str) -> str:
    text = value.strip()
    match = _BYTE_MATCH_RE.fullmatch(text)
    if match is None:
        raise where.error(
            f'byte-matches: {_q(value)} is not "(tcp|udp|sctp)[offset:length] (& mask)? = value"'
        )
    length = int(match[3])
    if length not in (1, 2, 4):
        raise where.error(f"byte-matches: {_q(value)}: length must be 1, 2 or 4, got {length}")
    # as nfqlb: the bytes must lie within the protocol's minimal header
    header = _BYTE_MATCH_HEADER[match[1].lower()]
    if int(match[2]) + length > header:
        raise where.error(
            f"byte-matches: {_q(value)}: offset + length is beyond the {header}-byte "
            f"{match[1].lower()} header"
        )
    limit = 256**length
    for part in (match[4], match[5]):
        if part is not None and int(part, 0) >= limit:
            size = f"{length} byte" + ("s" if length > 1 else "")
            raise where.error(f"byte-matches: {_q(value)}: {part} does not fit in {size}")
    return text


class _Builder:
    """Checks the decoded sections and builds the messages, in dependency order."""

    def __init__(self, values: Mapping[str, object], default_trench: str | None) -> None:
        self.values = values
        trench_spec = _decode_trench(values.get("trench"))
        name = trench_spec.name if trench_spec is not None else default_trench
        self.trench: Trench | None = None if name is None else Trench(name=name)

    def items(self, key: str, spec_type: type[_S]) -> list[tuple[_Where, _S]]:
        return _decode_items(key, self.values.get(key), spec_type)

    def item_trench(self, where: _Where, given: str) -> Trench:
        if self.trench is None:
            return Trench(name=given)
        if given and given != self.trench.name:
            raise where.error(
                f"trench {_q(given)} is not the configured trench {_q(self.trench.name)}"
            )
        return self.trench

    def build(self) -> NspConfig:
        # Decode everything first, so a typing error anywhere wins over a dangling reference.
        vip_items = self.items("vips", _VipSpec)
        gateway_items = self.items("gateways", _GatewaySpec)
        conduit_items = self.items("conduits", _ConduitSpec)
        stream_items = self.items("streams", _StreamSpec)
        flow_items = self.items("flows", _FlowSpec)
        attractor_items = self.items("attractors", _AttractorSpec)

        vips = {s.name: self.vip(w, s) for w, s in vip_items}
        gateways = {s.name: self.gateway(w, s) for w, s in gateway_items}
        conduits = {s.name: self.conduit(w, s, vips) for w, s in conduit_items}
        streams = {s.name: self.stream(w, s, conduits) for w, s in stream_items}
        flows = [self.flow(w, s, streams, vips) for w, s in flow_items]
        attractors = [self.attractor(w, s, vips, gateways) for w, s in attractor_items]
        return NspConfig(
            trench=self.trench,
            conduits=tuple(conduits.values()),
            streams=tuple(streams.values()),
            flows=tuple(flows),
            vips=tuple(vips.values()),
            attractors=tuple(attractors),
            gateways=tuple(gateways.values()),
        )

    def vip(self, where: _Where, spec: _VipSpec) -> Vip:
        return Vip(
            name=spec.name,
            address=_vip_address(where, spec.address),
            trench=self.item_trench(where, spec.trench),
        )

    def gateway(self, where: _Where, spec: _GatewaySpec) -> Gateway:
        try:
            address = ipaddress.ip_address(spec.address.strip())
        except ValueError:
            raise where.error(f"address {_q(spec.address)} is not an IP address") from None
        family = f"ipv{address.version}"
        ip_family = spec.ip_family.strip().lower() or family
        if ip_family not in _IP_FAMILIES:
            raise where.error(f"ip-family must be ipv4 or ipv6, got {_q(spec.ip_family)}")
        if ip_family != family:
            raise where.error(
                f"ip-family {_q(ip_family)} does not match address {_q(spec.address)} ({family})"
            )
        protocol = spec.protocol.strip().lower() or DEFAULT_GATEWAY_PROTOCOL
        if protocol not in _GATEWAY_PROTOCOLS:
            raise where.error(f"protocol must be bgp or static, got {_q(spec.protocol)}")
        remote_asn = _check_given(where, "remote-asn", spec.remote_asn, _UINT32_MAX)
        local_asn = _check_given(where, "local-asn", spec.local_asn, _UINT32_MAX)
        remote_port = _check_given(where, "remote-port", spec.remote_port, _PORT_MAX)
        local_port = _check_given(where, "local-port", spec.local_port, _PORT_MAX)
        if spec.hold_time != 0:  # 0: the frontend's default
            _check_range(where, "hold-time", spec.hold_time, 3, _PORT_MAX)
        min_tx = _check_given(where, "min-tx", spec.min_tx, _BFD_INTERVAL_MAX_MS)
        min_rx = _check_given(where, "min-rx", spec.min_rx, _BFD_INTERVAL_MAX_MS)
        multiplier = _check_given(where, "multiplier", spec.multiplier, 255)
        gateway = Gateway(
            name=spec.name,
            address=str(address),
            ip_family=ip_family,
            protocol=protocol,
            remote_asn=remote_asn,
            local_asn=local_asn,
            remote_port=remote_port,
            local_port=local_port,
            hold_time=spec.hold_time,
            bfd=spec.bfd,
            trench=self.item_trench(where, spec.trench),
        )
        if spec.bfd:
            gateway.bfd_spec = GatewayBfdSpec(min_tx=min_tx, min_rx=min_rx, multiplier=multiplier)
        if spec.bgp_auth is not None:
            gateway.bgp_auth = _bgp_auth(where, spec.bgp_auth)
        return gateway

    def conduit(self, where: _Where, spec: _ConduitSpec, vips: Mapping[str, Vip]) -> Conduit:
        port_nats: list[ConduitPortNat] = []
        nated: dict[tuple[int, str, str], int] = {}
        nated_to: dict[tuple[int, str, str], int] = {}
        for index, nat in enumerate(spec.destination_port_nats):
            label = f"destination-port-nats[{index}]"
            _check_range(where, f"{label}: port", nat.port, 1, _PORT_MAX)
            _check_range(where, f"{label}: target-port", nat.target_port, 1, _PORT_MAX)
            protocol = _protocol(where, f"{label}: protocol", nat.protocol)
            if not nat.vips:
                raise where.error(f"{label}: vips must not be empty")
            nat_vips = _resolve(where, "vip", nat.vips, vips, context=f"{label}: ")
            for vip_name in nat.vips:
                other = nated.setdefault((nat.port, vip_name, protocol), index)
                if other != index:
                    raise where.error(
                        f"{label}: port {nat.port}/{protocol} of vip {_q(vip_name)} "
                        f"is already NATed by destination-port-nats[{other}]"
                    )
                # stateless: replies from a target port are mapped back to one port only
                other = nated_to.setdefault((nat.target_port, vip_name, protocol), index)
                if other != index:
                    raise where.error(
                        f"{label}: target-port {nat.target_port}/{protocol} of vip "
                        f"{_q(vip_name)} is already the target of destination-port-nats[{other}]"
                    )
            port_nats.append(
                ConduitPortNat(
                    port=nat.port, target_port=nat.target_port, vips=nat_vips, protocol=protocol
                )
            )
        return Conduit(
            name=spec.name,
            trench=self.item_trench(where, spec.trench),
            destination_port_nats=port_nats,
        )

    def stream(self, where: _Where, spec: _StreamSpec, conduits: Mapping[str, Conduit]) -> Stream:
        (conduit,) = _resolve(where, "conduit", [spec.conduit], conduits)
        max_targets = DEFAULT_MAX_TARGETS if spec.max_targets is None else spec.max_targets
        _check_range(where, "max-targets", max_targets, 1, MAX_TARGETS_LIMIT)
        return Stream(name=spec.name, conduit=conduit, max_targets=max_targets)

    def flow(
        self,
        where: _Where,
        spec: _FlowSpec,
        streams: Mapping[str, Stream],
        vips: Mapping[str, Vip],
    ) -> Flow:
        (stream,) = _resolve(where, "stream", [spec.stream], streams)
        flow_vips = _resolve(where, "vip", spec.vips, vips)
        if spec.priority < 0:
            raise where.error(f"priority must be >= 0, got {spec.priority}")
        _check_range(where, "priority", spec.priority, 0, _INT32_MAX)
        return Flow(
            name=spec.name,
            source_subnets=[_subnet(where, s) for s in spec.source_subnets],
            destination_port_ranges=[
                _port_range(where, "destination-port-ranges", p)
                for p in spec.destination_port_ranges
            ],
            source_port_ranges=[
                _port_range(where, "source-port-ranges", p) for p in spec.source_port_ranges
            ],
            protocols=[_protocol(where, "protocols", p) for p in spec.protocols],
            priority=spec.priority,
            stream=stream,
            vips=flow_vips,
            byte_matches=[_byte_match(where, b) for b in spec.byte_matches],
        )

    def attractor(
        self,
        where: _Where,
        spec: _AttractorSpec,
        vips: Mapping[str, Vip],
        gateways: Mapping[str, Gateway],
    ) -> Attractor:
        return Attractor(
            name=spec.name,
            trench=self.item_trench(where, spec.trench),
            vips=_resolve(where, "vip", spec.vips, vips),
            gateways=_resolve(where, "gateway", spec.gateways, gateways),
        )


# --------------------------------------------------------------------------------------------
# Change detection


def _hash_messages(messages: Iterable[betterproto.Message]) -> str:
    """Order-insensitive: the serialized items are sorted before hashing."""
    digest = hashlib.sha256()
    for blob in sorted(bytes(m) for m in messages):
        digest.update(len(blob).to_bytes(8, "big"))
        digest.update(blob)
    return digest.hexdigest()


def section_digests(cfg: NspConfig) -> dict[str, str]:
    """A SHA-256 hex digest per configuration key (see :func:`config_digest`).

    The digest of a list covers each item with its nested references, so a change of a
    stream also changes the ``flows`` digest. The NSP can compare them to notify only the
    watchers of the kinds that changed.
    """
    trench = hashlib.sha256(b"\x00" if cfg.trench is None else b"\x01" + bytes(cfg.trench))
    return {
        "trench": trench.hexdigest(),
        "conduits": _hash_messages(cfg.conduits),
        "streams": _hash_messages(cfg.streams),
        "flows": _hash_messages(cfg.flows),
        "vips": _hash_messages(cfg.vips),
        "attractors": _hash_messages(cfg.attractors),
        "gateways": _hash_messages(cfg.gateways),
    }


def config_digest(cfg: NspConfig) -> str:
    """A stable SHA-256 hex digest of the converted configuration.

    It is computed on the serialized messages, so it is the same for the three file shapes and
    for any spelling that normalises to the same messages (``203.0.113.1`` or
    ``203.0.113.1/32``, ``TCP`` or ``tcp``), and does not depend on the order of the items in a
    list. Any change of content changes it.
    """
    digest = hashlib.sha256()
    for key, value in section_digests(cfg).items():
        digest.update(f"{key}={value};".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Watch filters (ConfigurationManager semantics)
#
# The request is a filter. Only names count, and an empty name matches everything:
#   Trench:    name
#   Conduit:   name, trench.name
#   Stream:    name, conduit.name, conduit.trench.name
#   Flow:      name, stream.name, stream.conduit.name, stream.conduit.trench.name
#   Vip:       name, trench.name
#   Attractor: name, trench.name
#   Gateway:   name, trench.name
# Every other field of the request (addresses, ports, max-targets, lists...) is ignored, as in
# Meridio. An unset nested message reads as a default instance with empty names, so it matches
# everything too; a request of None matches everything. (Meridio's Go code differs in one
# corner: a request whose nested trench or conduit is nil matches nothing there. We follow the
# documented rule instead: unset means any.)


def _name_ok(wanted: str, actual: str) -> bool:
    return not wanted or wanted == actual


def _trench_ok(wanted: Trench, actual: Trench) -> bool:
    return _name_ok(wanted.name, actual.name)


def _conduit_ok(wanted: Conduit, actual: Conduit) -> bool:
    return _name_ok(wanted.name, actual.name) and _trench_ok(wanted.trench, actual.trench)


def _stream_ok(wanted: Stream, actual: Stream) -> bool:
    return _name_ok(wanted.name, actual.name) and _conduit_ok(wanted.conduit, actual.conduit)


def _flow_ok(wanted: Flow, actual: Flow) -> bool:
    return _name_ok(wanted.name, actual.name) and _stream_ok(wanted.stream, actual.stream)


def _named_in_trench_ok(
    wanted: Vip | Attractor | Gateway, actual: Vip | Attractor | Gateway
) -> bool:
    return _name_ok(wanted.name, actual.name) and _trench_ok(wanted.trench, actual.trench)


def _select(items: Sequence[_M], request: _M | None, matches: Callable[[_M, _M], bool]) -> list[_M]:
    if request is None:
        return list(items)
    return [item for item in items if matches(request, item)]


def filter_trench(cfg: NspConfig, request: Trench | None = None) -> TrenchResponse:
    """The configured trench if its name matches ``request.name`` (empty: any).

    With no configured trench, or no match, the response has no trench set.
    """
    if cfg.trench is None or (request is not None and not _trench_ok(request, cfg.trench)):
        return TrenchResponse()
    return TrenchResponse(trench=cfg.trench)


def filter_conduits(cfg: NspConfig, request: Conduit | None = None) -> ConduitResponse:
    """Conduits matching ``name`` and ``trench.name`` (empty: any)."""
    return ConduitResponse(conduits=_select(cfg.conduits, request, _conduit_ok))


def filter_streams(cfg: NspConfig, request: Stream | None = None) -> StreamResponse:
    """Streams matching ``name``, ``conduit.name`` and ``conduit.trench.name`` (empty: any)."""
    return StreamResponse(streams=_select(cfg.streams, request, _stream_ok))


def filter_flows(cfg: NspConfig, request: Flow | None = None) -> FlowResponse:
    """Flows matching ``name`` and ``stream.name``, ``stream.conduit.name``,
    ``stream.conduit.trench.name`` (empty: any)."""
    return FlowResponse(flows=_select(cfg.flows, request, _flow_ok))


def filter_vips(cfg: NspConfig, request: Vip | None = None) -> VipResponse:
    """VIPs matching ``name`` and ``trench.name`` (empty: any); ``address`` is ignored."""
    return VipResponse(vips=_select(cfg.vips, request, _named_in_trench_ok))


def filter_attractors(cfg: NspConfig, request: Attractor | None = None) -> AttractorResponse:
    """Attractors matching ``name`` and ``trench.name`` (empty: any)."""
    return AttractorResponse(attractors=_select(cfg.attractors, request, _named_in_trench_ok))


def filter_gateways(cfg: NspConfig, request: Gateway | None = None) -> GatewayResponse:
    """Gateways matching ``name`` and ``trench.name`` (empty: any)."""
    return GatewayResponse(gateways=_select(cfg.gateways, request, _named_in_trench_ok))
