"""The LB's frontend with real BIRDs on both sides: announce only when able, withdraw first,
and die with the LB.

Topology: ``test_lb_external``'s (the lbtopo LB with two targets, a gateway namespace on the
LB's ``eth1``) without the gateway's static VIP routes; the gateway runs its own BIRD 2
(passive BGP towards 192.0.2.0/24 and fd00:e::/64, BFD 100 ms x 3, a default route sent to
the LBs, ECMP into its kernel table). The LB gets ``--attractor`` and reads its gateways from
the NSP's configuration.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meridio.api.meridio.admin.v1 import GatewaysRequest, GatewaysResponse, LbInspectStub
from tests.conftest import make_netns
from tests.netns.daemons import SERVING, channel, health_status, run_async
from tests.netns.lbtopo import NSP_CONFIG, TRENCH, VIP4, VIP6, ip_json
from tests.netns.test_lb_external import (
    GW4,
    GW6,
    LB_EXT4,
    LB_EXT6,
    TABLE,
    ExternalTopology,
    udp_echo,
)
from tests.waiting import HANG, wait_until

pytestmark = pytest.mark.netns

ATTRACTOR = "attractor-a"
BIRD = "/usr/sbin/bird"


def nsp_config(
    *, families: tuple[int, ...] = (4, 6), auth: str = "", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    config = copy.deepcopy(NSP_CONFIG)
    gateways = []
    for family in families:
        item: dict[str, Any] = {
            "name": f"gateway-v{family}",
            "address": GW4 if family == 4 else GW6,
            "protocol": "bgp",
            "bfd": True,
            "min-tx": 100,
            "min-rx": 100,
            "multiplier": 3,
            "hold-time": 3,
            "trench": TRENCH,
            **(extra or {}),
        }
        if auth:
            item["bgp-auth"] = {"key": "gw-key", "source": auth}
        gateways.append(item)
    config["gateways"] = {"items": gateways}
    config["attractors"] = {
        "items": [
            {
                "name": ATTRACTOR,
                "vips": [f"vip{f}" for f in families],
                "gateways": [g["name"] for g in gateways],
                "trench": TRENCH,
            }
        ]
    }
    return config


def gateway_bird_config(password: str = "") -> str:
    """The gateway side: passive, any LB of the external subnets, BFD, ECMP."""
    secret = f' password "{password}";' if password else ""
    sessions = []
    for family, local, subnet in ((4, GW4, "192.0.2.0/24"), (6, GW6, "fd00:e::/64")):
        sessions.append(
            f"protocol bgp LBS{family} {{ local {local} port 10179 as 4248829953; passive on; "
            f'direct; bfd on; hold time 3;{secret} dynamic name "lb{family}_"; '
            f"neighbor range {subnet} port 10179 as 8103; "
            f'ipv{family} {{ import all; export where proto = "DEF{family}"; next hop self; }}; }}'
        )
    return "\n".join(
        [
            "log stderr all;",
            "debug protocols { states, events };",
            f"router id {GW4};",
            "protocol device {}",
            'protocol bfd { interface "x0" { min rx interval 100 ms; min tx interval 100 ms; '
            "multiplier 3; }; }",
            "protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; "
            "merge paths on; }",
            "protocol kernel { ipv6 { import none; export where source = RTS_BGP; }; "
            "merge paths on; }",
            "protocol static DEF4 { ipv4; route 0.0.0.0/0 unreachable; }",
            "protocol static DEF6 { ipv6; route ::/0 unreachable; }",
            *sessions,
            "",
        ]
    )


class Gateway:
    def __init__(self, ext: ExternalTopology, password: str = "") -> None:
        assert ext.gw is not None
        self.ns = ext.gw
        self.dir = ext.workdir / "gw"
        self.dir.mkdir(exist_ok=True)
        (self.dir / "bird.conf").write_text(gateway_bird_config(password))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.dir / "bird.log").open("ab") as log:
            self.proc = self.ns.popen(
                BIRD,
                "-f",
                "-c",
                str(self.dir / "bird.conf"),
                "-s",
                str(self.dir / "bird.ctl"),
                "-P",
                str(self.dir / "bird.pid"),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def log(self) -> str:
        """What the gateway's BIRD logged (state changes and events of its protocols)."""
        return (self.dir / "bird.log").read_text(errors="replace")

    def logged_since(self, before: str, pattern: str) -> bool:
        """Whether a line logged after ``before`` (an earlier :meth:`log`) matches."""
        return re.search(pattern, self.log()[len(before) :]) is not None

    def next_hops(self, vip: str) -> set[str]:
        """The LB addresses the gateway routes ``vip`` over (BGP-learned routes only)."""
        found = set()
        for route in ip_json(self.ns, "-6" if ":" in vip else "-4", "route", "show", vip):
            if route.get("protocol") != "bird":
                continue
            if route.get("gateway"):
                found.add(str(route["gateway"]))
            for hop in route.get("nexthops", []):
                found.add(str(hop["gateway"]))
        return found


