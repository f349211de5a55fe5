"""The connect API's namespace references (meridio.core.netnsref): accepted forms, the
allow-list setting, and the TCP-table proof that a namespace holds the caller's connection."""

from __future__ import annotations

import ipaddress
import socket
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meridio.core import netnsref
from meridio.core.netnsref import NetnsRef, Refused


def test_accepted_forms() -> None:
    assert netnsref.parse_reference("/proc/4242/ns/net") == NetnsRef("/proc/4242/ns/net", pid=4242)
    assert netnsref.parse_reference("/run/netns/blue") == NetnsRef("/run/netns/blue", name="blue")
    assert netnsref.parse_reference("/var/run/netns/a.b-c_d").name == "a.b-c_d"


@pytest.mark.parametrize(
    "path",
    [
        "/proc/self/ns/net",  # the endpoint's own
        "/proc/thread-self/ns/net",
        "/proc/0/ns/net",
        "/proc/01/ns/net",
        "/proc/1/ns/mnt",
        "/proc/1/task/1/ns/net",
        "/proc/1/ns/net/",
        "/etc/passwd",
        "/run/netns/../netns/x",
        "/run/netns/..",
        "/run/netns/.",
        "/run/netns/a/b",
        "/run/netns/",
        "run/netns/x",
        "/run//netns/x",
        "",
    ],
)
def test_anything_else_is_refused(path: str) -> None:
    with pytest.raises(Refused, match="is not a reference this endpoint accepts"):
        netnsref.parse_reference(path)


@given(st.text(max_size=60))
def test_a_reference_accepted_is_one_of_the_two_forms(path: str) -> None:
    try:
        ref = netnsref.parse_reference(path)
    except Refused:
        return
    if ref.pid is not None:
        assert path == f"/proc/{ref.pid}/ns/net" and ref.pid > 0
    else:
        assert ref.name is not None and "/" not in ref.name and ref.name not in (".", "..")
        assert path in (f"/run/netns/{ref.name}", f"/var/run/netns/{ref.name}")


def test_allow_list() -> None:
    assert netnsref.parse_allow_list("") == frozenset()
    assert netnsref.parse_allow_list(" blue, /run/netns/red ,") == {"blue", "red"}
    for bad in ("/proc/1/ns/net", "..", "a b", "/run/netns/../x"):
        with pytest.raises(ValueError, match="connect-netns-allow"):
            netnsref.parse_allow_list(bad)


def _hex(address: str) -> str:
    """An address as the kernel writes it in /proc/net/tcp (32-bit words in host order)."""
    raw = ipaddress.ip_address(address).packed
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    return b"".join(words).hex().upper()


def _line(local: tuple[str, int], remote: tuple[str, int], state: int = 1) -> str:
    return (
        f"   0: {_hex(local[0])}:{local[1]:04X} {_hex(remote[0])}:{remote[1]:04X} {state:02X} "
        "00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 20 4 30"
    )


HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"


def test_the_kernels_own_format_is_read() -> None:
    # what the kernel writes for 127.0.0.1:8080 <- 127.0.0.1:40000, on a little-endian host
    if sys.byteorder != "little":
        pytest.skip("the sample is a little-endian host's")
    text = "\n".join(
        [
            HEADER,
            "   0: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0 0 1",
            "   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:9C40 0A",
        ]
    )
    sockets = netnsref.parse_tcp_table(text)
    assert [
        (str(s.local[0]), s.local[1], str(s.remote[0]), s.remote[1], s.state) for s in sockets
    ] == [
        ("127.0.0.1", 8080, "127.0.0.1", 40000, 1),
        ("::1", 8080, "::1", 40000, 10),
    ]


def test_a_socket_of_this_machine_is_found_in_its_table() -> None:
    """A real connection on loopback, found in this namespace's own table (and not its
    reverse, nor a made-up one)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        with open("/proc/self/net/tcp") as f:
            sockets = netnsref.parse_tcp_table(f.read())
        peer = netnsref.socket_end(accepted.getpeername())
        mine = netnsref.socket_end(accepted.getsockname())
        assert peer is not None and mine is not None
        assert netnsref.holds_connection(sockets, peer, mine)
        made_up = (peer[0], peer[1] + 1 if peer[1] < 65535 else 1)
        assert not netnsref.holds_connection(sockets, made_up, mine)
    finally:
        for s in (client, accepted, server):
            s.close()


def test_a_dual_stack_listeners_view_of_ipv4_matches() -> None:
    table = "\n".join([HEADER, _line(("198.18.0.2", 40000), ("198.18.0.1", 7779))])
    sockets = netnsref.parse_tcp_table(table)
    client = netnsref.socket_end(("::ffff:198.18.0.2", 40000, 0, 0))
    server = netnsref.socket_end(("::ffff:198.18.0.1", 7779, 0, 0))
    assert client is not None and server is not None
    assert netnsref.holds_connection(sockets, client, server)


def test_only_an_established_client_end_proves() -> None:
    c, s = ("fd00:5::2", 40000), ("fd00:5::1", 7781)
    client = netnsref.socket_end(c)
    server = netnsref.socket_end(s)
    assert client is not None and server is not None

    def holds(*lines: str) -> bool:
        return netnsref.holds_connection(
            netnsref.parse_tcp_table("\n".join([HEADER, *lines])), client, server
        )

    assert holds(_line(c, s))
    assert not holds(_line(c, s, state=6))  # TIME_WAIT: a connection of the past
    assert not holds(_line(s, c))  # the server's end: the endpoint's own namespace
    assert not holds(_line(("fd00:5::3", 40000), s))  # another address
    assert not holds(_line(c, ("fd00:5::1", 7780)))  # another server
    assert not holds()


def test_socket_end() -> None:
    assert netnsref.socket_end(None) is None
    assert netnsref.socket_end(("not an address", 1)) is None
    assert netnsref.socket_end("/run/x.sock") is None  # type: ignore[arg-type]
    assert netnsref.socket_end(("fe80::1%eth0", 5, 0, 2)) == (ipaddress.ip_address("fe80::1"), 5)
