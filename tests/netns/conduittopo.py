"""LBs, proxies ("nodes") and targets joined by conduits, each in its own network namespace.

::

                              primary ns: bridge br0 (198.51.100.0/24, fd00:5::/64)
            +-----------------+-----------+-----------+-----------+-----------+
          lb1 .11           lb2 .12     node1 .21   node2 .22    t1 .31 ...  (eth0 in each)
     connect :7779      connect :7779  proxy :7780  proxy :7780   target sidecars
            \\ x1 192.0.2.0/30  / x2 192.0.2.4/30
             client (lo 192.0.2.100, fd00:c::100): VIPs via both LBs (ECMP)
    ctl ns: IPAM and NSP on unix sockets under the test's workdir

Every LB runs ``meridiod --role=lb`` (kernel mode) with its connect endpoint on its primary
address; every node runs ``--role=proxy``; targets ``t1..tN`` run ``--role=target`` beside an
echo server (lbtopo's) that answers on the VIPs, port 5001, with the target's name. Targets are
spread over the nodes in turn. The mechanism (veth or vxlan) and the conduit's IP families
(dualstack, ipv4, ipv6) are parameters; vxlan runs over the primary network, IPv4 or IPv6
(``underlay``). Over IPv4 the roles find their underlay address themselves (route lookup
toward the peer); over IPv6 it is given as ``--primary-address``.

Conduit addresses come from IPAM: 198.18.0.0/16 (conduit /20, node /24) and fd00:10::/48
(conduit /56, node /64). VIPs: 203.0.113.10/32 and 2001:db8::10/128.

Namespaces are named ``mcdt-<pid>-<tag><hex>`` and removed (with their processes) on close;
those of a killed test process are reaped by the next build.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import meridio
from meridio.api.meridio.admin.v1 import (
    IpamInspectStub,
    ListAllocationsRequest,
    ShowResponse,
)
from meridio.api.nsp.v1 import (
    Conduit,
    Stream,
    Target,
    TargetRegistryStub,
    TargetStatus,
    TargetType,
    Trench,
)
from tests import waiting
from tests.conftest import Netns
from tests.netns.daemons import Daemon, channel, run_async
from tests.netns.lbtopo import (
    ECHO_SERVER,
    LbDaemon,
    inside,
    ip_batch,
    ip_json,
    lb_show,
    make_ns,
    reap_stale,
    sysctl,
)

PREFIX = "mcdt-"
REPO = Path(__file__).resolve().parents[2]
# the daemons run the meridio this test runs (a worktree's, with PYTHONPATH=src), not whichever
# the environment installed, and find tests.netns.rolelauncher in the repository
DAEMON_PATH = os.pathsep.join([str(Path(meridio.__file__).resolve().parents[1]), str(REPO)])
TRENCH = "trench-a"
CONDUIT = "conduit-a"
STREAM = "stream-a"
SMALL_STREAM = "stream-b"  # max-targets 1, no flow: for the "stream full" case
MAX_TARGETS = 8
PORT = 5001
VIP4 = "203.0.113.10"
VIP6 = "2001:db8::10"
CLIENT4 = "192.0.2.100"
CLIENT6 = "fd00:c::100"
LB_PORT = 7779
PROXY_PORT = 7780
IPAM_V4 = "198.18.0.0/16"
IPAM_V6 = "fd00:10::/48"
EXPIRY = 6  # seconds a connection lives without a refresh (both endpoints)
FAMILIES = {"dualstack": (4, 6), "ipv4": (4,), "ipv6": (6,)}

NSP_CONFIG: dict[str, Any] = {
    "trench": {"name": TRENCH},
    "conduits": {"items": [{"name": CONDUIT, "trench": TRENCH}]},
    "streams": {
        "items": [
            {"name": STREAM, "conduit": CONDUIT, "max-targets": MAX_TARGETS},
            {"name": SMALL_STREAM, "conduit": CONDUIT, "max-targets": 1},
        ]
    },
    "vips": {
        "items": [
            {"name": "vip4", "address": f"{VIP4}/32", "trench": TRENCH},
            {"name": "vip6", "address": f"{VIP6}/128", "trench": TRENCH},
        ]
    },
    "flows": {
        "items": [
            {
                "name": "flow-a",
                "stream": STREAM,
                "vips": ["vip4", "vip6"],
                "protocols": ["tcp", "udp"],
                "destination-port-ranges": [str(PORT)],
            }
        ]
    },
}


def primary(host: int, underlay: int) -> str:
    return f"198.51.100.{host}" if underlay == 4 else f"fd00:5::{host}"


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class RoleDaemon(Daemon):
    """``meridiod`` through tests/netns/rolelauncher.py (proxy and target roles before their
    entry points are installed); no ``--listen``/``--database`` unless given."""

    def __init__(self, netns: Any, role: str, workdir: Path, *args: str) -> None:
        super().__init__(netns, role, workdir, *args, env={"PYTHONPATH": DAEMON_PATH})

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tests.netns.rolelauncher",
            f"--role={self.role}",
            f"--run-dir={self.run_dir}",
            "--log-format=json",
            *self.extra_args,
        ]


@dataclass
class Lb:
    name: str
    ns: Netns
    address: str
    daemon: LbDaemon

    @property
    def connect(self) -> str:
        return hostport(self.address, LB_PORT)


@dataclass
class Node:
    name: str
    ns: Netns
    address: str
    daemon: RoleDaemon


@dataclass
class TargetNode:
    name: str
    ns: Netns
    node: Node
    address: str
    daemon: RoleDaemon
    server: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)


class ConduitTopology:
    def __init__(
        self,
        workdir: Path,
        *,
        mechanism: str = "veth",
        ip_family: str = "dualstack",
        underlay: int = 4,
        lbs: int = 2,
        nodes: int = 2,
        targets: int = 4,
    ) -> None:
        self.workdir = workdir
        self.mechanism = mechanism
        self.ip_family = ip_family
        self.families = FAMILIES[ip_family]
        self.underlay = underlay
        self.n_lbs, self.n_nodes, self.n_targets = lbs, nodes, targets
        self.namespaces: list[Netns] = []
        self.lbs: dict[str, Lb] = {}
        self.nodes: dict[str, Node] = {}
        self.targets: dict[str, TargetNode] = {}
        self.ipam: Daemon | None = None
        self.nsp: Daemon | None = None
        self._next_host = {"lb": 10, "node": 20, "t": 30}

    # -- building

    def __enter__(self) -> ConduitTopology:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ns(self, tag: str) -> Netns:
        ns = make_ns(tag, PREFIX)
        self.namespaces.append(ns)
        return ns

    def _attach_primary(self, ns: Netns, tag: str, host: int) -> str:
        address = primary(host, self.underlay)
        length = 24 if self.underlay == 4 else 64
        ip_batch(
            self.primary_ns,
            [
                f"link add p-{tag} type veth peer name eth0 netns {ns.name}",
                f"link set p-{tag} master br0",
                f"link set p-{tag} up",
            ],
        )
        ip_batch(
            ns,
            [
                f"addr add {address}/{length} dev eth0" + (" nodad" if ":" in address else ""),
                "link set eth0 up",
            ],
        )
        return address

    def build(self) -> None:
        reap_stale(PREFIX)
        self.primary_ns = self._ns("pri")
        ip_batch(self.primary_ns, ["link add br0 type bridge", "link set br0 up"])
        self.ctl_ns = self._ns("ctl")
        self.client_ns = self._ns("cl")
        ip_batch(
            self.client_ns,
            [f"addr add {CLIENT4}/32 dev lo", f"addr add {CLIENT6}/128 dev lo"],
        )
        sysctl(
            self.client_ns,
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        )
        self._start_control()
        lbs = [self._add_lb(external=i <= 2) for i in range(1, self.n_lbs + 1)]
        nodes = [self._add_node() for _ in range(self.n_nodes)]
        self._client_routes()
        for daemon in [lb.daemon for lb in lbs] + [n.daemon for n in nodes]:
            daemon.spawn()
        for daemon in [lb.daemon for lb in lbs] + [n.daemon for n in nodes]:
            run_async(daemon.ready(timeout=30))
        node_list = list(self.nodes.values())
        new = [
            self.add_target(node_list[i % len(node_list)], start=False)
            for i in range(self.n_targets)
        ]
        for t in new:
            t.daemon.spawn()
        for t in new:
            self._target_ready(t)

    def _start_control(self) -> None:
        config = self.workdir / "meridio-configuration.yaml"
        config.write_text(yaml.safe_dump(NSP_CONFIG, sort_keys=False))
        self.nsp = Daemon(
            self.ctl_ns,
            "nsp",
            self.workdir / "nsp",
            f"--configuration-file={config}",
            "--entry-timeout=30",
        )
        ipam_args = [
            f"--prefix-ipv4={IPAM_V4 if 4 in self.families else ''}",
            f"--prefix-ipv6={IPAM_V6 if 6 in self.families else ''}",
        ]
        self.ipam = Daemon(self.ctl_ns, "ipam", self.workdir / "ipam", *ipam_args)
        self.nsp.spawn()
        self.ipam.spawn()
        run_async(self.nsp.ready(20))
        run_async(self.ipam.ready(20))

    def _host(self, kind: str) -> int:
        self._next_host[kind] += 1
        return self._next_host[kind]

    def add_lb(self, *, external: bool = False, start: bool = True) -> Lb:
        """Another LB (started unless ``start`` is false)."""
        lb = self._add_lb(external=external)
        if start:
            run_async(lb.daemon.start(timeout=30))
        return lb

    def _add_lb(self, *, external: bool) -> Lb:
        host = self._host("lb")
        index = host - 10
        name = f"lb{index}"
        ns = self._ns(f"{name}-")
        sysctl(
            ns,
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        )
        address = self._attach_primary(ns, name, host)
        if external:
            a, b = 4 * (index - 1) + 1, 4 * (index - 1) + 2
            ip_batch(
                ns,
                [
                    f"link add x0 type veth peer name x{index} netns {self.client_ns.name}",
                    f"addr add 192.0.2.{a}/30 dev x0",
                    f"addr add fd00:e{index}::1/64 dev x0 nodad",
                    "link set x0 up",
                    f"route add {CLIENT4}/32 via 192.0.2.{b}",
                    f"route add {CLIENT6}/128 via fd00:e{index}::2",
                ],
            )
            ip_batch(
                self.client_ns,
                [
                    f"addr add 192.0.2.{b}/30 dev x{index}",
                    f"addr add fd00:e{index}::2/64 dev x{index} nodad",
                    f"link set x{index} up",
                ],
            )
        daemon = LbDaemon(
            ns,
            "lb",
            self.workdir / name,
            f"--instance={name}",
            f"--nsp=unix://{self.nsp_socket}",
            f"--trench={TRENCH}",
            f"--conduit={CONDUIT}",
            "--mode=kernel",
            "--resync-period=1",
            f"--connect-listen={hostport(address, LB_PORT)}",
            f"--connect-expiry={EXPIRY}",
            "--announce-interval=2",
        )
        lb = Lb(name, ns, address, daemon)
        self.lbs[name] = lb
        return lb

    def _client_routes(self) -> None:
        external = [i for i in range(1, min(self.n_lbs, 2) + 1)]
        v4 = " ".join(f"nexthop via 192.0.2.{4 * (i - 1) + 1}" for i in external)
        v6 = " ".join(f"nexthop via fd00:e{i}::1" for i in external)
        ip_batch(self.client_ns, [f"route add {VIP4}/32 {v4}", f"route add {VIP6}/128 {v6}"])

    def _add_node(self) -> Node:
        host = self._host("node")
        name = f"node{host - 20}"
        ns = self._ns(f"{name}-")
        address = self._attach_primary(ns, name, host)
        args = [
            f"--instance=proxy-{name}",
            f"--node={name}",
            f"--nsp=unix://{self.nsp_socket}",
            f"--ipam=unix://{self.ipam_socket}",
            f"--trench={TRENCH}",
            f"--conduit={CONDUIT}",
            f"--connect-listen={hostport(address, PROXY_PORT)}",
            f"--mechanism={self.mechanism}",
            f"--ip-family={self.ip_family}",
            f"--connect-expiry={EXPIRY}",
            "--register-interval=3",
            "--resync-period=2",
        ]
        if self.mechanism == "vxlan" and self.underlay == 6:  # IPv4: found by route lookup
            args.append(f"--primary-address={address}")
        node = Node(name, ns, address, RoleDaemon(ns, "proxy", self.workdir / name, *args))
        self.nodes[name] = node
        return node

    def add_target(
        self, node: Node, *, start: bool = True, name: str | None = None, streams: str = STREAM
    ) -> TargetNode:
        host = self._host("t")
        name = name or f"t{host - 30}"
        ns = self._ns(f"{name}-")
        address = self._attach_primary(ns, name, host)
        args = [
            f"--instance={name}",
            f"--node={node.name}",
            f"--proxy={hostport(node.address, PROXY_PORT)}",
            f"--nsp=unix://{self.nsp_socket}",
            f"--trench={TRENCH}",
            f"--conduit={CONDUIT}",
            f"--streams={streams}",
            f"--mechanism={self.mechanism}",
            "--drain-time=1",
            "--resync-period=2",
        ]
        if self.mechanism == "vxlan" and self.underlay == 6:
            args.append(f"--primary-address={address}")
        daemon = RoleDaemon(ns, "target", self.workdir / name, *args)
        target = TargetNode(name, ns, node, address, daemon)
        self.targets[name] = target
        if start:
            daemon.spawn()
            self._target_ready(target)
        return target

    def _target_ready(self, target: TargetNode) -> None:
        run_async(target.daemon.ready(timeout=30))
        vips = [v for f, v in ((4, VIP4), (6, VIP6)) if f in self.families]
        target.server = target.ns.popen(
            sys.executable,
            "-c",
            ECHO_SERVER,
            target.name,
            str(PORT),
            *vips,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert target.server.stdout is not None
        ready, _, _ = select.select([target.server.stdout], [], [], 10)
        if not ready or target.server.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"echo server of {target.name} did not start")

    # -- tearing down

    def remove_target_namespace(self, name: str) -> None:
        target = self.targets.pop(name)
        target.ns.close()
        self.namespaces.remove(target.ns)

    def close(self) -> None:
        daemons: list[Daemon] = [t.daemon for t in self.targets.values()]
        daemons += [n.daemon for n in self.nodes.values()]
        daemons += [lb.daemon for lb in self.lbs.values()]
        for daemon in daemons:
            if daemon.alive():
                daemon.signal(signal.SIGTERM)
        for daemon in daemons:
            with contextlib.suppress(Exception):
                run_async(daemon.wait_exit(10))
            if daemon.alive():
                daemon.kill()
        for daemon in (self.nsp, self.ipam):
            if daemon is not None and daemon.alive():
                daemon.signal(signal.SIGTERM)
                with contextlib.suppress(Exception):
                    run_async(daemon.wait_exit(5))
        for ns in reversed(self.namespaces):
            ns.close()
        self.namespaces.clear()

    # -- observing

    @property
    def nsp_socket(self) -> Path:
        assert self.nsp is not None
        return self.nsp.socket

    @property
    def ipam_socket(self) -> Path:
        assert self.ipam is not None
        return self.ipam.socket

    def nsp_targets(self, kind: TargetType = TargetType.DEFAULT) -> list[Target]:
        async def go() -> list[Target]:
            async with channel(self.nsp_socket) as ch:
                stub = TargetRegistryStub(ch, timeout=5)
                query = Target(
                    status=TargetStatus.ANY,
                    type=kind,
                    stream=Stream(conduit=Conduit(name=CONDUIT, trench=Trench(name=TRENCH))),
                )
                async for reply in stub.watch(query):
                    return list(reply.targets)
            return []

        return run_async(go())

    def allocations(self) -> list[Any]:
        async def go() -> list[Any]:
            async with channel(self.ipam_socket) as ch:
                reply = await IpamInspectStub(ch, timeout=5).list(ListAllocationsRequest())
                return list(reply.allocations)

        return run_async(go())

    def show(self, lb: str) -> ShowResponse:
        return lb_show(self.lbs[lb].daemon.socket)

    def lb_target_ips(self, lb: str) -> set[tuple[int, tuple[str, ...]]]:
        """(identifier, ips) of every target in the LB's table."""
        try:
            show = self.show(lb)
        except Exception:
            return set()
        return {(t.identifier, tuple(t.ips)) for s in show.streams for t in s.targets}

    @staticmethod
    def links(ns: Netns) -> list[dict[str, Any]]:
        return ip_json(ns, "-d", "link", "show")

    @staticmethod
    def global_addresses(ns: Netns, ifname: str | None = None) -> list[str]:
        args = ["addr", "show"] + (["dev", ifname] if ifname else [])
        out = []
        for link in ip_json(ns, *args):
            for info in link.get("addr_info", []):
                if info.get("scope") == "global" and link.get("ifname") != "eth0":
                    out.append(f"{info['local']}/{info['prefixlen']}")
        return out

    @staticmethod
    def routes(ns: Netns, table: int, family: int) -> list[dict[str, Any]]:
        return ip_json(ns, f"-{family}", "route", "show", "table", str(table))

    @staticmethod
    def rules(ns: Netns, family: int) -> list[dict[str, Any]]:
        return ip_json(ns, f"-{family}", "rule", "show")

    def egress_hops(self, node: str, family: int) -> set[str]:
        """The next hops of the proxy's egress default route."""
        hops: set[str] = set()
        for route in self.routes(self.nodes[node].ns, 1, family):
            if route.get("dst") == "default":
                if "gateway" in route:
                    hops.add(route["gateway"])
                for nh in route.get("nexthops", []):
                    hops.add(nh["gateway"])
        return hops

    def conduit_links(self, ns: Netns, prefix: str) -> list[dict[str, Any]]:
        return [link for link in self.links(ns) if link["ifname"].startswith(prefix)]


