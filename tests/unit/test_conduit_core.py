"""The connect model (meridio.core.conduit): request validation, names, VNIs, MTUs."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meridio.api.meridio.connect.v1 import Connection, ConnectRequest, Mechanism, Veth, Vxlan
from meridio.core import conduit
from meridio.core.conduit import InvalidRequest


def veth(interface: str = "conduit0", path: str = "/proc/1/ns/net") -> Mechanism:
    return Mechanism(type="veth", interface_name=interface, veth=Veth(netns_path=path))


def vxlan(address: str = "198.51.100.2", vni: int = 7, port: int = 0) -> Mechanism:
    return Mechanism(
        type="vxlan",
        interface_name="conduit0",
        vxlan=Vxlan(client_address=address, vni=vni, port=port),
    )


def request(**overrides: object) -> ConnectRequest:
    fields: dict[str, object] = {
        "network_service": "proxy.conduit-a.trench-a",
        "connection_id": "t1-4026531840",
        "client_name": "t1",
        "mechanisms": [veth()],
        "extra_context": {"identifier/stream-a": "3"},
    }
    fields.update(overrides)
    return ConnectRequest(**fields)  # type: ignore[arg-type]


def test_a_valid_request_becomes_a_spec() -> None:
    spec = conduit.parse_request(
        request(
            mechanisms=[vxlan(port=4790), veth()],
            client_addresses=["198.18.0.2/24", "fd00:10::2/64"],
            endpoint_addresses=["198.18.0.1/24", "fd00:10::1/64"],
            mtu=1400,
        )
    )
    assert spec.connection_id == "t1-4026531840"
    assert [m.type for m in spec.mechanisms] == ["vxlan", "veth"]
    assert spec.mechanisms[0] == conduit.MechanismSpec(
        "vxlan", "conduit0", client_address="198.51.100.2", vni=7, port=4790
    )
    assert spec.mechanism("veth") == conduit.MechanismSpec(
        "veth", "conduit0", netns_path="/proc/1/ns/net"
    )
    assert spec.client_addresses == (
        ipaddress.ip_interface("198.18.0.2/24"),
        ipaddress.ip_interface("fd00:10::2/64"),
    )
    assert spec.context == {"identifier/stream-a": "3"}
    assert spec.mtu == 1400


def test_vxlan_port_defaults_to_4789() -> None:
    spec = conduit.parse_request(request(mechanisms=[vxlan()]))
    assert spec.mechanisms[0].port == conduit.VXLAN_PORT


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"network_service": ""}, "network service is empty"),
        ({"connection_id": ""}, "connection id is empty"),
        ({"connection_id": "a b"}, "without spaces"),
        ({"connection_id": "x" * 201}, "longer than 200"),
        ({"client_name": ""}, "client name is empty"),
        ({"mechanisms": []}, "no mechanism offered"),
        ({"mechanisms": [Mechanism(type="sriov", interface_name="x")]}, "unknown type"),
        ({"mechanisms": [veth(interface="a-very-long-name0")]}, "not a valid Linux name"),
        ({"mechanisms": [veth(interface="a/b")]}, "not a valid Linux name"),
        ({"mechanisms": [veth(path="proc/1/ns/net")]}, "absolute path"),
        ({"mechanisms": [vxlan(address="nowhere")]}, "is not an IP address"),
        ({"mechanisms": [vxlan(vni=0)]}, "VNI 0 outside"),
        ({"mechanisms": [vxlan(vni=1 << 24)]}, "outside 1..16777215"),
        ({"mtu": 100}, "MTU 100 outside"),
        ({"client_addresses": ["198.18.0.2"]}, "has no prefix length"),
        ({"client_addresses": ["198.18.0.2/24", "198.18.0.3/24"]}, "more than one IPv4"),
        ({"client_addresses": ["198.18.0.0/24"]}, "not a host address"),
        ({"endpoint_addresses": ["bogus/24"]}, "not an address with a prefix"),
        ({"extra_context": {"": "x"}}, "empty or too long"),
        ({"extra_context": {f"k{i}": "v" for i in range(33)}}, "more than 32"),
    ],
)
def test_invalid_requests_say_why(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        conduit.parse_request(request(**overrides))


def test_proposed_pairs() -> None:
    def parse(*texts: str) -> tuple[conduit.Interface, ...]:
        return conduit.parse_interfaces(texts, "address")

    conduit.check_proposed_pair(parse("198.18.0.1/24"), parse("198.18.0.5/24"))
    conduit.check_proposed_pair(
        parse("198.18.0.1/24", "fd00:10::1/64"), parse("fd00:10::5/64", "198.18.0.5/24")
    )
    with pytest.raises(InvalidRequest, match="must be proposed"):
        conduit.check_proposed_pair(parse("198.18.0.1/24"), ())
    with pytest.raises(InvalidRequest, match="same IP families"):
        conduit.check_proposed_pair(parse("198.18.0.1/24"), parse("fd00:10::5/64"))
    with pytest.raises(InvalidRequest, match="not in one subnet"):
        conduit.check_proposed_pair(parse("198.18.0.1/24"), parse("198.18.1.5/24"))
    with pytest.raises(InvalidRequest, match="same address"):
        conduit.check_proposed_pair(parse("198.18.0.1/24"), parse("198.18.0.1/24"))


@given(st.text(min_size=1, max_size=200))
def test_link_names_are_valid_and_stable(connection_id: str) -> None:
    name = conduit.link_name("ep", connection_id)
    assert conduit.valid_ifname(name)
    assert name.startswith("ep")
    assert len(name) == conduit.MAX_IFNAME
    assert name == conduit.link_name("ep", connection_id)


def test_link_names_differ_by_connection_and_refuse_long_prefixes() -> None:
    names = {conduit.link_name("ep", f"node1>lb{i}") for i in range(1000)}
    assert len(names) == 1000
    with pytest.raises(ValueError, match="too long"):
        conduit.link_name("x" * 10, "c")


@given(st.text(max_size=50), st.integers(0, 100), st.sets(st.integers(1, 1 << 24), max_size=20))
def test_vni_proposals(connection_id: str, attempt: int, used: set[int]) -> None:
    vni = conduit.propose_vni(connection_id, attempt, used)
    assert 1 <= vni <= conduit.MAX_VNI
    assert vni not in used
    assert vni == conduit.propose_vni(connection_id, attempt, used)


def test_a_refused_vni_leads_to_another_proposal() -> None:
    first = conduit.propose_vni("node1>lb1", 0)
    assert conduit.propose_vni("node1>lb1", 1) != first
    assert conduit.propose_vni("node1>lb1", 0, {first}) != first


def test_mtus() -> None:
    assert conduit.vxlan_mtu(1500, 4) == 1450
    assert conduit.vxlan_mtu(1500, 6) == 1430
    assert conduit.agree_mtu(1450, 0) == 1450
    assert conduit.agree_mtu(1450, 1400) == 1400
    assert conduit.agree_mtu(1400, 1500) == 1400


def test_aliases_name_their_connection() -> None:
    alias = conduit.alias_of(conduit.ENDPOINT_ALIAS, "node1>198.51.100.11:7779")
    assert conduit.connection_of(conduit.ENDPOINT_ALIAS, alias) == "node1>198.51.100.11:7779"
    assert conduit.connection_of(conduit.CLIENT_ALIAS, alias) is None
    assert conduit.connection_of(conduit.ENDPOINT_ALIAS, None) is None
    assert conduit.connection_of(conduit.ENDPOINT_ALIAS, conduit.ENDPOINT_ALIAS) is None


@pytest.mark.parametrize(
    ("name", "valid"),
    [("conduit0", True), ("", False), (".", False), ("a" * 16, False), ("a:b", False)],
)
def test_interface_names(name: str, valid: bool) -> None:
    assert conduit.valid_ifname(name) is valid


def test_family_and_host() -> None:
    assert conduit.family("198.18.0.1/24") == 4
    assert conduit.family("fd00::1") == 6
    assert conduit.host("fd00:10::1/64") == "fd00:10::1"


_text = st.text(max_size=30)


@given(
    st.sampled_from(["veth", "vxlan"]),
    st.tuples(_text, _text, _text, _text, _text),
    st.integers(0, conduit.MAX_VNI),
    st.integers(0, 65535),
    st.lists(_text, max_size=3),
    st.lists(_text, max_size=3),
    st.integers(0, 2**32 - 1),
    st.floats(allow_nan=False),
    st.dictionaries(_text, _text, max_size=4),
)
def test_connection_bytes_are_what_betterproto_makes(
    kind: str,
    texts: tuple[str, str, str, str, str],
    vni: int,
    port: int,
    client: list[str],
    endpoint: list[str],
    mtu: int,
    expiry: float,
    context: dict[str, str],
) -> None:
    """The endpoint's reply written by hand: the bytes the generated message makes, the way
    the endpoint built it (its mechanism and the veth or vxlan part set explicitly)."""
    cid, name, interface, path_or_address, local = texts
    spec = conduit.MechanismSpec(kind, interface, path_or_address, path_or_address, vni, port)
    mechanism = Mechanism(type=kind, interface_name=interface)
    if kind == "veth":
        mechanism.veth = Veth(netns_path=path_or_address)
    else:
        mechanism.vxlan = Vxlan(
            client_address=path_or_address, endpoint_address=local, vni=vni, port=port
        )
    expected = Connection(
        connection_id=cid,
        network_service=name,
        endpoint_name=local,
        mechanism=mechanism,
        client_addresses=client,
        endpoint_addresses=endpoint,
        endpoint_interface=interface,
        mtu=mtu,
        expiry_seconds=expiry,
        extra_context=context,
    )
    made = conduit.connection_bytes(
        connection_id=cid,
        network_service=name,
        endpoint_name=local,
        mechanism=spec,
        endpoint_address=local,
        client_addresses=client,
        endpoint_addresses=endpoint,
        endpoint_interface=interface,
        mtu=mtu,
        expiry_seconds=expiry,
        context=context,
    )
    assert made == bytes(expected)
