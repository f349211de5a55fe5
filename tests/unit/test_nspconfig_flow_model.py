"""The NSP's checks of Meridio's flow model that the LB relies on: byte matches within the L4
header, and stateless port NAT entries that cannot be ambiguous (meridio.core.nspconfig)."""

from __future__ import annotations

from typing import Any

import pytest

from meridio.core.classifier import parse_byte_match
from meridio.core.nspconfig import ConfigError, parse_config


def config(*, byte_matches: list[str] | None = None, nats: list[Any] | None = None) -> Any:
    return {
        "trench": {"name": "t"},
        "conduits": {"items": [{"name": "c", "trench": "t", "destination-port-nats": nats or []}]},
        "streams": {"items": [{"name": "s", "conduit": "c"}]},
        "vips": {
            "items": [
                {"name": "v4", "address": "203.0.113.1/32", "trench": "t"},
                {"name": "v6", "address": "2001:db8::1/128", "trench": "t"},
            ]
        },
        "flows": {
            "items": [
                {
                    "name": "f",
                    "stream": "s",
                    "vips": ["v4", "v6"],
                    "byte-matches": byte_matches or [],
                }
            ]
        },
    }


def nat(port: int, target: int, protocol: str = "TCP", vips: tuple[str, ...] = ("v4",)) -> Any:
    return {"port": port, "target-port": target, "vips": list(vips), "protocol": protocol}


@pytest.mark.parametrize(
    "text", ["tcp[2:2] = 4002", "tcp[16:4] = 1", "udp[4:2] & 0xff00 = 0x100", "sctp[11:1] = 7"]
)
def test_byte_matches_within_the_header_are_taken(text: str) -> None:
    cfg = parse_config(config(byte_matches=[text]))
    assert cfg.flows[0].byte_matches == [text]
    parse_byte_match(text)  # and the LB's classifier reads them the same way


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("tcp[18:4] = 1", "beyond the 20-byte tcp header"),
        ("udp[7:2] = 1", "beyond the 8-byte udp header"),
        ("sctp[12:1] = 1", "beyond the 12-byte sctp header"),
    ],
)
def test_byte_matches_beyond_the_header_are_refused(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        parse_config(config(byte_matches=[text]))
    assert info.value.key == "flows"


def test_port_nats_must_not_be_ambiguous() -> None:
    cfg = parse_config(config(nats=[nat(80, 8080, vips=("v4", "v6")), nat(80, 8080, "UDP")]))
    assert [(n.port, n.target_port, n.protocol) for n in cfg.conduits[0].destination_port_nats] == [
        (80, 8080, "tcp"),
        (80, 8080, "udp"),
    ]
    # the same port twice: which target port?
    with pytest.raises(ConfigError, match=r"port 80/tcp of vip \"v4\" is already NATed"):
        parse_config(config(nats=[nat(80, 8080), nat(80, 9090)]))
    # the same target port twice: which port do replies get back?
    with pytest.raises(ConfigError, match=r"target-port 8080/tcp of vip \"v4\"") as info:
        parse_config(config(nats=[nat(80, 8080), nat(81, 8080)]))
    assert info.value.key == "conduits"
    # other VIPs or protocols are other entries
    parse_config(config(nats=[nat(80, 8080), nat(81, 8080, vips=("v6",)), nat(81, 8080, "SCTP")]))