# -- traffic ------------------------------------------------------------------------------------


def udp_probe(client_ns: str, family: int, count: int, timeout: float = 2.0) -> dict[int, str]:
    """One UDP datagram from each of ``count`` source ports to the VIP; port -> answering
    target (ports without an answer are missing)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    vip, src = (VIP4, CLIENT4) if family == 4 else (VIP6, CLIENT6)
    socks: dict[int, socket.socket] = {}
    with inside(client_ns):
        for _ in range(count):
            sock = socket.socket(af, socket.SOCK_DGRAM)
            sock.bind((src, 0))
            sock.connect((vip, PORT))
            sock.setblocking(False)
            socks[sock.getsockname()[1]] = sock
    answers: dict[int, str] = {}
    try:
        for _round in range(3):
            for port, sock in socks.items():
                if port not in answers:
                    with contextlib.suppress(OSError):
                        sock.send(b"ping")
            deadline = time.monotonic() + timeout
            while len(answers) < len(socks) and time.monotonic() < deadline:
                ready, _, _ = select.select(list(socks.values()), [], [], 0.1)
                for sock in ready:
                    with contextlib.suppress(OSError):
                        data = sock.recv(4096)
                        answers[sock.getsockname()[1]] = data.split(b" ", 1)[0].decode()
            if len(answers) == len(socks):
                break
    finally:
        for sock in socks.values():
            sock.close()
    return answers


def tcp_echo(client_ns: str, family: int, timeout: float = 3.0) -> str:
    """Connect to the VIP over TCP, send and get the echo; the answering target's name."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    vip, src = (VIP4, CLIENT4) if family == 4 else (VIP6, CLIENT6)
    with inside(client_ns):
        sock = socket.socket(af, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.bind((src, 0))
        sock.connect((vip, PORT))
        sock.sendall(b"hello")
        reply = b""
        while not reply.endswith(b"hello"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply.split(b" ", 1)[0].decode()


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """:func:`tests.waiting.wait_until`; a predicate that raises (a daemon not answering yet)
    means "not yet"."""
    return waiting.wait_until(predicate, timeout, what, interval=interval, errors=(Exception,))


def in_network(address: str, networks: Iterable[str]) -> bool:
    ip = ipaddress.ip_interface(address).ip
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def dump(topo: ConduitTopology) -> str:
    """Logs of every daemon, for assertion messages."""
    parts = []
    daemons = [topo.nsp, topo.ipam] + [lb.daemon for lb in topo.lbs.values()]
    daemons += [n.daemon for n in topo.nodes.values()] + [t.daemon for t in topo.targets.values()]
    for d in daemons:
        if d is not None:
            parts.append(f"--- {d.workdir.name} ({d.role})\n{d.log_text()[-4000:]}")
    return "\n".join(parts)
