"""BIRD's control-socket answers (recorded from BIRD 2.0.12) and the frontend's configuration."""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from meridio.api.nsp.v1 import Gateway, GatewayBfdSpec
from meridio.core import birdc
from meridio.core.birdconf import (
    Bfd,
    FrontendConfig,
    FrontendConfigError,
    Peer,
    check_password,
    peer_from_gateway,
    render,
    router_id,
)
from meridio.lb.frontend import gateway_states

DATA = Path(__file__).parent / "data" / "bird"


def recorded(name: str) -> birdc.Reply:
    return birdc.parse_reply((DATA / name).read_bytes())


# --- answers -------------------------------------------------------------------------------


def test_reply_end_finds_the_final_line_only() -> None:
    data = (DATA / "bfd-up.txt").read_bytes()
    assert birdc.reply_end(data[:-3]) == -1
    assert birdc.reply_end(data) == len(data)
    assert birdc.reply_end(data + b"0001 BIRD 2.0.12 ready.\n") == len(data)


def test_established_sessions() -> None:
    protocols = {p.name: p for p in birdc.parse_protocols(recorded("protocols-established.txt"))}
    assert set(protocols) == {
        "device1",
        "bfd1",
        "K4",
        "K6",
        "VIP4",
        "VIP6",
        "gw-a",
        "gw-a6",
        "gw-s",
    }
    bgp = protocols["gw-a"]
    assert bgp.proto == "BGP" and bgp.up and bgp.bgp_state == "Established"
    assert bgp.neighbor == "192.0.2.1"
    assert bgp.since == datetime(2026, 12, 5, 7, 43, 16, 272000)
    assert (bgp.imported, bgp.exported) == (1, 1)
    assert bgp.last_error == ""
    assert protocols["gw-a6"].neighbor == "fd00:e::1"
    assert protocols["VIP4"].imported == 1 and not protocols["VIP4"].channels["ipv4"].exported
    assert protocols["gw-s"].proto == "Static" and protocols["gw-s"].up


def test_sessions_after_the_gateway_went_away() -> None:
    protocols = {p.name: p for p in birdc.parse_protocols(recorded("protocols-gateway-gone.txt"))}
    gone = protocols["gw-a"]
    assert not gone.up and gone.state == "start" and gone.bgp_state == "Active"
    assert gone.last_error == "Error: BFD session down"
    assert protocols["gw-a6"].last_error == "Socket: Connection closed"
    assert gone.imported == 0


def test_bfd_sessions() -> None:
    up = birdc.parse_bfd_sessions(recorded("bfd-up.txt"))
    assert [(s.address, s.interface, s.state, s.interval, s.timeout) for s in up] == [
        ("192.0.2.1", "eth1", "Up", 0.1, 0.3),
        ("fd00:e::1", "eth1", "Up", 0.1, 0.3),
    ]
    down = birdc.parse_bfd_sessions(recorded("bfd-down.txt"))
    assert {s.state for s in down} == {"Down"} and not any(s.up for s in down)


def test_configure_answers() -> None:
    assert birdc.configure_result(recorded("configure-ok.txt")) == "reconfigured"
    with pytest.raises(birdc.BirdError, match=r"bad.conf:14:14 syntax error, unexpected GW"):
        birdc.configure_result(recorded("configure-error.txt"))


def test_a_reply_without_its_final_line_is_refused() -> None:
    with pytest.raises(ValueError, match="incomplete"):
        birdc.parse_reply(b"1002-gw-a BGP --- up\n")


def test_gateway_states_from_recorded_answers() -> None:
    peers = (
        Peer("gw-a", "192.0.2.1", 4, bfd=Bfd(100, 100, 3)),
        Peer("gw-a6", "fd00:e::1", 6, bfd=Bfd(100, 100, 3)),
        Peer("gw-s", "192.0.2.1", 4, protocol="static", bfd=Bfd()),
        Peer("gw-missing", "192.0.2.9", 4),
    )
    up = gateway_states(
        peers,
        birdc.parse_protocols(recorded("protocols-established.txt")),
        birdc.parse_bfd_sessions(recorded("bfd-up.txt")),
        announcing=True,
    )
    assert [(g.name, g.state, g.bfd) for g in up] == [
        ("gw-a", "up", "up"),
        ("gw-a6", "up", "up"),
        ("gw-s", "up", "up"),
        ("gw-missing", "down", "off"),
    ]
    assert up[0].routes_announced == 1 and up[0].since.startswith("2026-12-05 07:43:16")
    down = gateway_states(
        peers[:2],
        birdc.parse_protocols(recorded("protocols-gateway-gone.txt")),
        birdc.parse_bfd_sessions(recorded("bfd-down.txt")),
        announcing=True,
    )
    assert [(g.state, g.bfd, g.info) for g in down] == [
        ("active", "down", "Error: BFD session down"),
        ("active", "down", "Socket: Connection closed"),
    ]


# --- configuration -------------------------------------------------------------------------


