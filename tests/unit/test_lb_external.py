"""The LB's external side, pure part: settings checks, the gateway table plan, route dumps."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from meridio.lb.external import (
    BLACKHOLE_METRIC,
    RTN_BLACKHOLE,
    RTN_UNICAST,
    TableRoutes,
    external_spec,
    missing_support,
    read_table_routes,
    route_plan,
    split_list,
)
from meridio.roles.lb import LbRole, LbSettings
from meridio.settings import load_settings


def settings(**flags: str) -> LbSettings:
    return load_settings(LbSettings, flags={"trench": "trench-a", **flags})


def test_nothing_configured_is_no_external_side() -> None:
    assert external_spec(settings()) is None


def test_lists_come_as_text_or_as_lists() -> None:
    assert split_list("192.0.2.11/24, fd00:e::b/64") == ("192.0.2.11/24", "fd00:e::b/64")
    assert split_list("a b,,c") == ("a", "b", "c")
    assert split_list(["x", " y "]) == ("x", "y")
    assert split_list("") == ()
    from_yaml = load_settings(
        LbSettings, defaults={"trench": "t", "gateways": ["192.0.2.1", "192.0.2.2"]}
    )
    spec = external_spec(from_yaml)
    assert spec is not None and spec.gateways == {4: ("192.0.2.1", "192.0.2.2")}


def test_macvlan_on_a_parent() -> None:
    spec = external_spec(
        settings(
            **{
                "external-parent": "eth1",
                "external-addresses": "192.0.2.11/24,fd00:e:0::b/64",
                "gateways": "fd00:e::1,192.0.2.2,192.0.2.1",
            }
        )
    )
    assert spec is not None
    assert spec.creates and spec.kind == "macvlan" and spec.interface == "ext0"
    assert spec.addresses == ("192.0.2.11/24", "fd00:e::b/64")
    assert spec.gateways == {4: ("192.0.2.1", "192.0.2.2"), 6: ("fd00:e::1",)}
    assert (spec.table, spec.priority) == (4096, 200)


def test_vlan_and_an_existing_interface() -> None:
    vlan = external_spec(
        settings(
            **{
                "external-parent": "eth1",
                "external-kind": "vlan",
                "external-vlan-id": "100",
                "external-interface": "ext100",
            }
        )
    )
    assert vlan is not None and (vlan.kind, vlan.vlan_id, vlan.interface) == ("vlan", 100, "ext100")
    existing = external_spec(settings(**{"external-interface": "ext", "gateways": "192.0.2.1"}))
    assert existing is not None and not existing.creates and existing.kind == ""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"external-parent": "eth1", "external-kind": "ipvlan"}, "'external-kind'"),
        ({"external-parent": "eth1", "external-kind": "vlan"}, "'external-vlan-id'"),
        (
            {"external-parent": "eth1", "external-vlan-id": "5000", "external-kind": "vlan"},
            "1..4094",
        ),
        ({"external-parent": "eth1", "external-macvlan-mode": "x"}, "'external-macvlan-mode'"),
        ({"external-parent": "a-very-long-interface-name"}, "'external-parent'"),
        ({"external-interface": "ext0", "external-addresses": "192.0.2.300/24"}, "192.0.2.300"),
        ({"external-interface": "ext0", "external-addresses": "192.0.2.3"}, "prefix length"),
        ({"external-addresses": "192.0.2.3/24"}, "needs 'external-interface'"),
        ({"gateways": "gw.example"}, "'gateways'"),
        ({"gateways": "192.0.2.1", "gateway-table": "254"}, "'gateway-table'"),
        ({"gateways": "192.0.2.1", "gateway-rule-priority": "32766"}, "'gateway-rule-priority'"),
        ({"external-parent": "eth1", "external-interface": "eth1"}, "the same"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        LbRole.check_settings(settings(**flags))


def test_route_plan_has_a_blackhole_behind_every_family() -> None:
    spec = external_spec(settings(gateways="192.0.2.2,192.0.2.1"))
    assert spec is not None
    assert route_plan(spec) == {
        4: TableRoutes(("192.0.2.1", "192.0.2.2"), blackhole=True),
        6: TableRoutes((), blackhole=True),
    }


def route(table: int, kind: int, dst_len: int = 0, **attrs: Any) -> dict[str, Any]:
    return {"dst_len": dst_len, "table": table if table < 256 else 252, "type": kind} | {
        "RTA_TABLE": table,
        **attrs,
    }


def test_route_dumps_are_read_back() -> None:
    dump = [
        route(
            4096,
            RTN_UNICAST,
            RTA_MULTIPATH=[{"RTA_GATEWAY": "192.0.2.2"}, {"RTA_GATEWAY": "192.0.2.1"}],
        ),
        route(4096, RTN_BLACKHOLE, RTA_PRIORITY=BLACKHOLE_METRIC),
        route(4096, RTN_UNICAST, dst_len=24, RTA_GATEWAY="192.0.2.9"),  # not a default
        route(4097, RTN_UNICAST, RTA_GATEWAY="192.0.2.8"),  # another table
    ]
    assert read_table_routes(dump, 4096) == TableRoutes(("192.0.2.1", "192.0.2.2"), True)
    single = [route(4096, RTN_UNICAST, RTA_GATEWAY="fd00:e:0::1")]
    assert read_table_routes(single, 4096) == TableRoutes(("fd00:e::1",), False)
    assert read_table_routes([], 4096) == TableRoutes((), False)


def test_an_unknown_link_kind_names_the_kernel_support() -> None:
    unsupported = NetlinkError(errno.EOPNOTSUPP, "Operation not supported")
    text = missing_support("vlan", unsupported)
    assert text is not None and "CONFIG_VLAN_8021Q" in text and "8021q" in text
    assert "CONFIG_MACVLAN" in (missing_support("macvlan", unsupported) or "")
    assert missing_support("vlan", NetlinkError(errno.EEXIST, "File exists")) is None
