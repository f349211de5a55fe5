"""Strict protobuf decoding (meridio.core.wire) against betterproto's own decoder.

Every message class of every API served is covered: generated messages must decode exactly as
betterproto decodes them, corrupted encodings must be refused or decode exactly as betterproto
does, and the known ways betterproto is lenient must be refused with a message naming the field.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from typing import Any

import betterproto
import pytest
from betterproto.lib.google.protobuf import Empty
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meridio.api
from meridio.api.ipam.v1 import Child, IpFamily, Subnet
from meridio.api.meridio.connect.v1 import ConnectRequest
from meridio.api.nsp.v1 import Conduit, Stream, Target, TargetResponse, TargetStatus, Trench
from meridio.core.wire import MAX_DEPTH, WireError, check, decode


def _message_classes() -> list[type[betterproto.Message]]:
    found: dict[str, type[betterproto.Message]] = {"Empty": Empty}
    for info in pkgutil.walk_packages(meridio.api.__path__, "meridio.api."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, betterproto.Message)
                and obj.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{name}"] = obj
    return [found[k] for k in sorted(found)]


MESSAGES = _message_classes()

_INTS = {
    "int32": st.integers(-(2**31), 2**31 - 1),
    "sint32": st.integers(-(2**31), 2**31 - 1),
    "sfixed32": st.integers(-(2**31), 2**31 - 1),
    "uint32": st.integers(0, 2**32 - 1),
    "fixed32": st.integers(0, 2**32 - 1),
    "int64": st.integers(-(2**63), 2**63 - 1),
    "sint64": st.integers(-(2**63), 2**63 - 1),
    "sfixed64": st.integers(-(2**63), 2**63 - 1),
    "uint64": st.integers(0, 2**64 - 1),
    "fixed64": st.integers(0, 2**64 - 1),
}


def _value(proto_type: str, cls: Any, depth: int) -> st.SearchStrategy[Any]:
    if proto_type in _INTS:
        return _INTS[proto_type]
    if proto_type == "bool":
        return st.booleans()
    if proto_type == "enum":
        return st.sampled_from(list(cls))
    if proto_type == "double":
        return st.floats(allow_nan=False)
    if proto_type == "float":
        return st.floats(allow_nan=False, width=32)
    if proto_type == "string":
        return st.text(max_size=12)
    if proto_type == "bytes":
        return st.binary(max_size=12)
    return messages(cls, depth + 1)


def messages(cls: type[betterproto.Message], depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of ``cls`` with any subset of their fields set, nested up to 4 levels."""
    meta = cls._betterproto
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in meta.meta_by_field_name.items():
        if depth >= 4 and info.proto_type in ("message", "map"):
            continue
        if info.proto_type == "map":
            key_type, value_type = info.map_types
            value_cls = meta.cls_by_field.get(f"{name}.value")
            strategy: st.SearchStrategy[Any] = st.dictionaries(
                _value(key_type, None, depth), _value(value_type, value_cls, depth), max_size=3
            )
        else:
            strategy = _value(info.proto_type, meta.cls_by_field.get(name), depth)
            if meta.default_gen[name] is list:
                strategy = st.lists(strategy, max_size=3)
        fields[name] = st.one_of(st.none(), strategy)
    return st.fixed_dictionaries(fields).map(
        lambda kw: cls(**{k: v for k, v in kw.items() if v is not None})
    )


def same(a: Any, b: Any) -> bool:
    """Deep equality of two decoded values, including how betterproto keeps messages."""
    if isinstance(a, betterproto.Message) or isinstance(b, betterproto.Message):
        if type(a) is not type(b):
            return False
        da, db = a.__dict__, b.__dict__
        return da.keys() == db.keys() and all(same(da[k], db[k]) for k in da)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and (a is b or a == b)


@st.composite
def encoded(draw: st.DrawFn) -> tuple[type[betterproto.Message], bytes]:
    cls = draw(st.sampled_from(MESSAGES))
    return cls, bytes(draw(messages(cls)))


def test_every_api_message_class_is_covered() -> None:
    names = {c.__name__ for c in MESSAGES}
    for expected in ("Child", "Prefix", "Target", "TargetResponse", "HealthCheckRequest"):
        assert expected in names
    assert len(MESSAGES) >= 30


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded())
def test_decodes_every_message_exactly_as_betterproto(case: tuple[type, bytes]) -> None:
    cls, data = case
    ours = decode(cls, data)
    theirs = cls().parse(data)
    assert same(ours, theirs), (ours, theirs)  # before anything reads (and so fills) defaults
    assert bytes(ours) == data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded(), st.data())
def test_corrupted_data_is_refused_or_decoded_exactly_as_betterproto(
    case: tuple[type, bytes], data: st.DataObject
) -> None:
    cls, original = case
    raw = bytearray(original)
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "random"]))
    if how == "truncate" and raw:
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    elif how == "flip" and raw:
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif how == "insert":
        raw[data.draw(st.integers(0, len(raw))) : 0] = data.draw(st.binary(min_size=1, max_size=3))
    else:
        raw = bytearray(data.draw(st.binary(max_size=40)))
    corrupt = bytes(raw)
    try:
        ours = decode(cls, corrupt)
    except WireError as exc:
        assert str(exc)
        return
    # Accepted: it must be what betterproto reads too, and encode to bytes both read alike and
    # that encode again to themselves. (Not always to an equal message: betterproto's encoder
    # drops a map entry with an empty key and value, b'"\x00' in a ConnectRequest.)
    theirs = cls().parse(corrupt)
    assert same(ours, theirs)
    again = bytes(ours)
    assert same(decode(cls, again), cls().parse(again))
    assert bytes(decode(cls, again)) == again