def config(announce: tuple[str, ...] = ("203.0.113.1/32",), **peer: object) -> FrontendConfig:
    return FrontendConfig(
        router_id="192.0.2.11",
        interface="ext0",
        table=4096,
        peers=(
            Peer("gateway-v4", "192.0.2.1", 4, bfd=Bfd(100, 100, 3), hold_time=3, **peer),  # type: ignore[arg-type]
            Peer("gateway-v6", "fd00:e::1", 6),
        ),
        announce=announce,
    )


def test_render_bgp() -> None:
    text = render(config())
    assert "router id 192.0.2.11;" in text
    assert "protocol bgp 'gateway-v4' {" in text
    assert "  neighbor 192.0.2.1 port 10179 as 4248829953;" in text
    assert "  local port 10179 as 8103;" in text
    assert "  bfd { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };" in text
    assert "  hold time 3;" in text
    assert 'interface "ext0";' in text and "kernel table 4096;" in text
    assert "route 203.0.113.1/32 blackhole;" in text
    assert 'export where proto = "VIP4"' in text and 'export where proto != "VIP6"' in text
    assert "password" not in text


def test_announcing_changes_only_the_vip_protocols() -> None:
    """Withdrawing must not touch the sessions (BIRD would restart them)."""
    announced = render(config()).splitlines()
    withdrawn = render(config(announce=())).splitlines()
    changed = [line for line in announced if line not in withdrawn]
    assert changed == ["  route 203.0.113.1/32 blackhole;"]


def test_static_gateways_attract_with_bfd_only_while_announcing() -> None:
    static = Peer("gw-s", "192.0.2.1", 4, protocol="static", bfd=Bfd(200, 200, 5))
    base = FrontendConfig("192.0.2.11", "ext0", 4096, peers=(static,))
    on = render(base.__class__(**{**base.__dict__, "announce": ("203.0.113.1/32",)}))
    off = render(base)
    assert "route 0.0.0.0/0 via 192.0.2.1%'ext0' bfd;" in on
    assert "route 0.0.0.0/0 via 192.0.2.1%'ext0';" in off
    assert (
        'interface "ext0" { min rx interval 200 ms; min tx interval 200 ms; multiplier 5; }' in on
    )


def test_password_and_names_are_checked() -> None:
    assert 'password "k3y";' in render(config(password="k3y"))
    with pytest.raises(FrontendConfigError, match="printable ASCII"):
        check_password("gw", 'a"b')
    with pytest.raises(FrontendConfigError, match="80 bytes"):
        check_password("gw", "x" * 81)
    assert check_password("gw", "secret\n") == "secret"
    bad = FrontendConfig("1.1.1.1", "ext0", 4096, peers=(Peer("a b", "192.0.2.1", 4),))
    with pytest.raises(FrontendConfigError, match="gateway name"):
        render(bad)
    twice = FrontendConfig(
        "1.1.1.1", "ext0", 4096, peers=(Peer("a", "192.0.2.1", 4), Peer("a", "192.0.2.2", 4))
    )
    with pytest.raises(FrontendConfigError, match="twice"):
        render(twice)


def test_router_id() -> None:
    assert router_id("10.1.2.3", ["192.0.2.11/24"], "lb") == "10.1.2.3"
    assert router_id("", ["fd00:e::b/64", "192.0.2.12/24", "192.0.2.11/24"], "lb") == "192.0.2.11"
    derived = router_id("", ["fd00:e::b/64"], "lb-1")
    assert derived == router_id("", [], "lb-1") != router_id("", [], "lb-2")
    assert derived != "0.0.0.0"
    for bad in ("fd00::1", "0.0.0.0", "x"):
        with pytest.raises(FrontendConfigError, match="router-id"):
            router_id(bad, [], "lb")


def test_peer_from_a_gateway_message_uses_meridios_defaults() -> None:
    plain = peer_from_gateway(Gateway(name="g", address="192.0.2.1", protocol="bgp"))
    assert (plain.local_asn, plain.remote_asn, plain.local_port, plain.remote_port) == (
        8103,
        4248829953,
        10179,
        10179,
    )
    assert plain.bfd is None and plain.family == 4
    bfd = peer_from_gateway(
        Gateway(
            name="g",
            address="fd00:e::1",
            bfd=True,
            bfd_spec=GatewayBfdSpec(min_tx=100, min_rx=0, multiplier=0),
            local_asn=65001,
        )
    )
    assert bfd.bfd == Bfd(min_rx_ms=300, min_tx_ms=100, multiplier=3)
    assert bfd.family == 6 and bfd.local_asn == 65001


@pytest.mark.skipif(shutil.which("bird") is None, reason="BIRD 2 is not installed (bird2)")
@pytest.mark.parametrize("announce", [(), ("203.0.113.1/32", "2001:db8::1/128")])
def test_bird_parses_what_we_render(tmp_path: Path, announce: tuple[str, ...]) -> None:
    static = Peer("gw-s", "192.0.2.2", 4, protocol="static", bfd=Bfd())
    cfg = config(announce=announce, password="k3y")
    cfg = FrontendConfig(cfg.router_id, cfg.interface, cfg.table, (*cfg.peers, static), announce)
    path = tmp_path / "bird.conf"
    path.write_text(render(cfg))
    result = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
