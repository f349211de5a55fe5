"""The lab's plan, pure: names, addresses, placement, scaling, gateway routes, command lines."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from meridio.core.nspconfig import parse_config
from meridio.daemon import load_role
from meridio.lab import plan
from meridio.lab.lab import Lab
from meridio.lab.plan import LabSpec, PlanError, ScalePlan
from meridio.lab.state import LabState, load, save
from meridio.lab.system import LabError
from meridio.settings import load_settings, parse_flag_args

ALLOWED = [
    ipaddress.ip_network(n)
    for n in (
        "198.18.0.0/15",
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "2001:db8::/32",
        "fd00::/8",
    )
]


def allowed(address: str) -> bool:
    ip = ipaddress.ip_interface(address).ip
    return any(ip in net for net in ALLOWED)


def test_every_address_of_the_biggest_lab_is_in_the_allowed_ranges_and_unique() -> None:
    lbs, nodes, targets = (plan.LIMITS[k][1] for k in ("lbs", "proxies", "targets"))
    primary = [plan.primary_address("nsp"), plan.primary_address("ipam")]
    primary += [plan.primary_address("lb", i) for i in range(1, lbs + 1)]
    primary += [plan.primary_address("node", i) for i in range(1, nodes + 1)]
    primary += [plan.primary_address("target", i) for i in range(1, targets + 1)]
    external = [plan.external_address(f, i) for f in (4, 6) for i in range(0, lbs + 1)]
    others = [*plan.VIPS.values(), *plan.IPAM_PREFIXES.values()]
    for address in [*primary, *external]:
        assert allowed(address), address
    for prefix in others:
        first, last = ipaddress.ip_network(prefix)[0], ipaddress.ip_network(prefix)[-1]
        assert allowed(str(first)) and allowed(str(last)), prefix
    assert len(set(primary)) == len(primary)
    assert len(set(external)) == len(external)
    assert all(ipaddress.ip_address(a) in plan.PRIMARY for a in primary)
    # the conduits' addresses (IPAM), the primary network and the external one are apart
    ipam4 = ipaddress.ip_network(plan.IPAM_PREFIXES[4])
    assert not ipam4.overlaps(plan.PRIMARY) and not ipam4.overlaps(plan.EXTERNAL[4])


def test_addresses_and_names() -> None:
    assert plan.primary_cidr("lb", 2) == "198.19.1.2/16"
    assert plan.primary_address("target", 12) == "198.19.3.12"
    assert plan.external_address(4, 0) == "192.0.2.1/24"
    assert plan.external_address(6, 3) == "fd00:e::d/64"
    assert plan.gateway_address(6) == "fd00:e::1"
    assert plan.vip_endpoints([6, 4]) == ["203.0.113.1:5000", "[2001:db8::1]:5000"]
    assert plan.netns_name("mlab-", plan.target_host(3)) == "mlab-target-3"
    assert plan.port_name("target-64") == "p-target-64"
    assert all(len(plan.port_name(f"target-{i}")) <= 15 for i in range(1, 65))
    with pytest.raises(PlanError):
        plan.primary_address("lb", 255)


def test_only_the_lab_s_own_namespaces_are_taken_for_it() -> None:
    for name in ("mlab-gw", "mlab-pri", "mlab-lb-1", "mlab-node-16", "mlab-target-64"):
        assert plan.is_lab_netns("mlab-", name), name
    for name in ("mlab-t123-gw", "mlab-probe-1-2", "mlab-lb-x", "mtest-1-lb", "xmlab-gw"):
        assert not plan.is_lab_netns("mlab-", name), name
    assert plan.is_lab_netns("mlab-t123-", "mlab-t123-target-2")
    plan.check_prefix("mlab-t123-")
    for bad in ("mlab", "lab-", "mlab-A-", "mlab-a-b-", "mtest-"):
        with pytest.raises(PlanError):
            plan.check_prefix(bad)


def test_targets_are_spread_over_the_nodes() -> None:
    assert plan.place_targets({}, range(1, 6), [1, 2]) == {1: 1, 2: 2, 3: 1, 4: 2, 5: 1}
    # the next one goes to the node with the fewest, the first on a tie
    assert plan.place_target({1: 1, 2: 2, 3: 1}, [1, 2]) == 2
    assert plan.place_target({1: 1, 2: 2}, [1, 2, 3]) == 3
    # a target on a node that is gone counts nowhere
    assert plan.place_target({1: 9, 2: 9}, [1]) == 1
    with pytest.raises(PlanError):
        plan.place_target({}, [])


def test_scale_plans() -> None:
    assert plan.scale_plan([1, 2, 3, 4], [], 5) == ScalePlan((), (), (5,))
    assert plan.scale_plan([1, 2, 3, 4, 5], [], 4) == ScalePlan((5,), (), ())
    assert plan.scale_plan([1, 2, 3], [], 1) == ScalePlan((3, 2), (), ())
    # a dead one is cleared and its place taken again
    assert plan.scale_plan([1, 2, 4], [3], 4) == ScalePlan((), (3,), (3,))
    assert plan.scale_plan([1, 2, 4], [3], 2) == ScalePlan((4,), (3,), ())
    assert plan.scale_plan([2, 3], [], 3) == ScalePlan((), (), (1,))
    assert plan.scale_plan([1, 2], [], 2).empty
    with pytest.raises(PlanError):
        plan.scale_plan([], [], -1)


@given(
    st.sets(st.integers(1, 40), max_size=20),
    st.sets(st.integers(1, 40), max_size=5),
    st.integers(0, 30),
)
def test_a_scale_plan_always_ends_with_the_number_asked_for(
    running: set[int], dead: set[int], want: int
) -> None:
    change = plan.scale_plan(running, dead, want)
    after = (running - set(change.remove)) | set(change.add)
    assert len(after) == want
    assert set(change.remove) <= running
    assert not set(change.add) & (running - set(change.remove))
    assert set(change.clear) == dead - running
    # the newest go first, and only when there are too many
    if change.remove:
        assert min(change.remove) > max(running - set(change.remove), default=0)


def test_the_gateway_route_follows_the_lbs() -> None:
    assert plan.gateway_route([2, 1], 4) == [
        "-4", "route", "replace", "203.0.113.1/32",
        "nexthop", "via", "192.0.2.11", "nexthop", "via", "192.0.2.12",
    ]  # fmt: skip
    assert plan.gateway_route([2], 6) == [
        "-6", "route", "replace", "2001:db8::1/128", "via", "fd00:e::c",
    ]  # fmt: skip
    assert plan.gateway_route([], 4) == ["-4", "route", "del", "203.0.113.1/32"]


@pytest.mark.parametrize("family", ["dualstack", "ipv4", "ipv6"])
def test_the_nsp_configuration_is_valid_meridio_configuration(family: str) -> None:
    config = parse_config(plan.nsp_configuration(plan.FAMILIES[family]))
    assert config.trench is not None and config.trench.name == plan.TRENCH
    assert [v.address for v in config.vips] == [plan.vip_cidr(f) for f in plan.FAMILIES[family]]
    (flow,) = config.flows
    assert flow.stream.name == plan.STREAM and list(flow.destination_port_ranges) == ["5000"]
    assert config.streams[0].max_targets == plan.MAX_TARGETS


@pytest.mark.parametrize(
    "spec",
    [
        LabSpec(),
        LabSpec(ip_family="ipv4", mechanism="vxlan", external="veth", lb_mode="kernel"),
        LabSpec(ip_family="ipv6", external="vlan"),
    ],
)
def test_every_command_line_is_settings_its_role_takes(spec: LabSpec, tmp_path: Path) -> None:
    config = plan.nsp_config_path(tmp_path)
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump(plan.nsp_configuration(spec.families)))
    lines = {
        "nsp": plan.nsp_args(tmp_path),
        "ipam": plan.ipam_args(tmp_path, spec.families),
        "lb": plan.lb_args(tmp_path, spec, 2),
        "proxy": plan.proxy_args(tmp_path, spec, 1),
        "target": plan.target_args(tmp_path, spec, 3, 1),
    }
    for role, argv in lines.items():
        assert argv[0] == f"--role={role}"
        cls = load_role(role)
        settings = load_settings(cls.Settings, flags=parse_flag_args(argv[1:]))
        cls.check_settings(settings)
    lb = " ".join(lines["lb"])
    assert "--external-addresses=" in lb and "--gateways=" in lb
    if spec.external == "veth":
        assert "--external-interface=eth1" in lb
    else:
        assert f"--external-kind={spec.external}" in lb


def test_lab_specs_are_checked() -> None:
    LabSpec().check()
    for bad in (
        LabSpec(lbs=0),
        LabSpec(targets=plan.MAX_TARGETS + 1),
        LabSpec(proxies=17),
        LabSpec(ip_family="ipv5"),
        LabSpec(mechanism="gre"),
        LabSpec(lb_mode="fast"),
        LabSpec(external="ipvlan"),
        LabSpec(prefix="lab-"),
    ):
        with pytest.raises(PlanError):
            bad.check()


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    state = LabState.from_spec(LabSpec(targets=3, ip_family="ipv6"))
    state.targets = {"1": 1, "2": 2}
    save(tmp_path, state)
    again = load(tmp_path)
    assert again is not None and again.spec == state.spec and again.target_nodes == {1: 1, 2: 2}
    (tmp_path / "lab.json").write_text("{not json")
    assert load(tmp_path) is None
    assert load(tmp_path / "nowhere") is None


def test_the_traffic_client_runs_on_the_gateway_against_the_vips(tmp_path: Path) -> None:
    save(tmp_path, LabState.from_spec(LabSpec(ip_family="ipv6", prefix="mlab-x-")))
    lab = Lab(tmp_path, "mlab-x-")
    argv = lab.traffic_argv(["--udp", "-c", "5"])
    assert argv[:4] == ["ip", "netns", "exec", "mlab-x-gw"]
    assert argv[-6:] == ["client", "--address", "[2001:db8::1]:5000", "--udp", "-c", "5"]
    own = lab.traffic_argv(["-a", "[2001:db8::1]:7"])
    assert own[-3:] == ["client", "-a", "[2001:db8::1]:7"]
    with pytest.raises(LabError, match="no IPv4"):
        lab.traffic_argv([], families=[4])
    with pytest.raises(LabError, match="no lab here"):
        Lab(tmp_path / "none").traffic_argv([])