CHILD = Child(
    name="abc",
    subnet=Subnet(
        ip_family=IpFamily.IPV4, conduit=Conduit(name="c", trench=Trench(name="t")), node="n"
    ),
)
TARGET = Target(
    ips=["198.18.0.1/32"],
    context={"identifier": "1"},
    status=TargetStatus.DISABLED,
    stream=Stream(name="s", conduit=Conduit(name="c", trench=Trench(name="t"))),
)


@pytest.mark.parametrize(
    ("cls", "data", "words"),
    [
        # The cases: each of these betterproto decodes into something else.
        (Child, bytes(CHILD)[:-4], ["subnet", "length 13", "past the end"]),
        (Child, bytes(CHILD)[:-1], ["subnet", "past the end"]),
        (Child, b"\x0a\x10abc", ["name", "length 16"]),
        (Child, b"\x08\x05", ["name", "wire type varint", "length-delimited"]),
        (Child, b"\x10\x05", ["subnet", "wire type varint"]),
        (Child, b"\x0a\x02\xff\xfe", ["name", "UTF-8"]),
        (Target, b"\x12\x04\x0a\x02\xff\xff", ["context.key", "UTF-8"]),
        (Target, bytes(TARGET)[:-2], ["stream", "past the end"]),
        # Structure.
        (Child, b"\x0a\x80", ["name length", "varint runs past"]),
        (Child, b"\x00", ["invalid field number 0"]),
        (Child, b"\x0b", ["start-group"]),
        (Child, b"\x1d\x00\x00", ["Child field 3", "4-byte value"]),
        (Child, b"\x1a\x05ab", ["Child field 3", "length 5"]),
        (Child, b"\x18" + b"\xff" * 10 + b"\x01", ["varint"]),
        (Child, b"\x18" + b"\xff" * 9 + b"\x7f", ["does not fit in 64 bits"]),
        # Values that do not fit their type.
        (Target, b"\x18\x63", ["status", "99", "TargetStatus"]),
        (Subnet, b"\x18\x07", ["ip_family", "7"]),
        (TargetResponse, b"\x0a\x02\x18\x09", ["targets.status", "9"]),
        (Stream, b"\x18\x80\x80\x80\x80\x10", ["max_targets", "32 bits"]),
    ],
)
def test_refused_with_the_field_named(cls: type, data: bytes, words: list[str]) -> None:
    with pytest.raises(WireError) as err:
        decode(cls, data)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_unknown_fields_are_kept_and_must_be_whole() -> None:
    data = bytes(CHILD) + b"\x38\x05" + b"\x42\x01x"  # fields 7 (varint) and 8 (length 1)
    got = decode(Child, data)
    assert got.name == "abc" and got._unknown_fields == b"\x38\x05\x42\x01x"
    assert bytes(got) == data
    with pytest.raises(WireError, match="Child field 8"):
        decode(Child, bytes(CHILD) + b"\x42\x05x")


def test_nesting_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from meridio.core import wire

    assert MAX_DEPTH >= 8
    data = bytes(TARGET)  # Target > Stream > Conduit > Trench: 3 levels below the top
    assert decode(Target, data) == TARGET
    monkeypatch.setattr(wire, "MAX_DEPTH", 2)
    with pytest.raises(WireError, match=r"stream\.conduit\.trench: nested more than 2"):
        decode(Target, data)


def test_check_and_decode_of_an_empty_message() -> None:
    check(Empty, b"")
    assert decode(Empty, b"")._serialized_on_wire
    assert decode(Target, b"") == Target()


@st.composite
def constructed(draw: st.DrawFn) -> tuple[type[betterproto.Message], dict[str, Any]]:
    cls = draw(st.sampled_from(MESSAGES))
    message = draw(messages(cls))
    given_fields = {
        name: value
        for name, value in message.__dict__.items()
        if not name.startswith("_") and value is not betterproto.PLACEHOLDER
    }
    return cls, given_fields


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(constructed())
def test_build_is_the_constructor(case: tuple[type, dict[str, Any]]) -> None:
    from meridio.core.wire import build

    cls, fields = case
    ours = build(cls, **fields)
    theirs = cls(**fields)
    assert same(ours, theirs), (ours, theirs)
    assert bytes(ours) == bytes(theirs)


def test_build_refuses_unknown_fields() -> None:
    from meridio.core.wire import build

    with pytest.raises(TypeError, match="nope"):
        build(Target, nope=1)
    assert build(Target) == Target() and not build(Target)._serialized_on_wire


def test_an_empty_map_entry_is_read_as_betterproto_reads_it() -> None:
    # found by the test above: a map entry with no key and no value is {"": ""} for both
    # decoders (betterproto's encoder then leaves it out)
    data = b'*\x00"\x00'
    ours = decode(ConnectRequest, data)
    assert same(ours, ConnectRequest().parse(data))
    assert ours.extra_context == {"": ""}
