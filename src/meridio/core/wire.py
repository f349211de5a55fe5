"""Strict protobuf decoding into betterproto messages. Pure, no I/O.

betterproto 2.0.0b7 decodes leniently: a length prefix past the end of the data reads as a
shorter value, a varint where a string belongs becomes an ``int`` in a ``str`` field, a
truncated varint is taken as it is, and invalid UTF-8 raises whatever the codec raises. It is
also slow (about half a millisecond for one ``nsp.v1.Target`` on a small VM). :func:`decode`
reads the wire format itself, driven by the field metadata betterproto generates
(``_betterproto.meta_by_field_name``, ``cls_by_field``, ``default_gen``), and builds the same
message objects ``cls().parse(data)`` builds (equal values, unset fields lazily defaulted,
``_serialized_on_wire`` set, unknown fields kept) about ten times faster, unless the data is
not well formed, which raises :class:`WireError` naming the field path and the problem:

* every tag is a varint of at most 5 bytes with a field number in 1..2**29-1 and a wire type
  of 0 (varint), 1 (64-bit), 2 (length-delimited) or 5 (32-bit); groups (3, 4) are refused;
* every varint ends within its message and within 10 bytes, and fits in 64 bits;
* every length-delimited value and every fixed-size value lies wholly inside its message;
* a known field has the wire type of its declared type; a repeated number, bool or enum may
  also come packed (wire type 2), whose content must then be whole values;
* values fit their declared type: ``int32`` (negative ones sign-extended to 64 bits, as
  protobuf encodes them), ``uint32`` and ``sint32`` in 32 bits; a ``bool`` is 0 or 1; an enum
  value is one the enum declares (the APIs served are fixed: an unknown value is corrupt data);
* strings (map keys and values included) are valid UTF-8; embedded messages and map entries
  are decoded recursively, at most :data:`MAX_DEPTH` levels deep.

Unknown fields are allowed (protobuf's rule, for compatibility) but must be well formed too.
As in betterproto, a repeated scalar field set twice keeps the last value and a message field
set twice keeps the last message (protobuf would merge the two; no client sends that).

Messages whose classes hold ``datetime``, ``timedelta`` or wrapper fields (none in the APIs
served here) are checked the same way and then decoded by betterproto itself.

This relies on how betterproto 2.0.0b7 keeps a message (its ``__dict__`` holds every field, an
unset one as ``betterproto.PLACEHOLDER``, plus ``_serialized_on_wire``, ``_unknown_fields`` and
``_group_current``); the version is pinned and ``tests/unit/test_wire.py`` checks, on generated
messages, that both decoders agree.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final

import betterproto

__all__ = [
    "MAX_DEPTH",
    "WireError",
    "build",
    "check",
    "decode",
    "encode_varint",
    "field",
    "read_varint",
]

MAX_DEPTH: Final = 64
"""Deepest nesting of embedded messages accepted (protobuf's own default is 100)."""

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_WIRE_NAMES: Final = (
    "varint",
    "64-bit",
    "length-delimited",
    "start-group",
    "end-group",
    "32-bit",
    "invalid (6)",
    "invalid (7)",
)
_MAX_FIELD: Final = (1 << 29) - 1
_U64: Final = 1 << 64
_U32: Final = 1 << 32
_I32_NEG_MIN: Final = _U64 - (1 << 31)  # -2**31 as a 64-bit two's complement varint
_PLACEHOLDER: Final = betterproto.PLACEHOLDER
_raw = object.__getattribute__  # a message's own attribute, past betterproto's __getattribute__

_VARINT_TYPES: Final = frozenset(
    {"int32", "int64", "uint32", "uint64", "sint32", "sint64", "bool", "enum"}
)
_STRUCT: Final = {
    "double": struct.Struct("<d"),
    "float": struct.Struct("<f"),
    "fixed32": struct.Struct("<I"),
    "fixed64": struct.Struct("<Q"),
    "sfixed32": struct.Struct("<i"),
    "sfixed64": struct.Struct("<q"),
}

# Field kinds: how one value is read.
_K_VARINT, _K_FIXED, _K_STRING, _K_BYTES, _K_MESSAGE, _K_MAP = range(6)


class WireError(ValueError):
    """Data that is not a well-formed encoding of the message; the text says where and why."""


class _Field:
    __slots__ = ("convert", "fixed", "group", "kind", "name", "repeated", "schema", "wire")

    def __init__(
        self,
        name: str,
        kind: int,
        wire: int,
        *,
        repeated: bool = False,
        convert: Callable[[int], Any] | None = None,
        fixed: struct.Struct | None = None,
        schema: Callable[[], _Schema] | None = None,
        group: str | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.wire = wire
        self.repeated = repeated
        self.convert = convert  # varint -> value; raises _Range when it does not fit
        self.fixed = fixed
        self.schema = schema  # embedded message or map entry
        self.group = group


class _Schema:
    __slots__ = ("cls", "fallback", "fields", "groups", "name", "siblings", "template")

    def __init__(self, cls: type | None, name: str) -> None:
        self.cls = cls  # None for a map entry (decoded to a (key, value) pair)
        self.name = name
        self.fields: dict[int, _Field] = {}
        self.template: dict[str, Any] = {}
        self.groups: dict[str, None] = {}
        self.siblings: dict[str, tuple[str, ...]] = {}  # oneof field -> the other fields
        self.fallback = False  # decoded by betterproto after the check


class _Range(Exception):
    """A varint that does not fit its field's type (the message is the reason)."""


def _int32(value: int) -> int:
    if value < (1 << 31):
        return value
    if value >= _I32_NEG_MIN:
        return value - _U64
    raise _Range(f"value {value} does not fit in int32")


def _int64(value: int) -> int:
    return value - _U64 if value >= (1 << 63) else value


def _uint32(value: int) -> int:
    if value < _U32:
        return value
    raise _Range(f"value {value} does not fit in 32 bits")


def _uint64(value: int) -> int:
    return value


def _sint32(value: int) -> int:
    if value >= _U32:
        raise _Range(f"value {value} does not fit in 32 bits")
    return (value >> 1) ^ -(value & 1)


def _sint64(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def _bool(value: int) -> bool:
    if value > 1:
        raise _Range(f"value {value} is not a bool (0 or 1)")
    return value == 1


_CONVERT: Final[dict[str, Callable[[int], Any]]] = {
    "int32": _int32,
    "int64": _int64,
    "uint32": _uint32,
    "uint64": _uint64,
    "sint32": _sint32,
    "sint64": _sint64,
    "bool": _bool,
}


def _enum(enum_cls: Any) -> Callable[[int], Any]:
    members = {int(member.value): member for member in enum_cls}

    def convert(value: int) -> Any:
        if value >= _I32_NEG_MIN:  # negative values are sign-extended like int32
            value -= _U64
        member = members.get(value)
        if member is None:
            raise _Range(f"value {value} is not a known {enum_cls.__name__}")
        return member

    return convert


_schemas: dict[type, _Schema] = {}


def _schema_of(cls: type) -> _Schema:
    schema = _schemas.get(cls)
    if schema is None:
        schema = _build(cls)
        _schemas[cls] = schema
    return schema


def _lazy(cls: type) -> Callable[[], _Schema]:
    return lambda: _schema_of(cls)


def _const(schema: _Schema) -> Callable[[], _Schema]:
    return lambda: schema


def _scalar(name: str, proto_type: str, cls: Any, *, repeated: bool = False) -> _Field:
    """A field of any type but map; ``cls`` is the enum or message class where there is one."""
    if proto_type == "enum":
        return _Field(name, _K_VARINT, _VARINT, repeated=repeated, convert=_enum(cls))
    if proto_type in _VARINT_TYPES:
        return _Field(name, _K_VARINT, _VARINT, repeated=repeated, convert=_CONVERT[proto_type])
    fixed = _STRUCT.get(proto_type)
    if fixed is not None:
        wire = _I64 if fixed.size == 8 else _I32
        return _Field(name, _K_FIXED, wire, repeated=repeated, fixed=fixed)
    if proto_type == "string":
        return _Field(name, _K_STRING, _LEN, repeated=repeated)
    if proto_type == "bytes":
        return _Field(name, _K_BYTES, _LEN, repeated=repeated)
    return _Field(name, _K_MESSAGE, _LEN, repeated=repeated, schema=_lazy(cls))


def _build(cls: type) -> _Schema:
    from betterproto.lib.google.protobuf import Duration, Timestamp

    meta = cls._betterproto  # type: ignore[attr-defined]
    schema = _Schema(cls, cls.__name__)
    template: dict[str, Any] = {"_serialized_on_wire": True}
    for name, info in meta.meta_by_field_name.items():
        template[name] = _PLACEHOLDER
        repeated = meta.default_gen[name] is list
        proto_type = info.proto_type
        if proto_type == "map":
            entry = _Schema(None, f"{cls.__name__}.{name} entry")
            key_type, value_type = info.map_types
            entry.fields[1] = _scalar("key", key_type, None)
            entry.fields[2] = _scalar("value", value_type, meta.cls_by_field.get(f"{name}.value"))
            field = _Field(name, _K_MAP, _LEN, repeated=True, schema=_const(entry))
        elif proto_type == "message" and (
            info.wraps or meta.cls_by_field[name] in (datetime, timedelta)
        ):
            schema.fallback = True
            sub = {datetime: Timestamp, timedelta: Duration}.get(meta.cls_by_field[name])
            if sub is not None:
                field = _Field(name, _K_MESSAGE, _LEN, schema=_lazy(sub))
            else:
                wrapper = _Schema(None, f"{cls.__name__}.{name} wrapper")
                wrapper.fields[1] = _scalar("value", info.wraps, None)
                field = _Field(name, _K_MESSAGE, _LEN, schema=_const(wrapper))
        else:
            field = _scalar(name, proto_type, meta.cls_by_field.get(name), repeated=repeated)
        field.group = info.group
        if info.group:
            schema.groups[info.group] = None
        schema.fields[info.number] = field
    for group, members in meta.oneof_field_by_group.items():
        names = tuple(f.name for f in members)
        for member in names:
            schema.siblings[member] = tuple(n for n in names if n != member)
        schema.groups.setdefault(group, None)
    template["_unknown_fields"] = b""
    schema.template = template
    return schema


def decode(cls: type[Any], data: bytes) -> Any:
    """``cls().parse(data)``, strictly: :class:`WireError` unless the data is well formed."""
    schema = _schema_of(cls)
    if schema.fallback:
        _decode(schema, data, 0, len(data), "", 0)
        return cls().parse(data)
    return _decode(schema, data, 0, len(data), "", 0)


def check(cls: type[Any], data: bytes) -> None:
    """Raise :class:`WireError` unless ``data`` is a well-formed ``cls`` message."""
    decode(cls, data)


def encode_varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes, i: int, end: int, where: str = "message") -> tuple[int, int]:
    """The varint at ``i`` (before ``end``): (value, next index); WireError if it is cut or
    too long."""
    return _varint(data, i, end, where)


def _varint(data: bytes, i: int, end: int, where: str) -> tuple[int, int]:
    """Decode the varint at ``i`` (before ``end``): (value, next index)."""
    if i < end:
        byte = data[i]
        if byte < 0x80:
            return byte, i + 1
    result = 0
    shift = 0
    while True:
        if i >= end:
            raise WireError(f"{where}: varint runs past the end of its message")
        byte = data[i]
        i += 1
        if shift == 63 and byte > 1:
            raise WireError(f"{where}: varint does not fit in 64 bits")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _default(field: _Field) -> Any:
    """A map entry's missing key or value, as betterproto fills it."""
    kind = field.kind
    if kind == _K_STRING:
        return ""
    if kind == _K_BYTES:
        return b""
    if kind == _K_FIXED:
        return 0.0 if field.fixed is not None and field.fixed.format in ("<d", "<f") else 0
    if kind == _K_MESSAGE:
        assert field.schema is not None
        cls = field.schema().cls
        assert cls is not None
        return cls()
    assert field.convert is not None
    return field.convert(0)


def _decode(schema: _Schema, data: bytes, i: int, end: int, prefix: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"{prefix or schema.name}: nested more than {MAX_DEPTH} levels deep")
    fields = schema.fields
    cls = schema.cls
    values: dict[str, Any] = dict(schema.template) if cls is not None else {}
    unknown = b""
    group_current: dict[str, Any] = dict(schema.groups)
    where_message = prefix or schema.name
    while i < end:
        tag_at = i
        byte = data[i]
        if byte < 0x80:
            tag = byte
            i += 1
        else:
            tag, i = _varint(data, i, end, f"{where_message}: tag at byte {tag_at}")
            if tag >= _U32:
                raise WireError(f"{where_message}: tag at byte {tag_at} does not fit in 32 bits")
        number = tag >> 3
        wire = tag & 7
        if number < 1 or number > _MAX_FIELD:
            raise WireError(f"{where_message}: invalid field number {number} at byte {tag_at}")
        field = fields.get(number)
        if field is None:
            i = _skip(data, i, end, wire, f"{where_message} field {number}")
            unknown += data[tag_at:i]
            continue
        name = field.name
        if wire != field.wire and not (wire == _LEN and field.repeated and field.wire != _LEN):
            raise WireError(
                f"{_path(prefix, name)} (field {number}): wire type {_WIRE_NAMES[wire]}, "
                f"expected {_WIRE_NAMES[field.wire]}"
            )
        kind = field.kind
        if wire == _LEN:
            if i < end and data[i] < 0x80:
                length = data[i]
                i += 1
            else:
                length, i = _varint(data, i, end, f"{_path(prefix, name)} length")
            stop = i + length
            if stop > end:
                raise WireError(
                    f"{_path(prefix, name)}: length {length} runs past the end of its message "
                    f"({end - i} bytes left)"
                )
            if kind == _K_STRING:
                chunk = data[i:stop]
                try:
                    value: Any = chunk.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise WireError(
                        f"{_path(prefix, name)}: not valid UTF-8 (byte {exc.start}: {exc.reason})"
                    ) from None
            elif kind == _K_MESSAGE:
                assert field.schema is not None
                sub = field.schema()
                value = _decode(sub, data, i, stop, _path(prefix, name), depth + 1)
                if sub.fallback and sub.cls is not None:
                    value = sub.cls().parse(data[i:stop])
                    value._serialized_on_wire = True
            elif kind == _K_MAP:
                assert field.schema is not None
                key, item = _decode(field.schema(), data, i, stop, _path(prefix, name), depth + 1)
                current = values[name]
                if current is _PLACEHOLDER:
                    current = values[name] = {}
                current[key] = item
                i = stop
                continue
            elif kind == _K_BYTES:
                value = data[i:stop]
            else:  # a packed repeated number
                items = _packed(field, data, i, stop, _path(prefix, name))
                current = values[name]
                if current is _PLACEHOLDER:
                    values[name] = items
                else:
                    current.extend(items)
                i = stop
                continue
            i = stop
        elif kind == _K_VARINT:
            if i < end and data[i] < 0x80:
                raw = data[i]
                i += 1
            else:
                raw, i = _varint(data, i, end, _path(prefix, name))
            assert field.convert is not None
            try:
                value = field.convert(raw)
            except _Range as exc:
                raise WireError(f"{_path(prefix, name)}: {exc}") from None
        else:  # fixed 32 or 64 bits
            assert field.fixed is not None
            size = field.fixed.size
            if i + size > end:
                raise WireError(
                    f"{_path(prefix, name)}: {size}-byte value runs past the end of its message"
                )
            value = field.fixed.unpack_from(data, i)[0]
            i += size
        if field.repeated:
            current = values[name]
            if current is _PLACEHOLDER:
                values[name] = [value]
            else:
                current.append(value)
        else:
            values[name] = value
            if field.group is not None:
                group_current[field.group] = name
                for other in schema.siblings.get(name, ()):
                    values[other] = _PLACEHOLDER
    if cls is None:  # a map entry or wrapper: (key, value)
        key_field, value_field = fields[1], fields.get(2)
        key = values.get(key_field.name, _PLACEHOLDER)
        if key is _PLACEHOLDER:
            key = _default(key_field)
        if value_field is None:
            return key, None
        item = values.get(value_field.name, _PLACEHOLDER)
        if item is _PLACEHOLDER:
            item = _default(value_field)
        return key, item
    message: Any = object.__new__(cls)
    if unknown:
        values["_unknown_fields"] = unknown
    values["_group_current"] = group_current
    _raw(message, "__dict__").update(values)
    return message


def _skip(data: bytes, i: int, end: int, wire: int, where: str) -> int:
    """Skip an unknown field's value (checking that it is whole); the index after it."""
    if wire == _VARINT:
        return _varint(data, i, end, where)[1]
    if wire in (_I64, _I32):
        size = 8 if wire == _I64 else 4
        if i + size > end:
            raise WireError(f"{where}: {size}-byte value runs past the end of its message")
        return i + size
    if wire == _LEN:
        length, i = _varint(data, i, end, f"{where} length")
        if i + length > end:
            raise WireError(
                f"{where}: length {length} runs past the end of its message ({end - i} bytes left)"
            )
        return i + length
    raise WireError(f"{where}: wire type {_WIRE_NAMES[wire]} is not accepted")


def _packed(field: _Field, data: bytes, i: int, stop: int, where: str) -> list[Any]:
    items: list[Any] = []
    if field.kind == _K_VARINT:
        assert field.convert is not None
        while i < stop:
            raw, i = _varint(data, i, stop, where)
            try:
                items.append(field.convert(raw))
            except _Range as exc:
                raise WireError(f"{where}: {exc}") from None
        return items
    assert field.fixed is not None
    size = field.fixed.size
    if (stop - i) % size:
        raise WireError(f"{where}: packed length {stop - i} is not a multiple of {size}")
    return [v[0] for v in field.fixed.iter_unpack(data[i:stop])]


def build(cls: type[Any], **fields: Any) -> Any:
    """``cls(**fields)`` without betterproto's slow constructor: the same message (every field
    not given unset, ``_serialized_on_wire`` true when any field is given, the ``oneof`` group
    of a given field selected). Fields must be given in their Python types, as to ``cls``;
    unknown names raise ``TypeError`` as ``cls`` would."""
    schema = _schema_of(cls)
    if schema.fallback:
        return cls(**fields)
    values = dict(schema.template)
    group_current: dict[str, Any] = dict(schema.groups)
    for name, value in fields.items():
        if name not in values or name.startswith("_"):
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}")
        if _is_empty_message_type(type(value)):
            value._serialized_on_wire = True  # as betterproto's __setattr__ marks it
        values[name] = value
    if schema.groups:
        for field in schema.fields.values():
            if field.group is not None and values[field.name] is not _PLACEHOLDER:
                group_current[field.group] = field.name
    values["_serialized_on_wire"] = any(
        values[f.name] is not _PLACEHOLDER for f in schema.fields.values()
    )
    values["_group_current"] = group_current
    message: Any = object.__new__(cls)
    _raw(message, "__dict__").update(values)
    return message


_empty_types: dict[type, bool] = {}


def _is_empty_message_type(value_type: type) -> bool:
    """Whether ``value_type`` is a message class without fields (cached: ``isinstance`` on a
    betterproto message costs a trip through its ``__getattribute__``)."""
    empty = _empty_types.get(value_type)
    if empty is None:
        meta: Any = getattr(value_type, "_betterproto", None)
        empty = issubclass(value_type, betterproto.Message) and not meta.meta_by_field_name
        _empty_types[value_type] = empty
    return empty


def field(message: Any, name: str, default: Any) -> Any:
    """``message.<name>``, or ``default`` when the field is unset, without betterproto's
    attribute access (about ten times slower, and it stores the default it computes)."""
    value = _raw(message, name)
    return default if value is _PLACEHOLDER else value