@pytest.fixture
def bird_installed() -> None:
    if not Path(BIRD).exists():
        pytest.skip("BIRD 2 is not installed (Debian package bird2; `make deps` installs it)")


@pytest.fixture
def front(tmp_path: Path, bird_installed: None) -> Iterator[tuple[ExternalTopology, Gateway]]:
    with ExternalTopology(tmp_path, static_routes=False, nsp_config=nsp_config()) as ext:
        gateway = Gateway(ext)
        gateway.start()
        yield ext, gateway


LB_ARGS = (
    "--external-parent=eth1",
    "--external-kind=macvlan",
    f"--attractor={ATTRACTOR}",
    "--bird-poll-interval=0.1",
    "--withdraw-grace=0.5",
)


def gateways(ext: ExternalTopology) -> GatewaysResponse:
    async def ask() -> GatewaysResponse:
        async with channel(ext.topo.lb_socket) as ch:
            return await LbInspectStub(ch).gateways(GatewaysRequest())

    return run_async(ask())


def bird_pid(ext: ExternalTopology) -> int:
    assert ext.topo.lb is not None
    return int((ext.topo.lb.run_dir / "bird.pid").read_text().split()[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (reaped by nobody yet)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def table(ext: ExternalTopology, family: int) -> list[dict[str, Any]]:
    return ip_json(ext.lb_ns, f"-{family}", "route", "show", "table", str(TABLE))


def test_vips_follow_the_targets_and_bird_follows_the_lb(
    front: tuple[ExternalTopology, Gateway],
) -> None:
    ext, gw = front
    ext.start_lb(
        *LB_ARGS,
        f"--external-addresses={LB_EXT4}/24,{LB_EXT6}/64",
        "--metrics-listen=127.0.0.1:9101",
    )
    # announced once ready with targets; the gateway routes both VIPs over the LB
    wait_until(lambda: gw.next_hops(VIP4) == {LB_EXT4}, HANG, "IPv4 VIP route at the gateway")
    wait_until(lambda: gw.next_hops(VIP6) == {LB_EXT6}, HANG, "IPv6 VIP route at the gateway")
    assert udp_echo(gw.ns.name, VIP4) in {"t1", "t2"}
    assert udp_echo(gw.ns.name, VIP6) in {"t1", "t2"}
    # egress: the gateway's default route, from BGP, in the gateway table with the blackhole
    for family, address in ((4, GW4), (6, GW6)):
        routes = table(ext, family)
        assert any(r.get("gateway") == address and r.get("protocol") == "bird" for r in routes)
        assert any(r.get("type") == "blackhole" for r in routes), routes
    expected = {("gateway-v4", "up", "up"), ("gateway-v6", "up", "up")}
    wait_until(
        lambda: {(g.name, g.state, g.bfd) for g in gateways(ext).gateways} == expected,
        HANG,
        f"sessions {expected}",
    )
    status = gateways(ext)
    assert status.bird == "running" and status.router_id == LB_EXT4
    assert sorted(status.announced) == sorted([f"{VIP4}/32", f"{VIP6}/128"])
    assert all(g.routes_announced == 1 and g.routes_received == 1 for g in status.gateways)
    # the same through the command line, as an operator reads it
    shown = subprocess.run(
        [
            str(Path(sys.executable).parent / "meridioctl"),
            "lb",
            "gateways",
            f"--lb=unix://{ext.topo.lb_socket}",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (listed,) = json.loads(shown.stdout)
    assert {(g["gateway"], g["state"], g["bfd"]) for g in listed["gateways"]} == expected
    assert listed["attractor"] == ATTRACTOR and listed["bird"] == "running"
    # and as Prometheus scrapes it
    scraped = ext.lb_ns.run(
        sys.executable,
        "-c",
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:9101/metrics').read().decode())",
    ).stdout
    for line in (
        'meridio_lb_gateway_up{gateway="gateway-v4",protocol="bgp"} 1.0',
        'meridio_lb_gateway_bfd_up{gateway="gateway-v6"} 1.0',
        'meridio_lb_gateway_routes_announced{gateway="gateway-v4"} 1.0',
        'meridio_lb_vips_announced{attractor="attractor-a",trench="trench-a"} 2.0',
    ):
        assert line in scraped, scraped
    assert ext.topo.lb is not None
    assert run_async(health_status(ext.topo.lb.health_socket, "Gateways")) == SERVING

    # every target of the VIPs' stream gone: withdrawn; one back: announced again
    ext.topo.unregister([1, 2])
    wait_until(lambda: not gw.next_hops(VIP4) and not gw.next_hops(VIP6), HANG, "VIPs withdrawn")
    assert gateways(ext).announced == []
    ext.topo.register([2])
    wait_until(lambda: gw.next_hops(VIP4) == {LB_EXT4}, HANG, "VIP announced again")

    # BIRD dies: the gateway drops the LB when the session's connection closes (not at the
    # end of the hold time); the LB starts BIRD again and the VIPs come back
    first = bird_pid(ext)
    before = gw.log()
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not gw.next_hops(VIP4), HANG, "the gateway dropped the LB with its BIRD")
    assert gw.logged_since(before, r"lb4_\d+: Connection closed"), gw.log()[len(before) :]
    wait_until(lambda: gw.next_hops(VIP4) == {LB_EXT4}, HANG, "VIP announced by the new BIRD")
    assert bird_pid(ext) != first

    # the LB is killed: its BIRD dies with it, and the gateway stops routing to it as the
    # session's connection closes (how fast: bench_attraction, "killed")
    pid = bird_pid(ext)
    before = gw.log()
    ext.topo.lb.signal(signal.SIGKILL)
    wait_until(lambda: not alive(pid), HANG, "BIRD died with the LB")
    wait_until(lambda: not gw.next_hops(VIP4), HANG, "the gateway dropped the killed LB")
    assert gw.logged_since(before, r"lb4_\d+: Connection closed"), gw.log()[len(before) :]


def test_sigterm_withdraws_before_the_data_path_goes(
    front: tuple[ExternalTopology, Gateway],
) -> None:
    ext, gw = front
    ext.start_lb(*LB_ARGS, f"--external-addresses={LB_EXT4}/24,{LB_EXT6}/64")
    wait_until(lambda: gw.next_hops(VIP4) == {LB_EXT4}, HANG, "VIP route at the gateway")
    # what a watcher saw, in order: (route at the gateway, the LB's nft table), one reading
    # of both at a time
    seen: list[tuple[bool, bool]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            route = bool(gw.next_hops(VIP4))
            nft = ext.lb_ns.run("nft", "list", "table", "inet", "meridio-lb", check=False)
            seen.append((route, nft.returncode == 0))
            if seen[-1] == (False, False):
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert ext.topo.stop_lb() == 0
        wait_until(lambda: seen and seen[-1] == (False, False), HANG, "route and data path gone")
    finally:
        done.set()
        watcher.join()
    # the gateway stopped routing to the LB while its data path was still there (the
    # withdraw grace), and the data path never went first
    assert (False, True) in seen, seen
    assert (True, False) not in seen, seen


def test_a_hung_lb_is_dropped_by_bfd(front: tuple[ExternalTopology, Gateway]) -> None:
    ext, gw = front
    ext.start_lb(*LB_ARGS, f"--external-addresses={LB_EXT4}/24,{LB_EXT6}/64")
    wait_until(lambda: gw.next_hops(VIP4) == {LB_EXT4}, HANG, "VIP route at the gateway")
    wait_until(lambda: {g.bfd for g in gateways(ext).gateways} == {"up"}, HANG, "BFD sessions up")
    # the LB's process stays alive, but nothing leaves or enters its external interface
    before = gw.log()
    ext.lb_ns.run(
        "nft",
        "add table inet mtest-hang; "
        "add chain inet mtest-hang in { type filter hook prerouting priority -500; policy drop; }; "
        "add chain inet mtest-hang out { type filter hook output priority -500; policy drop; }",
    )
    try:
        wait_until(lambda: not gw.next_hops(VIP4), HANG, "the gateway dropped the hung LB")
    except AssertionError:
        for cmd in ("show bfd sessions", "show protocols"):
            print(gw.ns.run("birdc", "-s", str(gw.dir / "bird.ctl"), cmd, check=False).stdout)
        print(gw.ns.run("ip", "route", check=False).stdout)
        print(ext.lb_ns.run("nft", "list", "ruleset", check=False).stdout[:3000])
        raise
    # dropped by BFD, not at the end of the BGP hold time (how fast: bench_attraction, "hung")
    assert gw.logged_since(before, r"lb4_\d+: BFD session down"), gw.log()[len(before) :]
    assert not gw.logged_since(before, "Hold timer expired"), gw.log()[len(before) :]


def test_an_ipv6_only_lb_picks_its_own_router_id(tmp_path: Path, bird_installed: None) -> None:
    config = nsp_config(families=(6,))
    with ExternalTopology(tmp_path, static_routes=False, nsp_config=config) as ext:
        gw = Gateway(ext)
        gw.start()
        ext.start_lb(*LB_ARGS, f"--external-addresses={LB_EXT6}/64")
        wait_until(lambda: gw.next_hops(VIP6) == {LB_EXT6}, HANG, "IPv6 VIP route at the gateway")
        status = gateways(ext)
        assert status.router_id and status.router_id != "0.0.0.0"
        assert [g.name for g in status.gateways] == ["gateway-v6"]
        assert udp_echo(gw.ns.name, VIP6) in {"t1", "t2"}


def tcp_md5_support() -> str | None:
    """None when this kernel signs TCP segments with MD5 (RFC 2385); else why not."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        address = struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(GW4))
        key = b"probe"
        # struct tcp_md5sig: sockaddr_storage, flags, prefixlen, keylen, ifindex, key[80]
        value = address.ljust(128, b"\0") + struct.pack("=BBHI80s", 0, 0, len(key), 0, key)
        sock.setsockopt(socket.IPPROTO_TCP, 14, value)  # TCP_MD5SIG
    except OSError as exc:
        return f"this kernel has no TCP MD5 signatures (CONFIG_TCP_MD5SIG): {exc}"
    finally:
        sock.close()
    return None


@pytest.mark.parametrize("right_key", [True, False], ids=["same-key", "wrong-key"])
def test_bgp_authentication(tmp_path: Path, bird_installed: None, right_key: bool) -> None:
    reason = tcp_md5_support()
    if reason is not None:
        pytest.skip(reason)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "gw-key").write_text("s3cret-key\n")
    config = nsp_config(families=(4,), auth=str(keys))
    with ExternalTopology(tmp_path, static_routes=False, nsp_config=config) as ext:
        gw = Gateway(ext, password="s3cret-key" if right_key else "another-key")
        gw.start()
        if right_key:
            ext.start_lb(*LB_ARGS, f"--external-addresses={LB_EXT4}/24")
            wait_until(lambda: gw.next_hops(VIP4) == {LB_EXT4}, HANG, "VIP route at the gateway")
            assert "password" in (ext.topo.lb.run_dir / "bird.conf").read_text()  # type: ignore[union-attr]
        else:
            # never ready: no gateway session comes up with a key the gateway does not share
            with pytest.raises(AssertionError, match="not ready"):
                ext.start_lb(*LB_ARGS, f"--external-addresses={LB_EXT4}/24", timeout=8)
            assert not gw.next_hops(VIP4)
            assert {g.state for g in gateways(ext).gateways} != {"up"}


def test_an_unknown_attractor_is_reported_and_never_ready(
    front: tuple[ExternalTopology, Gateway],
) -> None:
    ext, gw = front
    args = [a for a in LB_ARGS if not a.startswith("--attractor")]
    with pytest.raises(AssertionError, match="not ready"):
        ext.start_lb(*args, "--attractor=no-such", f"--external-addresses={LB_EXT4}/24", timeout=5)
    status = gateways(ext)
    assert "attractor 'no-such' is not in trench" in status.error
    assert not gw.next_hops(VIP4)


# The frontend alone, in a namespace of its own: a configuration BIRD refuses (a hold time of
# 2 s, which our NSP would never pass on, but another one could) leaves the previous one
# running, and BIRD's own message is reported.
REFUSED_SCRIPT = r"""
import json, sys, trio
from pathlib import Path
import structlog
from meridio.core.birdconf import FrontendConfig, Peer
from meridio.lb.frontend import Frontend

async def main(run_dir):
    frontend = Frontend(Path(run_dir), structlog.get_logger(), poll_interval=0.05)
    good = FrontendConfig("192.0.2.11", "lo", 4096, peers=(Peer("gw-a", "192.0.2.1", 4),))
    out = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(frontend.run)
        frontend.set_config(good)
        with trio.fail_after(10):
            while not (frontend.running and frontend.applied == good):
                await trio.sleep(0.02)
        first = frontend.control
        out["pid"] = Path(run_dir, "bird.pid").read_text().strip()
        bad = FrontendConfig(
            "192.0.2.11", "lo", 4096, peers=(Peer("gw-a", "192.0.2.1", 4, hold_time=2),)
        )
        frontend.set_config(bad)
        with trio.fail_after(10):
            while frontend.applied != bad:
                await trio.sleep(0.02)
        with trio.fail_after(10):  # the session's state polled from BIRD
            while not frontend.gateways:
                await trio.sleep(0.02)
        out["error"] = frontend.error
        out["running"] = frontend.running
        out["gateways"] = [g.state for g in frontend.gateways]
        out["pid_after"] = Path(run_dir, "bird.pid").read_text().strip()
        out["conf_kept"] = "hold time" not in Path(run_dir, "bird.conf").read_text()
        reply = await frontend.control.ask('show protocols all "gw-a"')
        out["hold"] = [t for _, t in reply.lines if "Hold timer" in t or "BGP state" in t]
        nursery.cancel_scope.cancel()
    print(json.dumps(out))

trio.run(main, sys.argv[1])
"""


def test_a_configuration_bird_refuses_keeps_the_running_one(
    tmp_path: Path, bird_installed: None
) -> None:
    ns = make_netns("bird")
    try:
        script = tmp_path / "refused.py"
        script.write_text(REFUSED_SCRIPT)
        result = ns.run(sys.executable, str(script), str(tmp_path / "run"), check=False)
    finally:
        ns.close()
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["running"] and out["pid"] == out["pid_after"], out  # not restarted
    assert "BIRD refused the configuration" in out["error"], out
    assert "Hold time must be in range 3-65535 or zero" in out["error"], out
    assert out["conf_kept"], out
    assert out["gateways"] == ["active"] or out["gateways"][0] in ("idle", "connect", "active")


# A change the LB makes while BIRD parses its first configuration (the LB became able to
# forward meanwhile): BIRD must end up with it. The wrapper holds the parse until the test
# has made the change.
CHANGED_WHILE_PARSING_SCRIPT = r"""
import dataclasses, json, sys, trio
from pathlib import Path
import structlog
from meridio.core.birdconf import FrontendConfig, Peer
from meridio.lb.frontend import Frontend

async def main(run_dir, wrapper):
    frontend = Frontend(Path(run_dir), structlog.get_logger(), binary=wrapper, poll_interval=0.05)
    quiet = FrontendConfig("192.0.2.11", "lo", 4096, peers=(Peer("gw-a", "192.0.2.1", 4),))
    announcing = dataclasses.replace(quiet, announce=("203.0.113.1/32",))
    out = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(frontend.run)
        frontend.set_config(quiet)
        with trio.fail_after(10):
            while not Path(run_dir, "parsing").exists():
                await trio.sleep(0.01)
        frontend.set_config(announcing)
        Path(run_dir, "go").touch()
        with trio.fail_after(10):
            while not (frontend.running and frontend.applied == announcing):
                await trio.sleep(0.02)
        routes = ""
        with trio.move_on_after(10):
            while "203.0.113.1/32" not in routes:
                reply = await frontend.control.ask("show route")
                routes = " ".join(t for _, t in reply.lines)
                await trio.sleep(0.05)
        out["routes"] = routes
        out["announced"] = list(frontend.announced)
        nursery.cancel_scope.cancel()
    print(json.dumps(out))

trio.run(main, sys.argv[1], sys.argv[2])
"""


def test_a_change_made_while_bird_parses_its_first_configuration_is_applied(
    tmp_path: Path, bird_installed: None
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    wrapper = tmp_path / "bird"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-p" ] && [ ! -e {run_dir}/go ]; then\n'
        f"  touch {run_dir}/parsing\n"
        f"  while [ ! -e {run_dir}/go ]; do sleep 0.01; done\n"
        "fi\n"
        f'exec {BIRD} "$@"\n'
    )
    wrapper.chmod(0o755)
    ns = make_netns("bird")
    try:
        script = tmp_path / "changed.py"
        script.write_text(CHANGED_WHILE_PARSING_SCRIPT)
        result = ns.run(sys.executable, str(script), str(run_dir), str(wrapper), check=False)
    finally:
        ns.close()
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "203.0.113.1/32" in out["routes"], out  # BIRD has the VIP to announce
    assert out["announced"] == ["203.0.113.1/32"], out
