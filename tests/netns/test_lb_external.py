"""The LB's external side for real: its interface toward a gateway, and the replies' egress.

The LB-only topology of ``lbtopo`` (client ``c0``, targets behind ``br0``) plus a gateway
namespace joined to the LB namespace by a veth (``x0`` there, ``eth1`` in the LB namespace)::

    gateway ns: x0 192.0.2.1/24, fd00:e::1/64; VIPs via 192.0.2.11 / fd00:e::b
    LB ns:      eth1 (parent) -> ext0 (macvlan or VLAN made by the LB) 192.0.2.11/24, fd00:e::b/64

Replies from the VIPs must leave through the gateway and nowhere else: the lbtopo client, which
reaches the VIPs through ``c0``, gets no answer (its replies go to the gateway, which has no route
back to it).
"""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Netns
from tests.netns.daemons import run_async
from tests.netns.lbtopo import (
    PORT,
    VIP4,
    VIP6,
    LbTopology,
    inside,
    ip_batch,
    ip_json,
    lb_daemon,
    make_ns,
    reap_stale,
    start_nsp,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.netns

GW4, GW6 = "192.0.2.1", "fd00:e::1"
LB_EXT4, LB_EXT6 = "192.0.2.11", "fd00:e::b"
TABLE = 4096
PRIORITY = 200
PREFIX = "mlbx-"


def vlan_support() -> str | None:
    """None when this kernel makes 802.1Q VLAN links; else why not (a throwaway namespace)."""
    name = f"{PREFIX}probe-{time.monotonic_ns()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
            check=True,
            capture_output=True,
        )
        made = subprocess.run(
            [
                "ip",
                "-n",
                name,
                "link",
                "add",
                "link",
                "p0",
                "name",
                "v0",
                "type",
                "vlan",
                "id",
                "5",
            ],
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if made.returncode == 0:
        return None
    return (
        "this kernel has no 802.1Q VLAN support (CONFIG_VLAN_8021Q, module 8021q): "
        + made.stderr.strip()
    )


class ExternalTopology:
    """lbtopo without its LB, plus the gateway namespace; the LB is started by the test."""

    def __init__(
        self,
        workdir: Path,
        *,
        gateway_v6: bool = True,
        static_routes: bool = True,
        nsp_config: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.topo = LbTopology(workdir, targets=2, start_lb=False)
        self.gw: Netns | None = None
        self.gateway_v6 = gateway_v6
        self.static_routes = static_routes
        self.nsp_config = nsp_config

    def __enter__(self) -> ExternalTopology:
        reap_stale(PREFIX)
        try:
            self.topo.build()
            self.gw = make_ns("gw", PREFIX)
            self.topo.namespaces.append(self.gw)
            self.gw.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            ip_batch(
                self.gw,
                [
                    f"link add x0 type veth peer name eth1 netns {self.topo.lb_ns.name}",
                    f"addr add {GW4}/24 dev x0",
                    f"addr add {GW6}/64 dev x0 nodad",
                    "link set x0 up",
                    *(
                        [
                            f"route add {VIP4}/32 via {LB_EXT4}",
                            f"route add {VIP6}/128 via {LB_EXT6}",
                        ]
                        if self.static_routes
                        else []
                    ),
                ],
            )
            self.topo.nsp = start_nsp(self.topo.lb_ns, self.workdir, configuration=self.nsp_config)
        except BaseException:
            self.topo.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.topo.close()

    @property
    def lb_ns(self) -> Netns:
        return self.topo.lb_ns

    def start_lb(self, *args: str, mode: str = "kernel", timeout: float = 20) -> None:
        assert self.topo.nsp is not None
        self.topo.lb = lb_daemon(self.lb_ns, self.workdir / "lb", self.topo.nsp, mode, *args)
        run_async(self.topo.lb.start(timeout=timeout))
        self.topo.register(range(1, 3))
        self.topo.wait_targets({1, 2})

    def gateways(self) -> str:
        return f"--gateways={GW4}" + (f",{GW6}" if self.gateway_v6 else "")

    def rules(self, family: int) -> set[str]:
        return {
            f"{r.get('src')}/{r.get('srclen', 32 if family == 4 else 128)}"
            for r in ip_json(self.lb_ns, f"-{family}", "rule", "show")
            if r.get("table") == str(TABLE) and r.get("priority") == PRIORITY
        }

    def table(self, family: int) -> list[dict[str, object]]:
        return ip_json(self.lb_ns, f"-{family}", "route", "show", "table", str(TABLE))

    def route_get(self, family: int, dst: str, src: str) -> dict[str, object]:
        routes = ip_json(self.lb_ns, f"-{family}", "route", "get", dst, "from", src, "iif", "br0")
        return routes[0] if routes else {}


@pytest.fixture
def ext(tmp_path: Path) -> Iterator[ExternalTopology]:
    with ExternalTopology(tmp_path) as topo:
        yield topo


def udp_echo(ns: str, vip: str, tries: int = 3) -> str | None:
    """One datagram from ``ns`` to VIP:PORT (again up to ``tries`` times); who answered."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with inside(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.connect((vip, PORT))
        for _ in range(tries):
            with contextlib.suppress(OSError):
                sock.send(b"hello")
            ready, _, _ = select.select([sock], [], [], 1.0)
            if ready:
                with contextlib.suppress(OSError):
                    return sock.recv(4096).split(b" ", 1)[0].decode()
    return None


def link(ns: Netns, name: str) -> dict[str, object] | None:
    found = ip_json(ns, "-d", "link", "show", "dev", name)
    return found[0] if found else None


def addresses(ns: Netns, name: str) -> set[str]:
    out = set()
    for item in ip_json(ns, "addr", "show", "dev", name):
        for info in item.get("addr_info", []):
            if info.get("scope") == "global":
                out.add(f"{info['local']}/{info['prefixlen']}")
    return out


def test_a_macvlan_carries_the_replies_through_the_gateways_only(ext: ExternalTopology) -> None:
    ext.start_lb(
        "--external-parent=eth1",
        "--external-kind=macvlan",
        f"--external-addresses={LB_EXT4}/24,{LB_EXT6}/64",
        ext.gateways(),
    )
    made = link(ext.lb_ns, "ext0")
    assert made is not None
    assert made["linkinfo"]["info_kind"] == "macvlan"  # type: ignore[index]
    assert made.get("ifalias") == "meridio-lb-external"
    assert "UP" in made["flags"]  # type: ignore[operator]
    assert addresses(ext.lb_ns, "ext0") == {f"{LB_EXT4}/24", f"{LB_EXT6}/64"}
    assert ext.rules(4) == {f"{VIP4}/32"} and ext.rules(6) == {f"{VIP6}/128"}
    for family, gateway in ((4, GW4), (6, GW6)):
        table = ext.table(family)
        assert any(r.get("gateway") == gateway for r in table), table
        assert any(r.get("type") == "blackhole" and r.get("metric") == 65535 for r in table), table

    assert gw_name(ext) is not None
    for vip in (VIP4, VIP6):
        assert udp_echo(gw_name(ext), vip) in {"t1", "t2"}, vip
    # the lbtopo client reaches the VIPs through c0, but no reply goes back that way
    assert udp_echo(ext.topo.client_ns.name, VIP4, tries=1) is None
    assert ext.route_get(4, "198.18.0.2", VIP4).get("gateway") == GW4
    assert ext.route_get(6, "fd00::2", VIP6).get("gateway") == GW6

    # drift: a rule and the gateway route deleted by hand come back
    ext.lb_ns.run("ip", "rule", "del", "from", VIP4, "lookup", str(TABLE), "pref", str(PRIORITY))
    ext.lb_ns.run("ip", "route", "del", "default", "via", GW4, "table", str(TABLE))
    wait_until(
        lambda: ext.rules(4) and any(r.get("gateway") == GW4 for r in ext.table(4)),
        5,
        "rule and gateway route restored",
    )

    assert ext.topo.stop_lb() == 0
    assert link(ext.lb_ns, "ext0") is None
    assert link(ext.lb_ns, "eth1") is not None  # the parent is not ours
    assert ext.rules(4) == set() and ext.rules(6) == set()
    assert ext.table(4) == [] and ext.table(6) == []


def gw_name(ext: ExternalTopology) -> str:
    assert ext.gw is not None
    return ext.gw.name


def test_an_existing_interface_keeps_what_was_not_ours(tmp_path: Path) -> None:
    with ExternalTopology(tmp_path, gateway_v6=False) as ext:
        ip_batch(ext.lb_ns, ["addr add 192.0.2.99/24 dev eth1", "link set eth1 up"])
        args = (
            "--external-interface=eth1",
            f"--external-addresses={LB_EXT4}/24,{LB_EXT6}/64",
            ext.gateways(),
        )
        ext.start_lb(*args)
        assert addresses(ext.lb_ns, "eth1") == {"192.0.2.99/24", f"{LB_EXT4}/24", f"{LB_EXT6}/64"}
        assert udp_echo(gw_name(ext), VIP4) in {"t1", "t2"}
        # no IPv6 gateway: IPv6 replies meet the blackhole, never the main table (the kernel
        # answers a route query that ends in a blackhole with EINVAL)
        blocked = ext.lb_ns.run(
            "ip", "-6", "route", "get", GW6, "from", VIP6, "iif", "br0", check=False
        )
        assert blocked.returncode != 0 and "Invalid argument" in blocked.stderr
        assert ext.route_get(6, GW6, "fd00:1::11").get("dev") == "eth1"  # from elsewhere: fine
        assert udp_echo(gw_name(ext), VIP6, tries=1) is None

        # killed and started again: it takes over what is there, and works
        assert ext.topo.lb is not None
        ext.topo.lb.kill()
        ext.topo.start_lb()
        assert udp_echo(gw_name(ext), VIP4) in {"t1", "t2"}
        assert ext.topo.stop_lb() == 0
        # the interface and the address that were there before stay; the configured ones go
        assert link(ext.lb_ns, "eth1") is not None
        assert addresses(ext.lb_ns, "eth1") == {"192.0.2.99/24"}
        assert ext.rules(4) == set() and ext.table(4) == [] and ext.table(6) == []


def test_a_vlan_interface(ext: ExternalTopology) -> None:
    reason = vlan_support()
    if reason is not None:
        pytest.skip(reason)
    ext.start_lb(
        "--external-parent=eth1",
        "--external-kind=vlan",
        "--external-vlan-id=100",
        f"--external-addresses={LB_EXT4}/24",
        f"--gateways={GW4}",
    )
    made = link(ext.lb_ns, "ext0")
    assert made is not None and made["linkinfo"]["info_kind"] == "vlan"  # type: ignore[index]
    assert ext.topo.stop_lb() == 0
    assert link(ext.lb_ns, "ext0") is None


def test_a_vlan_without_kernel_support_fails_naming_it(ext: ExternalTopology) -> None:
    if vlan_support() is None:
        pytest.skip("this kernel has 802.1Q VLAN support")
    assert ext.topo.nsp is not None
    lb = lb_daemon(
        ext.lb_ns,
        ext.workdir / "lb",
        ext.topo.nsp,
        "kernel",
        "--external-parent=eth1",
        "--external-kind=vlan",
        "--external-vlan-id=100",
        f"--external-addresses={LB_EXT4}/24",
    )
    ext.topo.lb = lb
    lb.spawn()
    status = run_async(lb.wait_exit(20))
    assert status != 0
    text = lb.log_text()
    assert "CONFIG_VLAN_8021Q" in text and "8021q" in text, text
    assert link(ext.lb_ns, "ext0") is None
