"""Tests for meridio.core.nspconfig: Meridio configuration loading, checks and watch filters."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import betterproto
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meridio.api.nsp.v1 import (
    Attractor,
    Conduit,
    Flow,
    Gateway,
    Stream,
    Trench,
    TrenchResponse,
    Vip,
)
from meridio.core.nspconfig import (
    DEFAULT_MAX_TARGETS,
    ConfigError,
    NspConfig,
    config_digest,
    filter_attractors,
    filter_conduits,
    filter_flows,
    filter_gateways,
    filter_streams,
    filter_trench,
    filter_vips,
    load_file,
    parse_config,
    parse_text,
    section_digests,
)

DATA = Path(__file__).parent / "data" / "nspconfig"
EXAMPLE = Path(__file__).parents[2] / "config" / "examples" / "meridio-configuration.yaml"
SHAPES = ("configmap.yaml", "data-strings.yaml", "inline.yaml")


@functools.cache
def fixture_config() -> NspConfig:
    return load_file(DATA / "inline.yaml")


@pytest.fixture
def cfg() -> NspConfig:
    return fixture_config()


def names(messages: Any) -> list[str]:
    return [m.name for m in messages]


# A small valid configuration (shape c) that the broken cases below patch.
BASE: dict[str, Any] = {
    "trench": {"name": "trench-a"},
    "conduits": {"items": [{"name": "c1", "trench": "trench-a"}]},
    "streams": {
        "items": [
            {"name": "s1", "conduit": "c1", "max-targets": 10},
            {"name": "s2", "conduit": "c1"},
            {"name": "stream-b", "conduit": "c1"},
        ]
    },
    "flows": {
        "items": [
            {
                "name": "flow-a",
                "stream": "s1",
                "vips": ["v4", "v6"],
                "protocols": ["tcp"],
                "source-subnets": ["192.0.2.0/24"],
                "destination-port-ranges": ["80"],
                "source-port-ranges": ["any"],
                "priority": 1,
                "byte-matches": ["tcp[2:2] = 80"],
            }
        ]
    },
    "vips": {
        "items": [
            {"name": "v4", "address": "203.0.113.1/32"},
            {"name": "vip1", "address": "2001:db8::7"},
            {"name": "v6", "address": "2001:db8::1/128"},
        ]
    },
    "attractors": {"items": [{"name": "a1", "vips": ["v4", "v6"], "gateways": ["g1"]}]},
    "gateways": {
        "items": [{"name": "g1", "address": "192.0.2.1", "ip-family": "ipv4", "protocol": "bgp"}]
    },
}


def patched(key: str, index: int, **changes: Any) -> dict[str, Any]:
    """BASE with item ``index`` of ``key`` updated (kebab-case via ``_``; None deletes)."""
    doc = copy.deepcopy(BASE)
    item = doc[key]["items"][index]
    for name, value in changes.items():
        field = name.replace("_", "-")
        if value is None:
            item.pop(field, None)
        else:
            item[field] = value
    return doc


def with_key(key: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc[key] = value
    return doc


def test_base_is_valid() -> None:
    cfg = parse_config(BASE)
    assert names(cfg.streams) == ["s1", "s2", "stream-b"]


# ---------------------------------------------------------------------------------------------
# Shapes and the example


def test_three_shapes_give_identical_configs() -> None:
    configs = [load_file(DATA / name) for name in SHAPES]
    assert configs[0] == configs[1] == configs[2]
    assert len({config_digest(c) for c in configs}) == 1
    # Mixed shape (b) and (c) in one mapping works too.
    strings = yaml.safe_load((DATA / "data-strings.yaml").read_text())
    inline = yaml.safe_load((DATA / "inline.yaml").read_text())
    mixed = {**strings, "flows": inline["flows"], "vips": inline["vips"]}
    assert parse_config(mixed) == configs[0]


def test_fixture_conversion(cfg: NspConfig) -> None:
    assert cfg.trench == Trench(name="trench-a")
    assert names(cfg.conduits) == ["conduit-a", "conduit-b"]
    assert names(cfg.streams) == ["stream-a", "stream-b", "stream-c"]
    assert names(cfg.flows) == ["flow-a-tcp", "flow-a-udp", "flow-b-sctp", "flow-c-bytes"]
    assert names(cfg.attractors) == ["attractor-a", "attractor-b"]

    # Nested references are the full messages, every trench the configured one.
    tcp = cfg.flows[0]
    assert tcp.stream == cfg.streams[0]
    assert tcp.stream.conduit == cfg.conduits[0]
    assert tcp.stream.conduit.trench.name == "trench-a"
    assert [v.address for v in tcp.vips] == ["203.0.113.1/32", "2001:db8::1/128"]
    assert all(v.trench.name == "trench-a" for v in cfg.vips)
    assert cfg.attractors[0].gateways == [cfg.gateways[0], cfg.gateways[1]]
    assert cfg.attractors[0].trench.name == "trench-a"

    # Normalisation.
    assert tcp.destination_port_ranges == ["80", "5000-5100"]
    udp = cfg.flows[1]
    assert udp.protocols == ["udp"]
    assert udp.destination_port_ranges == ["53"]
    assert udp.priority == 0
    assert cfg.vips[2].address == "203.0.113.2/32"
    assert cfg.streams[1].max_targets == DEFAULT_MAX_TARGETS
    assert cfg.streams[2].max_targets == 8
    assert cfg.flows[3].byte_matches == ["tcp[2:2] = 5001", "tcp[13:1] & 0x02 = 0x02"]

    nat = cfg.conduits[0].destination_port_nats[0]
    assert (nat.port, nat.target_port, nat.protocol) == (80, 8080, "tcp")
    assert names(nat.vips) == ["vip-a-v4", "vip-a-v6"]

    gw4, gw6, static = cfg.gateways
    assert (gw4.remote_asn, gw4.local_asn, gw4.hold_time) == (4248829953, 8103, 24)
    assert (gw4.bgp_auth.key_name, gw4.bgp_auth.key_source) == ("bgp-key", "/etc/meridio/bgp-auth")
    assert gw6.ip_family == "ipv6"
    assert gw6.bfd
    assert (gw6.bfd_spec.min_tx, gw6.bfd_spec.min_rx, gw6.bfd_spec.multiplier) == (300, 300, 5)
    assert static.protocol == "static"


def test_example_file_loads() -> None:
    cfg = load_file(EXAMPLE)
    assert cfg.trench is not None
    assert cfg.trench.name == "trench-a"
    assert names(cfg.conduits) == ["load-balancer"]
    assert names(cfg.streams) == ["stream-a", "stream-b"]
    assert cfg.streams[0].max_targets == 100
    assert {p for f in cfg.flows for p in f.protocols} == {"tcp", "udp", "sctp"}
    assert cfg.attractors
    assert cfg.gateways


def test_missing_keys_are_empty_and_default_trench() -> None:
    assert parse_config(None) == NspConfig()
    assert parse_text("") == NspConfig()
    doc = {"vips": {"items": [{"name": "v", "address": "203.0.113.9"}]}}
    cfg = parse_config(doc, default_trench="trench-x")
    assert cfg.trench == Trench(name="trench-x")
    assert cfg.vips[0].trench.name == "trench-x"
    assert cfg.conduits == cfg.streams == cfg.flows == ()
    # Without a trench anywhere, items keep their own (possibly empty) trench.
    cfg = parse_config(doc)
    assert cfg.trench is None
    assert cfg.vips[0].trench == Trench()
    # The trench key wins over the default.
    assert parse_config(BASE, default_trench="other").trench == Trench(name="trench-a")
    # Empty strings in a ConfigMap are empty sections.
    assert parse_config({"flows": "", "vips": "items: []"}) == NspConfig()


# ---------------------------------------------------------------------------------------------
# Errors: each names the key and the item

BROKEN: list[tuple[str, Any, list[str]]] = [
    # (id, document, fragments the message must contain)
    ("unknown-key", with_key("flowz", {"items": []}), ['unknown key "flowz"']),
    ("unknown-list-field", with_key("vips", {"itemz": []}), ["vips: ", 'unknown field "itemz"']),
    ("items-not-list", with_key("streams", {"items": {"a": 1}}), ["streams: items: "]),
    ("section-not-mapping", with_key("flows", [1]), ["flows: expected a mapping"]),
    ("trench-no-name", with_key("trench", {}), ["trench: ", "`name`"]),
    ("trench-empty", with_key("trench", {"name": ""}), ["trench: name must not be empty"]),
    (
        "unknown-field",
        patched("flows", 0, destination_ports=["80"]),
        ['flows: item 0 ("flow-a")', "destination-ports"],
    ),
    (
        "wrong-type",
        patched("streams", 1, max_targets="many"),
        ['streams: item 1 ("s2")', "max-targets: Expected `int | null`, got `str`"],
    ),
    (
        "missing-required",
        patched("vips", 1, address=None),
        ['vips: item 1 ("vip1")', "`address`"],
    ),
    ("empty-name", patched("streams", 1, name=""), ["streams: item 1: name must not be empty"]),
    (
        "duplicate-name",
        patched("streams", 1, name="s1"),
        ['streams: item 1 ("s1")', 'duplicate name "s1" (also item 0)'],
    ),
    (
        "unknown-stream",
        patched("flows", 0, stream="stream-x"),
        ['flows: item 0 ("flow-a")', 'unknown stream "stream-x"'],
    ),
    (
        "unknown-flow-vip",
        patched("flows", 0, vips=["v4", "vip-x"]),
        ['flows: item 0 ("flow-a")', 'unknown vip "vip-x"'],
    ),
    (
        "repeated-flow-vip",
        patched("flows", 0, vips=["v4", "v4"]),
        ['flows: item 0 ("flow-a")', 'vip "v4" is listed twice'],
    ),
    (
        "unknown-conduit",
        patched("streams", 0, conduit="c9"),
        ['streams: item 0 ("s1")', 'unknown conduit "c9"'],
    ),
    (
        "unknown-attractor-vip",
        patched("attractors", 0, vips=["nope"]),
        ['attractors: item 0 ("a1"): unknown vip "nope"'],
    ),
    (
        "unknown-attractor-gateway",
        patched("attractors", 0, gateways=["g9"]),
        ['attractors: item 0 ("a1"): unknown gateway "g9"'],
    ),
    (
        "repeated-attractor-gateway",
        patched("attractors", 0, gateways=["g1", "g1"]),
        ['attractors: item 0 ("a1"): gateway "g1" is listed twice'],
    ),
    (
        "unknown-port-nat-vip",
        patched(
            "conduits",
            0,
            destination_port_nats=[
                {"port": 80, "target-port": 8080, "vips": ["vx"], "protocol": "tcp"}
            ],
        ),
        ['conduits: item 0 ("c1"): destination-port-nats[0]: unknown vip "vx"'],
    ),
    (
        "port-nat-protocol",
        patched(
            "conduits",
            0,
            destination_port_nats=[
                {"port": 80, "target-port": 8080, "vips": ["v4"], "protocol": "icmp"}
            ],
        ),
        ['conduits: item 0 ("c1")', 'destination-port-nats[0]: protocol: "icmp"'],
    ),
    (
        "port-nat-port",
        patched(
            "conduits",
            0,
            destination_port_nats=[
                {"port": 0, "target-port": 8080, "vips": ["v4"], "protocol": "tcp"}
            ],
        ),
        ['conduits: item 0 ("c1")', "destination-port-nats[0]: port must be 1..65535, got 0"],
    ),
    (
        "port-nat-collision",
        patched(
            "conduits",
            0,
            destination_port_nats=[
                {"port": 80, "target-port": 8080, "vips": ["v4"], "protocol": "tcp"},
                {"port": 80, "target-port": 8081, "vips": ["v4"], "protocol": "TCP"},
            ],
        ),
        ['conduits: item 0 ("c1")', "destination-port-nats[1]", "already NATed"],
    ),
    (
        "max-targets-zero",
        patched("streams", 2, max_targets=0),
        ['streams: item 2 ("stream-b"): max-targets must be 1..10000, got 0'],
    ),
    (
        "max-targets-big",
        patched("streams", 2, max_targets=10001),
        ['streams: item 2 ("stream-b")', "got 10001"],
    ),
    (
        "vip-not-cidr",
        patched("vips", 1, address="1.2.3"),
        ['vips: item 1 ("vip1"): address "1.2.3" is not a CIDR'],
    ),
    (
        "vip-range",
        patched("vips", 1, address="203.0.113.0/24"),
        ['vips: item 1 ("vip1")', "single address (/32)"],
    ),
    (
        "vip-other-trench",
        patched("vips", 1, trench="trench-b"),
        ['vips: item 1 ("vip1")', 'trench "trench-b" is not the configured trench "trench-a"'],
    ),
    (
        "subnet",
        patched("flows", 0, source_subnets=["192.0.2.0/33"]),
        ['flows: item 0 ("flow-a")', 'source-subnets: "192.0.2.0/33" is not a CIDR'],
    ),
    (
        "port-range-syntax",
        patched("flows", 0, destination_port_ranges=["80:90"]),
        ['flows: item 0 ("flow-a")', 'destination-port-ranges: "80:90"'],
    ),
    (
        "port-range-big",
        patched("flows", 0, source_port_ranges=["1-65536"]),
        ['flows: item 0 ("flow-a")', 'source-port-ranges: "1-65536" is outside 0..65535'],
    ),
    (
        "port-range-reversed",
        patched("flows", 0, destination_port_ranges=["90-80"]),
        ['flows: item 0 ("flow-a")', '"90-80" starts after it ends'],
    ),
    (
        "protocol",
        patched("flows", 0, protocols=["tcp", "icmp"]),
        ['flows: item 0 ("flow-a")', 'protocols: "icmp" is not one of tcp, udp, sctp'],
    ),
    (
        "priority",
        patched("flows", 0, priority=-1),
        ['flows: item 0 ("flow-a"): priority must be >= 0, got -1'],
    ),
    (
        "byte-match-syntax",
        patched("flows", 0, byte_matches=["ip[2:2] = 1"]),
        ['flows: item 0 ("flow-a")', 'byte-matches: "ip[2:2] = 1"'],
    ),
    (
        "byte-match-length",
        patched("flows", 0, byte_matches=["tcp[2:3] = 1"]),
        ['flows: item 0 ("flow-a")', "length must be 1, 2 or 4, got 3"],
    ),
    (
        "byte-match-value",
        patched("flows", 0, byte_matches=["udp[0:1] = 0x100"]),
        ['flows: item 0 ("flow-a")', "does not fit in 1 byte"],
    ),
    (
        "gateway-protocol",
        patched("gateways", 0, protocol="ospf"),
        ['gateways: item 0 ("g1"): protocol must be bgp or static, got "ospf"'],
    ),
    (
        "gateway-family",
        patched("gateways", 0, ip_family="ipv6"),
        ['gateways: item 0 ("g1")', 'ip-family "ipv6" does not match address "192.0.2.1"'],
    ),
    (
        "gateway-family-name",
        patched("gateways", 0, ip_family="dualstack"),
        ['gateways: item 0 ("g1")', 'ip-family must be ipv4 or ipv6, got "dualstack"'],
    ),
    (
        "gateway-address",
        patched("gateways", 0, address="192.0.2.0/24"),
        ['gateways: item 0 ("g1")', 'address "192.0.2.0/24" is not an IP address'],
    ),
    (
        "gateway-port",
        patched("gateways", 0, remote_port=70000),
        ['gateways: item 0 ("g1"): remote-port must be 1..65535, got 70000'],
    ),
    (
        "gateway-local-port-zero",
        patched("gateways", 0, local_port=0),
        [
            'gateways: item 0 ("g1"): local-port must be 1..65535, got 0',
            "leave local-port out for the default",
        ],
    ),
    (
        "gateway-remote-port-zero",
        patched("gateways", 0, remote_port=0),
        ['gateways: item 0 ("g1"): remote-port must be 1..65535, got 0'],
    ),
    (
        "gateway-local-asn-zero",
        patched("gateways", 0, local_asn=0),
        [
            'gateways: item 0 ("g1"): local-asn must be 1..4294967295, got 0',
            "leave local-asn out for the default",
        ],
    ),
    (
        "gateway-remote-asn-zero",
        patched("gateways", 0, remote_asn=0),
        ['gateways: item 0 ("g1"): remote-asn must be 1..4294967295, got 0'],
    ),
    (
        "gateway-asn-big",
        patched("gateways", 0, remote_asn=2**32),
        ['gateways: item 0 ("g1"): remote-asn must be 1..4294967295, got 4294967296'],
    ),
    (
        "gateway-asn-negative",
        patched("gateways", 0, local_asn=-1),
        ['gateways: item 0 ("g1"): local-asn must be 1..4294967295, got -1'],
    ),
    (
        "gateway-asn-zero-static",  # BGP fields of a static gateway are ignored, not unchecked
        patched("gateways", 0, protocol="static", local_asn=0),
        ['gateways: item 0 ("g1"): local-asn must be 1..4294967295, got 0'],
    ),
    (
        "gateway-hold-time",
        patched("gateways", 0, hold_time=2),
        ['gateways: item 0 ("g1"): hold-time must be 3..65535, got 2'],
    ),
    (
        "gateway-hold-time-one",
        patched("gateways", 0, hold_time=1),
        ['gateways: item 0 ("g1"): hold-time must be 3..65535, got 1'],
    ),
    (
        "gateway-hold-time-big",
        patched("gateways", 0, hold_time=65536),
        ['gateways: item 0 ("g1"): hold-time must be 3..65535, got 65536'],
    ),
    (
        "gateway-min-tx-zero",
        patched("gateways", 0, bfd=True, min_tx=0),
        [
            'gateways: item 0 ("g1"): min-tx must be 1..4294967, got 0',
            "leave min-tx out for the default",
        ],
    ),
    (
        "gateway-min-rx-zero",
        patched("gateways", 0, bfd=True, min_rx=0),
        ['gateways: item 0 ("g1"): min-rx must be 1..4294967, got 0'],
    ),
    (
        "gateway-min-rx-zero-without-bfd",
        patched("gateways", 0, bfd=False, min_rx=0),
        ['gateways: item 0 ("g1"): min-rx must be 1..4294967, got 0'],
    ),
    (
        "gateway-min-tx-big",  # BFD's 32-bit microseconds
        patched("gateways", 0, bfd=True, min_tx=4294968),
        ['gateways: item 0 ("g1"): min-tx must be 1..4294967, got 4294968'],
    ),
    (
        "gateway-multiplier-zero",
        patched("gateways", 0, bfd=True, multiplier=0),
        ['gateways: item 0 ("g1"): multiplier must be 1..255, got 0'],
    ),
    (
        "gateway-multiplier-big",
        patched("gateways", 0, bfd=True, multiplier=256),
        ['gateways: item 0 ("g1"): multiplier must be 1..255, got 256'],
    ),
    (
        "gateway-asn-type",
        patched("gateways", 0, local_asn="8103"),
        ['gateways: item 0 ("g1"): local-asn: Expected `int | null`, got `str`'],
    ),
    (
        "gateway-bgp-auth",
        patched("gateways", 0, bgp_auth={"key": "k"}),
        ['gateways: item 0 ("g1"): bgp-auth needs both "key" and "source"'],
    ),
    (
        "gateway-bgp-auth-no-key",
        patched("gateways", 0, bgp_auth={"source": "/etc/meridio/bgp-auth"}),
        ['gateways: item 0 ("g1"): bgp-auth needs both'],
    ),
    (
        "gateway-bgp-auth-relative-source",
        patched("gateways", 0, bgp_auth={"key": "k", "source": "bgp-secret"}),
        [
            'gateways: item 0 ("g1"): bgp-auth: source must be an absolute path',
            'got "bgp-secret"',
        ],
    ),
    (
        "gateway-bgp-auth-key-path",
        patched("gateways", 0, bgp_auth={"key": "../k", "source": "/etc/meridio/bgp-auth"}),
        ['gateways: item 0 ("g1"): bgp-auth: key must be a file name', 'got "../k"'],
    ),
    (
        "gateway-bgp-auth-key-dotdot",
        patched("gateways", 0, bgp_auth={"key": "..", "source": "/etc/meridio/bgp-auth"}),
        ['gateways: item 0 ("g1"): bgp-auth: key must be a file name'],
    ),
    (
        "gateway-bgp-auth-field",
        patched("gateways", 0, bgp_auth={"key": "k", "secret": "s"}),
        ['gateways: item 0 ("g1")', "bgp-auth: ", "`secret`"],
    ),
    (
        "item-not-mapping",
        with_key("gateways", {"items": ["g1"]}),
        ["gateways: item 0: expected a mapping"],
    ),
]


@pytest.mark.parametrize(("doc", "fragments"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_errors_name_key_and_item(doc: Any, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_gateway_missing_numbers_are_defaults_and_limits_are_accepted() -> None:
    """A missing key is 0 (the frontend's default); hold-time 0 is the default too; the
    limits themselves are valid; BGP fields of a static gateway are kept and ignored."""
    (gw,) = parse_config(BASE).gateways
    assert (gw.local_asn, gw.remote_asn, gw.local_port, gw.remote_port) == (0, 0, 0, 0)
    assert (gw.hold_time, gw.bfd) == (0, False)
    assert not betterproto.serialized_on_wire(gw.bfd_spec)
    doc = patched("gateways", 0, hold_time=0)  # an explicit 0 hold-time is the default
    for name in ("local-asn", "remote-asn", "local-port", "remote-port", "min-tx", "multiplier"):
        doc["gateways"]["items"][0][name] = None  # written as null: missing
    assert parse_config(doc).gateways == (gw,)
    (gw,) = parse_config(
        patched(
            "gateways",
            0,
            local_asn=1,
            remote_asn=4294967295,
            local_port=1,
            remote_port=65535,
            hold_time=3,
            bfd=True,
            min_tx=1,
            min_rx=4294967,
            multiplier=255,
        )
    ).gateways
    assert (gw.local_asn, gw.remote_asn, gw.local_port, gw.remote_port) == (1, 4294967295, 1, 65535)
    assert gw.hold_time == 3
    assert (gw.bfd_spec.min_tx, gw.bfd_spec.min_rx, gw.bfd_spec.multiplier) == (1, 4294967, 255)
    (gw,) = parse_config(patched("gateways", 0, bfd=True)).gateways
    assert (gw.bfd_spec.min_tx, gw.bfd_spec.min_rx, gw.bfd_spec.multiplier) == (0, 0, 0)
    (gw,) = parse_config(
        patched("gateways", 0, protocol="static", local_asn=8103, hold_time=90, bfd=True)
    ).gateways
    assert (gw.protocol, gw.local_asn, gw.hold_time, gw.bfd) == ("static", 8103, 90, True)
    (gw,) = parse_config(
        patched("gateways", 0, bgp_auth={"key": "md5", "source": "/run/secrets/bgp"})
    ).gateways
    assert (gw.bgp_auth.key_name, gw.bgp_auth.key_source) == ("md5", "/run/secrets/bgp")


def test_error_attributes() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(patched("streams", 2, max_targets=0))
    assert (info.value.key, info.value.index, info.value.name) == ("streams", 2, "stream-b")


def test_errors_in_string_values_and_manifests() -> None:
    message = r"^flows: YAML error at line 3, column 10: mapping values are not allowed"
    with pytest.raises(ConfigError, match=message):
        parse_config({"flows": "items:\n- name: a\n  vips: x: y\n"})
    with pytest.raises(ConfigError, match=r"^streams: ConfigMap data values must be strings"):
        parse_config({"kind": "ConfigMap", "data": {"streams": {"items": []}}})
    with pytest.raises(ConfigError, match=r'^kind: expected "ConfigMap", got "Secret"'):
        parse_config({"apiVersion": "v1", "kind": "Secret", "data": {}})
    with pytest.raises(ConfigError, match=r'unknown key "conduit"'):
        parse_config({"kind": "ConfigMap", "data": {"conduit": "items: []"}})
    with pytest.raises(ConfigError, match=r"must be a mapping, got a list"):
        parse_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1: .*duplicate key 'vips'"):
        parse_text("vips: {items: []}\nflows: {items: []}\nvips: {items: []}\n")


def test_load_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=rf"^{missing}: cannot read"):
        load_file(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trench:\n  name: a\n flows: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{bad}: YAML error at line 3, column 2"):
        load_file(bad)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"trench: \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"^{binary}: not valid UTF-8"):
        load_file(binary)
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(yaml.safe_dump(patched("flows", 0, stream="stream-x")), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf'^{invalid}: flows: item 0 \("flow-a"\)') as info:
        load_file(invalid)
    assert info.value.key == "flows"


# ---------------------------------------------------------------------------------------------
# Stream lookups (target registration checks)


def test_stream_by_key_and_max_targets(cfg: NspConfig) -> None:
    stream = cfg.stream_by_key("trench-a", "conduit-b", "stream-c")
    assert stream is cfg.streams[2]
    assert cfg.stream_by_key("trench-a", "conduit-a", "stream-c") is None
    assert cfg.stream_by_key("trench-b", "conduit-b", "stream-c") is None
    assert cfg.stream_by_key("", "", "stream-c") is None

    request = Stream(name="stream-c", conduit=Conduit(name="conduit-b", trench=Trench("trench-a")))
    assert cfg.max_targets_of(request) == 8
    request.max_targets = 5000  # the request's own value does not count
    assert cfg.max_targets_of(request) == 8
    assert cfg.max_targets_of(Stream(name="stream-c")) is None
    assert cfg.max_targets_of(cfg.streams[1]) == DEFAULT_MAX_TARGETS


# ---------------------------------------------------------------------------------------------
# Watch filters


def test_filter_trench(cfg: NspConfig) -> None:
    assert filter_trench(cfg, Trench()).trench == Trench(name="trench-a")
    assert filter_trench(cfg, None).trench == Trench(name="trench-a")
    assert filter_trench(cfg, Trench(name="trench-a")).trench.name == "trench-a"
    assert filter_trench(cfg, Trench(name="trench-b")) == TrenchResponse()
    assert bytes(filter_trench(NspConfig(), Trench())) == b""


def test_filter_conduits(cfg: NspConfig) -> None:
    assert names(filter_conduits(cfg, Conduit()).conduits) == ["conduit-a", "conduit-b"]
    assert names(filter_conduits(cfg).conduits) == ["conduit-a", "conduit-b"]
    assert names(filter_conduits(cfg, Conduit(name="conduit-b")).conduits) == ["conduit-b"]
    request = Conduit(name="conduit-a", trench=Trench(name="trench-a"))
    assert names(filter_conduits(cfg, request).conduits) == ["conduit-a"]
    assert filter_conduits(cfg, Conduit(trench=Trench(name="trench-b"))).conduits == []
    assert filter_conduits(cfg, Conduit(name="nope")).conduits == []


def test_filter_streams(cfg: NspConfig) -> None:
    every = ["stream-a", "stream-b", "stream-c"]
    assert names(filter_streams(cfg, Stream()).streams) == every
    by_conduit = Stream(conduit=Conduit(name="conduit-a"))
    assert names(filter_streams(cfg, by_conduit).streams) == ["stream-a", "stream-b"]
    full = Stream(name="stream-c", conduit=Conduit(name="conduit-b", trench=Trench("trench-a")))
    assert names(filter_streams(cfg, full).streams) == ["stream-c"]
    wrong_parent = Stream(name="stream-c", conduit=Conduit(name="conduit-a"))
    assert filter_streams(cfg, wrong_parent).streams == []
    other_trench = Stream(conduit=Conduit(trench=Trench(name="trench-b")))
    assert filter_streams(cfg, other_trench).streams == []
    # Fields other than names are ignored.
    assert names(filter_streams(cfg, Stream(max_targets=1)).streams) == every


def test_filter_flows(cfg: NspConfig) -> None:
    every = ["flow-a-tcp", "flow-a-udp", "flow-b-sctp", "flow-c-bytes"]
    assert names(filter_flows(cfg, Flow()).flows) == every
    assert names(filter_flows(cfg, Flow(stream=Stream(name="stream-a"))).flows) == [
        "flow-a-tcp",
        "flow-a-udp",
    ]
    by_conduit = Flow(stream=Stream(conduit=Conduit(name="conduit-a")))
    assert names(filter_flows(cfg, by_conduit).flows) == every[:3]
    assert names(filter_flows(cfg, Flow(name="flow-c-bytes")).flows) == ["flow-c-bytes"]
    mismatch = Flow(name="flow-c-bytes", stream=Stream(name="stream-a"))
    assert filter_flows(cfg, mismatch).flows == []
    other_trench = Flow(stream=Stream(conduit=Conduit(trench=Trench(name="trench-b"))))
    assert filter_flows(cfg, other_trench).flows == []
    assert names(filter_flows(cfg, Flow(protocols=["udp"])).flows) == every  # ignored


def test_filter_vips(cfg: NspConfig) -> None:
    assert names(filter_vips(cfg, Vip()).vips) == ["vip-a-v4", "vip-a-v6", "vip-b-v4"]
    assert names(filter_vips(cfg, Vip(name="vip-a-v6")).vips) == ["vip-a-v6"]
    assert names(filter_vips(cfg, Vip(trench=Trench(name="trench-a"))).vips) == names(cfg.vips)
    assert filter_vips(cfg, Vip(trench=Trench(name="trench-b"))).vips == []
    assert filter_vips(cfg, Vip(name="vip-x")).vips == []


def test_filter_attractors(cfg: NspConfig) -> None:
    assert names(filter_attractors(cfg, Attractor()).attractors) == ["attractor-a", "attractor-b"]
    only_b = filter_attractors(cfg, Attractor(name="attractor-b", trench=Trench("trench-a")))
    assert names(only_b.attractors) == ["attractor-b"]
    assert names(only_b.attractors[0].gateways) == ["gateway-static"]
    assert filter_attractors(cfg, Attractor(trench=Trench(name="trench-b"))).attractors == []


def test_filter_gateways(cfg: NspConfig) -> None:
    every = ["gateway-v4", "gateway-v6", "gateway-static"]
    assert names(filter_gateways(cfg, Gateway()).gateways) == every
    assert names(filter_gateways(cfg, Gateway(name="gateway-v6")).gateways) == ["gateway-v6"]
    assert filter_gateways(cfg, Gateway(trench=Trench(name="trench-b"))).gateways == []
    assert names(filter_gateways(cfg, Gateway(address="192.0.2.99")).gateways) == every


def test_filter_responses_serialize(cfg: NspConfig) -> None:
    response = filter_flows(cfg, Flow(name="flow-a-tcp"))
    again = type(response)().parse(bytes(response))
    assert again == response
    assert again.flows[0].stream.conduit.trench.name == "trench-a"


# ---------------------------------------------------------------------------------------------
# Digest


def test_digest_stable_across_shapes_and_spellings() -> None:
    digests = {config_digest(load_file(DATA / name)) for name in SHAPES}
    assert len(digests) == 1
    base = config_digest(parse_config(BASE))
    assert config_digest(parse_config(copy.deepcopy(BASE))) == base
    # Spellings that normalise to the same messages give the same digest.
    same = patched("vips", 0, address="203.0.113.1")
    same["flows"]["items"][0]["protocols"] = ["TCP"]
    assert config_digest(parse_config(same)) == base
    # Item order does not count.
    reordered = copy.deepcopy(BASE)
    reordered["streams"]["items"].reverse()
    assert config_digest(parse_config(reordered)) == base
    assert len(base) == 64


@pytest.mark.parametrize(
    ("doc", "changed"),
    [
        (patched("streams", 0, max_targets=11), {"streams", "flows"}),
        (patched("vips", 0, address="203.0.113.5"), {"vips", "flows", "attractors"}),
        (patched("flows", 0, priority=2), {"flows"}),
        (patched("gateways", 0, hold_time=30), {"gateways", "attractors"}),
        (with_key("trench", {"name": "trench-a"}), set()),
    ],
    ids=["max-targets", "vip-address", "priority", "hold-time", "same"],
)
def test_digest_changes_with_content(doc: dict[str, Any], changed: set[str]) -> None:
    before, after = parse_config(BASE), parse_config(doc)
    assert (config_digest(before) != config_digest(after)) == bool(changed)
    old, new = section_digests(before), section_digests(after)
    assert {key for key in old if old[key] != new[key]} == changed


def test_digest_changes_with_trench() -> None:
    doc = {"vips": {"items": [{"name": "v", "address": "203.0.113.9"}]}}
    digests = {
        config_digest(parse_config(doc)),
        config_digest(parse_config(doc, default_trench="a")),
        config_digest(parse_config(doc, default_trench="b")),
    }
    assert len(digests) == 3


# ---------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=60, deadline=None)
@given(
    low=st.integers(0, 65535),
    high=st.integers(0, 65535),
    spaces=st.sampled_from(["", " "]),
)
def test_port_ranges_property(low: int, high: int, spaces: str) -> None:
    text = f"{low}{spaces}-{spaces}{high}"
    doc = patched("flows", 0, destination_port_ranges=[text, low])
    if low <= high:
        flow = parse_config(doc).flows[0]
        assert flow.destination_port_ranges == [f"{low}-{high}", str(low)]
    else:
        with pytest.raises(ConfigError, match="starts after it ends"):
            parse_config(doc)


@settings(max_examples=40, deadline=None)
@given(
    request_names=st.tuples(
        st.sampled_from(["", "flow-a-tcp", "flow-c-bytes", "x"]),
        st.sampled_from(["", "stream-a", "stream-c", "x"]),
        st.sampled_from(["", "conduit-a", "conduit-b", "x"]),
        st.sampled_from(["", "trench-a", "x"]),
    )
)
def test_flow_filter_property(request_names: tuple[str, str, str, str]) -> None:
    cfg = fixture_config()
    flow, stream, conduit, trench = request_names
    request = Flow(
        name=flow,
        stream=Stream(name=stream, conduit=Conduit(name=conduit, trench=Trench(name=trench))),
    )
    got = filter_flows(cfg, request).flows

    def ok(wanted: str, actual: str) -> bool:
        return wanted in ("", actual)

    expected = [
        f
        for f in cfg.flows
        if ok(flow, f.name)
        and ok(stream, f.stream.name)
        and ok(conduit, f.stream.conduit.name)
        and ok(trench, f.stream.conduit.trench.name)
    ]
    assert got == expected


def test_a_configmap_mounted_as_a_directory_loads_like_the_manifest(tmp_path: Path) -> None:
    """Kubernetes mounts each ConfigMap key as a file; the NSP accepts that directory."""
    import yaml

    manifest = yaml.safe_load((DATA / "configmap.yaml").read_text())
    mount = tmp_path / "config"
    mount.mkdir()
    for key, value in manifest["data"].items():
        (mount / key).write_text(value)
    (mount / "..data").mkdir()  # the mount's own bookkeeping is skipped
    assert config_digest(load_file(mount)) == config_digest(load_file(DATA / "configmap.yaml"))
    (mount / "streams").write_text("items:\n- name: s\n  conduit: nope\n")
    with pytest.raises(ConfigError, match=r"config: streams"):
        load_file(mount)


# --- whole files only: emptiness, cut-short files, settling, ConfigMap mounts -----------------


def test_a_file_cut_short_after_a_key_is_refused() -> None:
    """What a poller sees mid-write: "conduits:" with nothing after it (null) is refused."""
    text = "trench:\n  name: trench-a\nconduits:\n"
    with pytest.raises(ConfigError, match="conduits: has no value"):
        parse_text(text)
    with pytest.raises(ConfigError, match="trench: has no value"):
        parse_text("trench:\n")
    # A ConfigMap's values are strings: an empty one still means "none" (Meridio's reading).
    assert parse_config({"conduits": "", "vips": "# none\n"}) == NspConfig()


@pytest.mark.parametrize(
    ("source", "empty"),
    [
        ("", True),
        ("   \n\n\t\n", True),
        ("# just a comment\n  # another\n", True),
        ({}, True),
        ({"vips": "", "streams": "# nothing\n"}, True),
        ("trench: {name: a}\n", False),
        ("{}", False),
        ({"vips": "items: []"}, False),
    ],
)
def test_source_is_empty(source: Any, empty: bool) -> None:
    from meridio.core.nspconfig import source_is_empty

    assert source_is_empty(source) is empty


def test_names_must_be_names() -> None:
    cases = {
        "trench: {name: ' '}": "trench: name ' ' must not contain whitespace",
        "conduits: {items: [{name: '../c'}]}": "conduits: item 0 (\"../c\"): name '../c' must",
        'vips: {items: [{name: "v\\n1", address: 192.0.2.1}]}': "vips: item 0: name 'v\\n1'",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError) as info:
            parse_text(text)
        assert message in str(info.value), str(info.value)


def test_settle_applies_only_content_unchanged_for_one_poll() -> None:
    from meridio.core.settle import Settle

    settle = Settle("v1")
    assert settle.observe("v1") == "same"
    assert settle.observe("") == "changing"  # being rewritten: first sight of new content
    assert settle.observe("trench: {na") == "changing"  # still changing
    assert settle.observe("trench: {name: a}") == "changing"  # complete, first sight
    assert settle.observe("trench: {name: a}") == "apply"  # unchanged for one poll
    assert settle.current == "trench: {name: a}"
    assert settle.observe("trench: {name: a}") == "same"  # offered once only
    # Content that goes back to the current one cancels the pending change.
    assert settle.observe("x") == "changing"
    assert settle.observe("trench: {name: a}") == "same"
    assert settle.observe("x") == "changing"
    assert settle.observe("x") == "apply"
    settle.accept("y")  # applied by the caller (SIGHUP)
    assert settle.observe("y") == "same"


def test_a_configmap_mount_updated_by_link_swap_is_read_whole(tmp_path: Path) -> None:
    """Kubernetes' atomic update: files are links through ..data to a timestamped directory,
    and an update makes a new directory and renames a new ..data link over the old one."""
    import os

    import yaml

    from meridio.core.nspconfig import read_source

    manifest = yaml.safe_load((DATA / "configmap.yaml").read_text())
    mount = tmp_path / "config"
    mount.mkdir()

    def publish(version: str, data: dict[str, str]) -> None:
        target = mount / f"..{version}"
        target.mkdir()
        for key, value in data.items():
            (target / key).write_text(value)
        tmp = mount / "..data_tmp"
        tmp.symlink_to(target.name)
        os.replace(tmp, mount / "..data")  # atomic
        for key in data:
            if not (mount / key).is_symlink():
                (mount / key).symlink_to(f"..data/{key}")

    publish("2024_01", manifest["data"])
    first = read_source(mount)
    assert isinstance(first, dict) and sorted(first) == sorted(manifest["data"])
    assert config_digest(load_file(mount)) == config_digest(load_file(DATA / "configmap.yaml"))
    changed = dict(manifest["data"], vips="items: []\n")
    publish("2024_02", changed)
    second = read_source(mount)
    assert second != first and second["vips"] == "items: []\n"  # type: ignore[index]
