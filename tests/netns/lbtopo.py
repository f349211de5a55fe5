"""A client, one load balancer and N targets in network namespaces, for LB tests and benchmarks.

::

    client ns                LB ns                                   target ns (x N)
    eth0 198.18.0.2/24  ---  c0 198.18.0.1/24   br0 198.18.1.1/24 --- eth0 198.18.1.<10+i>/24
         fd00::2/64              fd00::1/64         fd00:1::1/64           fd00:1::<10+i>/64
    203.0.113.0/24 via LB    NSP + meridiod --role=lb                lo: 203.0.113.1, 2001:db8::1
    2001:db8::/32 via LB     (forwarding on, rp_filter off)          echo server, nft counters

The LB namespace runs the NSP (configuration: trench ``trench-a``, conduit ``lb-conduit``,
stream ``stream-a`` with ``max-targets`` 10, flow ``flow-a`` for both VIPs, TCP/UDP/SCTP, every
destination port) and ``meridiod --role=lb`` in the chosen mode. Target ``i`` (1..N) has the
identifier ``i``, so its fwmark and routing table are 5000 + i.

Every target runs a small echo server on both VIPs, port 5001, UDP and TCP: each datagram or
TCP read ``data`` is answered with ``b"<target name> " + data`` (the name is ``t<i>``), so the
client learns which target got a flow. An nftables table ``inet mtest`` in each target counts the
VIP packets that arrive (prerouting, priority -300): counters ``udp4``, ``udp6``, ``tcp4``,
``tcp6``, ``icmp4`` (destination-unreachable) and ``icmp6`` (packet-too-big).

Sockets "in" a namespace are made by the calling thread after ``setns(2)`` into it and back
(:func:`inside`), so a test holds client sockets in its own process.

Namespaces are named ``mlbt-<pid>-<tag><hex>``, not ``mtest-``: a pytest session started
meanwhile elsewhere on the machine reaps every ``mtest-`` namespace. Namespaces whose creating
process is gone are removed by :func:`reap_stale` (called on every build).

Use::

    with LbTopology(workdir, targets=4, mode="kernel") as topo:
        flows = topo.udp_flows(4, 100)
        print(Counter(flows.probe().values()))
        flows.close()
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from meridio.api.meridio.admin.v1 import (
    LbInspectStub,
    ShowRequest,
    ShowResponse,
    WhichRequest,
    WhichResponse,
)
from meridio.api.nsp.v1 import Conduit, Stream, Target, TargetRegistryStub, TargetStatus, Trench
from tests.conftest import Netns, delete_netns
from tests.netns.daemons import MERIDIOD, Daemon, channel, run_async
from tests.waiting import HANG, wait_until

PREFIX = "mlbt-"
TRENCH = "trench-a"
CONDUIT = "lb-conduit"
STREAM = "stream-a"
MAX_TARGETS = 10
OFFSET = 5000
RULE_PRIORITY = 100
PORT = 5001
VIP4 = "203.0.113.1"
VIP6 = "2001:db8::1"
CLIENT4 = "198.18.0.2"
CLIENT6 = "fd00::2"
LB4 = "198.18.1.1"
LB6 = "fd00:1::1"
COUNTER_TABLE = "mtest"
LB_NFT_TABLE = "meridio-lb"

NSP_CONFIG: dict[str, Any] = {
    "trench": {"name": TRENCH},
    "conduits": {"items": [{"name": CONDUIT, "trench": TRENCH}]},
    "streams": {"items": [{"name": STREAM, "conduit": CONDUIT, "max-targets": MAX_TARGETS}]},
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
                "protocols": ["tcp", "udp", "sctp"],
                "destination-port-ranges": ["1-65535"],
            }
        ]
    },
}

# The echo server each target runs: argv = name port vip...
ECHO_SERVER = r"""
import selectors, socket, sys, threading
name, port, vips = sys.argv[1].encode(), int(sys.argv[2]), sys.argv[3:]
sel = selectors.DefaultSelector()
for vip in vips:
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.bind((vip, port))
    sel.register(u, selectors.EVENT_READ, "udp")
    t = socket.socket(family, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((vip, port))
    t.listen(1024)
    sel.register(t, selectors.EVENT_READ, "tcp")

def serve(conn):
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            conn.sendall(name + b" " + data)

print("ready", flush=True)
while True:
    for key, _ in sel.select():
        sock = key.fileobj
        try:
            if key.data == "udp":
                data, peer = sock.recvfrom(65536)
                sock.sendto(name + b" " + data, peer)
            else:
                conn, _ = sock.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()
        except OSError:
            pass
"""

COUNTERS_NFT = f"""
table inet {COUNTER_TABLE} {{
    counter udp4 {{}}
    counter udp6 {{}}
    counter tcp4 {{}}
    counter tcp6 {{}}
    counter icmp4 {{}}
    counter icmp6 {{}}
    chain prerouting {{
        type filter hook prerouting priority -300; policy accept;
        ip daddr {VIP4} meta l4proto udp counter name "udp4"
        ip6 daddr {VIP6} meta l4proto udp counter name "udp6"
        ip daddr {VIP4} meta l4proto tcp counter name "tcp4"
        ip6 daddr {VIP6} meta l4proto tcp counter name "tcp6"
        ip daddr {VIP4} icmp type destination-unreachable counter name "icmp4"
        ip6 daddr {VIP6} icmpv6 type packet-too-big counter name "icmp6"
    }}
}}
"""


# -- namespaces -------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside(ns_name: str) -> Iterator[None]:
    """Run the block with the calling thread in namespace ``ns_name`` (sockets made there stay
    there); the thread returns to its own namespace afterwards."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns_name}") as there:
        _setns(there.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(prefix: str = PREFIX) -> None:
    """Remove ``<prefix><pid>-...`` namespaces whose creating process no longer runs."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            delete_netns(name)


def make_ns(tag: str, prefix: str = PREFIX) -> Netns:
    name = f"{prefix}{os.getpid()}-{tag}{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    ns = Netns(name)
    ns.run("ip", "link", "set", "lo", "up")
    return ns


def sysctl(ns: Netns, *settings: str) -> None:
    ns.run("sysctl", "-q", "-w", *settings)


def ip_batch(ns: Netns, commands: Iterable[str]) -> None:
    """Run ``ip`` commands (without the leading ``ip``) in one ``ip -batch`` process."""
    script = "\n".join(commands) + "\n"
    result = subprocess.run(
        ["ip", "-n", ns.name, "-batch", "-"], input=script, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"ip -batch in {ns.name} failed: {result.stderr.strip()}\n{script}")


def nft_json(ns: Netns, *args: str) -> list[dict[str, Any]]:
    out = ns.run("nft", "-j", *args, check=False)
    if out.returncode != 0:
        return []
    return list(json.loads(out.stdout).get("nftables", []))


def ip_json(ns: Netns, *args: str) -> list[dict[str, Any]]:
    out = ns.run("ip", "-j", *args, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return list(json.loads(out.stdout))


# -- daemons ----------------------------------------------------------------------------------


class LbDaemon(Daemon):
    """``meridiod --role=lb``: no --listen/--database; its service socket is run/lb.sock."""

    @property
    def socket(self) -> Path:
        return self.run_dir / "lb.sock"

    @property
    def argv(self) -> list[str]:
        return [
            MERIDIOD,
            "--role=lb",
            f"--run-dir={self.run_dir}",
            "--log-format=json",
            *self.extra_args,
        ]


def start_nsp(
    ns: Netns, workdir: Path, *args: str, configuration: dict[str, Any] | None = None
) -> Daemon:
    """An NSP with ``configuration`` (default :data:`NSP_CONFIG`) in ``ns`` (registrations
    live an hour)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "meridio-configuration.yaml"
    config.write_text(yaml.safe_dump(configuration or NSP_CONFIG, sort_keys=False))
    nsp = Daemon(
        ns,
        "nsp",
        workdir / "nsp",
        f"--configuration-file={config}",
        "--entry-timeout=3600",
        *args,
    )
    run_async(nsp.start())
    return nsp


def lb_daemon(ns: Netns, workdir: Path, nsp: Daemon, mode: str, *args: str) -> LbDaemon:
    """An LB daemon (not started) fed by ``nsp``."""
    return LbDaemon(
        ns,
        "lb",
        workdir,
        f"--nsp=unix://{nsp.socket}",
        f"--trench={TRENCH}",
        f"--conduit={CONDUIT}",
        f"--mode={mode}",
        "--resync-period=1",
        "--withdraw-grace=0.2",  # the tests stop LBs often; the lab keeps the default
        *args,
    )


# -- gRPC helpers -----------------------------------------------------------------------------


def target_ips(index: int) -> tuple[str, str]:
    """The eth0 addresses of target ``index`` (1-based)."""
    return f"198.18.1.{10 + index}", f"fd00:1::{10 + index}"


def target_message(index: int, status: TargetStatus = TargetStatus.ENABLED) -> Target:
    ip4, ip6 = target_ips(index)
    return Target(
        ips=[f"{ip4}/24", f"{ip6}/64"],
        context={"identifier": str(index)},
        status=status,
        stream=Stream(name=STREAM, conduit=Conduit(name=CONDUIT, trench=Trench(name=TRENCH))),
    )


def register(nsp_socket: Path | str, indexes: Iterable[int], *, announce: bool = True) -> None:
    """Register each target enabled, in order; with ``announce`` disabled first, as a new
    target does (only for targets not yet registered: disabling an enabled target takes it
    out of the LB's table until it is enabled again)."""

    async def go() -> None:
        async with channel(nsp_socket) as ch:
            stub = TargetRegistryStub(ch, timeout=5)
            for i in indexes:
                if announce:
                    await stub.register(target_message(i, TargetStatus.DISABLED))
                await stub.register(target_message(i, TargetStatus.ENABLED))

    run_async(go())


def unregister(nsp_socket: Path | str, indexes: Iterable[int]) -> None:
    async def go() -> None:
        async with channel(nsp_socket) as ch:
            stub = TargetRegistryStub(ch, timeout=5)
            for i in indexes:
                await stub.unregister(target_message(i))

    run_async(go())


def lb_show(lb_socket: Path | str) -> ShowResponse:
    async def go() -> ShowResponse:
        async with channel(lb_socket) as ch:
            return await LbInspectStub(ch, timeout=5).show(ShowRequest())

    return run_async(go())


def lb_which(lb_socket: Path | str, requests: list[WhichRequest]) -> list[WhichResponse]:
    async def go() -> list[WhichResponse]:
        async with channel(lb_socket) as ch:
            stub = LbInspectStub(ch, timeout=5)
            return [await stub.which(r) for r in requests]

    return run_async(go())


def shown_identifiers(show: ShowResponse) -> set[int]:
    if not show.streams:
        return set()
    return {t.identifier for t in show.streams[0].targets}


# -- the topology -----------------------------------------------------------------------------


@dataclass
class TargetNode:
    index: int
    ns: Netns
    ipv4: str
    ipv6: str
    server: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"t{self.index}"

    def counters(self) -> dict[str, int]:
        """Packets per counter of the ``inet mtest`` table."""
        out = {}
        for item in nft_json(self.ns, "list", "counters", "table", "inet", COUNTER_TABLE):
            counter = item.get("counter")
            if counter:
                out[counter["name"]] = int(counter["packets"])
        return out


def _family(family: int) -> tuple[socket.AddressFamily, str, str]:
    if family == 4:
        return socket.AF_INET, VIP4, CLIENT4
    return socket.AF_INET6, VIP6, CLIENT6


class UdpFlows:
    """``count`` UDP sockets in the client namespace, each one flow to VIP:PORT (its own source
    port), kept open so the same flows can be probed again."""

    def __init__(self, client_ns: str, family: int, count: int) -> None:
        af, self.vip, self.client = _family(family)
        self.family = family
        self.socks: dict[int, socket.socket] = {}
        with inside(client_ns):
            for _ in range(count):
                sock = socket.socket(af, socket.SOCK_DGRAM)
                sock.bind((self.client, 0))
                sock.connect((self.vip, PORT))
                sock.setblocking(False)
                self.socks[sock.getsockname()[1]] = sock

    @property
    def ports(self) -> list[int]:
        return list(self.socks)

    def probe(self, *, rounds: int = 3, timeout: float = 1.0) -> dict[int, str | None]:
        """Send one datagram per flow (again to those still unanswered, up to ``rounds``
        times); source port -> the target name that answered, or None."""
        answer: dict[int, str | None] = dict.fromkeys(self.socks)
        for sock in self.socks.values():  # drop late answers of an earlier probe
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass
        sel = selectors.DefaultSelector()
        for port, sock in self.socks.items():
            sel.register(sock, selectors.EVENT_READ, port)
        try:
            for _ in range(rounds):
                waiting = [p for p, name in answer.items() if name is None]
                if not waiting:
                    break
                for port in waiting:
                    with contextlib.suppress(OSError):
                        self.socks[port].send(b"ping %d" % port)
                deadline = time.monotonic() + timeout
                while any(answer[p] is None for p in waiting):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    for key, _ in sel.select(left):
                        try:
                            data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                        except OSError:  # e.g. an ICMP unreachable for a connected socket
                            continue
                        answer[key.data] = data.split(b" ", 1)[0].decode()
        finally:
            sel.close()
        return answer

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()


@dataclass
class TcpConn:
    sock: socket.socket
    sport: int
    target: str

    def echo(self, data: bytes = b"again", timeout: float = 2.0) -> str | None:
        """Send ``data``; the name of the target that echoed it, or None (reset, timeout)."""
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
            reply = b""
            while not reply.endswith(data):
                chunk = self.sock.recv(4096)
                if not chunk:
                    return None
                reply += chunk
        except OSError:
            return None
        return reply.split(b" ", 1)[0].decode()


class LbTopology:
    """Build (``__enter__``) and remove (``__exit__``/:meth:`close`) the whole topology.

    ``targets``: how many (1..10); ``mode``: the LB's mode; ``lb_args``: more LB flags;
    ``register``: register and enable every target and wait until the LB installed them;
    ``servers``: run the echo servers; ``start_lb``: start the NSP and the LB at all (without
    them the LB namespace only forwards; ``lb``/``nsp`` stay None).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        targets: int = 4,
        mode: str = "kernel",
        lb_args: Iterable[str] = (),
        prefix: str = PREFIX,
        register: bool = True,
        servers: bool = True,
        start_lb: bool = True,
    ) -> None:
        if not 1 <= targets <= MAX_TARGETS:
            raise ValueError(f"1..{MAX_TARGETS} targets")
        self.workdir = workdir
        self.n_targets = targets
        self.mode = mode
        self.lb_args = list(lb_args)
        self.prefix = prefix
        self.register_targets = register
        self.servers = servers
        self.start_lb_daemon = start_lb
        self.namespaces: list[Netns] = []
        self.targets: list[TargetNode] = []
        self.nsp: Daemon | None = None
        self.lb: LbDaemon | None = None
        self.lb_exit: int | None = None

    # -- life cycle

    def __enter__(self) -> LbTopology:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ns(self, tag: str) -> Netns:
        ns = make_ns(tag, self.prefix)
        self.namespaces.append(ns)
        return ns

    def build(self) -> None:
        reap_stale(self.prefix)
        self.lb_ns = lb = self._ns("lb")
        self.client_ns = client = self._ns("cl")
        sysctl(
            lb,
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        )
        ip_batch(
            lb,
            [
                "link add br0 type bridge",
                f"addr add {LB4}/24 dev br0",
                f"addr add {LB6}/64 dev br0 nodad",
                "link set br0 up",
                f"link add c0 type veth peer name eth0 netns {client.name}",
                "addr add 198.18.0.1/24 dev c0",
                "addr add fd00::1/64 dev c0 nodad",
                "link set c0 up",
            ],
        )
        ip_batch(
            client,
            [
                f"addr add {CLIENT4}/24 dev eth0",
                f"addr add {CLIENT6}/64 dev eth0 nodad",
                "link set eth0 up",
                "route add 203.0.113.0/24 via 198.18.0.1",
                "route add 2001:db8::/32 via fd00::1",
            ],
        )
        for i in range(1, self.n_targets + 1):
            self.targets.append(self._add_target(i))
        self.warm_neighbours()
        if not self.start_lb_daemon:  # e.g. a benchmark's baseline: plain forwarding
            return
        self.nsp = start_nsp(lb, self.workdir)
        self.lb = lb_daemon(lb, self.workdir / "lb", self.nsp, self.mode, *self.lb_args)
        run_async(self.lb.start(timeout=20))
        if self.register_targets:
            self.register(range(1, self.n_targets + 1))
            self.wait_targets(set(range(1, self.n_targets + 1)))

    def _add_target(self, i: int) -> TargetNode:
        ns = self._ns(f"t{i}-")
        ip4, ip6 = target_ips(i)
        sysctl(ns, "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        ip_batch(
            self.lb_ns,
            [
                f"link add t{i} type veth peer name eth0 netns {ns.name}",
                f"link set t{i} master br0",
                f"link set t{i} up",
            ],
        )
        ip_batch(
            ns,
            [
                f"addr add {ip4}/24 dev eth0",
                f"addr add {ip6}/64 dev eth0 nodad",
                "link set eth0 up",
                f"route add default via {LB4}",
                f"route add default via {LB6}",
                f"addr add {VIP4}/32 dev lo",
                f"addr add {VIP6}/128 dev lo nodad",
            ],
        )
        subprocess.run(
            ["ip", "netns", "exec", ns.name, "nft", "-f", "-"],
            input=COUNTERS_NFT,
            text=True,
            check=True,
            capture_output=True,
        )
        node = TargetNode(i, ns, ip4, ip6)
        if self.servers:
            node.server = ns.popen(
                sys.executable,
                "-c",
                ECHO_SERVER,
                node.name,
                str(PORT),
                VIP4,
                VIP6,
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            assert node.server.stdout is not None
            ready, _, _ = select.select([node.server.stdout], [], [], 10)
            if not ready or node.server.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"echo server in {ns.name} did not start")
        return node

    def warm_neighbours(self) -> None:
        """Ping across every link once, so that the first burst of a test does not wait in
        (and overflow) the queue of an unresolved neighbour."""
        pings = [(self.client_ns, "198.18.0.1"), (self.client_ns, "fd00::1")]
        for t in self.targets:
            pings += [(t.ns, LB4), (t.ns, LB6)]
        procs = [
            subprocess.Popen(
                ["ip", "netns", "exec", ns.name, "ping", "-c1", "-W2", "-q", address],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for ns, address in pings
        ]
        for proc in procs:
            proc.wait(10)

    def stop_lb(self, timeout: float = HANG) -> int:
        """SIGTERM the LB and wait for its exit status."""
        assert self.lb is not None
        self.lb_exit = run_async(self.lb.stop(timeout))
        return self.lb_exit

    def start_lb(self) -> None:
        """Start the LB again (same run-dir) and wait until it is ready (see
        :meth:`wait_targets` for its table)."""
        assert self.lb is not None
        self.lb_exit = None
        run_async(self.lb.start(timeout=20))

    def close(self) -> None:
        if self.lb is not None and self.lb.alive():
            with contextlib.suppress(Exception):
                self.stop_lb()
            if self.lb.alive():
                self.lb.kill()
        if self.nsp is not None and self.nsp.alive():
            self.nsp.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                assert self.nsp.proc is not None
                self.nsp.proc.wait(5)
        for ns in reversed(self.namespaces):
            ns.close()
        self.namespaces.clear()

    # -- control plane

    @property
    def lb_socket(self) -> Path:
        assert self.lb is not None
        return self.lb.socket

    @property
    def nsp_socket(self) -> Path:
        assert self.nsp is not None
        return self.nsp.socket

    def register(self, indexes: Iterable[int], *, announce: bool = True) -> None:
        register(self.nsp_socket, indexes, announce=announce)

    def ensure_registered(self, indexes: Iterable[int]) -> None:
        """Make sure these targets are registered and enabled, without disturbing those that
        already are (their registration is only refreshed)."""
        register(self.nsp_socket, indexes, announce=False)

    def unregister(self, indexes: Iterable[int]) -> None:
        unregister(self.nsp_socket, indexes)

    def show(self) -> ShowResponse:
        return lb_show(self.lb_socket)

    def which(
        self, family: int, sports: Iterable[int], protocol: str = "udp"
    ) -> dict[int, WhichResponse]:
        _, vip, client = _family(family)
        ports = list(sports)
        requests = [
            WhichRequest(src=client, dst=vip, sport=p, dport=PORT, protocol=protocol) for p in ports
        ]
        return dict(zip(ports, lb_which(self.lb_socket, requests), strict=True))

    def nft_marks(self) -> set[int]:
        """The non-zero marks in the LB's nftables maps (kernel mode)."""
        marks: set[int] = set()
        for item in nft_json(self.lb_ns, "list", "table", "inet", LB_NFT_TABLE):
            elements = item.get("map", {}).get("elem", [])
            for element in elements:
                if isinstance(element, list) and len(element) == 2 and element[1]:
                    marks.add(int(element[1]))
        return marks

    def wait_targets(self, identifiers: set[int], timeout: float = 15.0) -> None:
        """Wait until the LB's table holds exactly ``identifiers`` and (kernel mode) the kernel
        map says so too."""
        assert self.lb is not None

        def installed() -> bool:
            if not self.lb.alive():  # type: ignore[union-attr]
                raise AssertionError(f"LB exited:\n{self.lb.log_text()}")  # type: ignore[union-attr]
            try:
                if shown_identifiers(self.show()) != identifiers:
                    return False
            except Exception:
                return False
            if self.mode == "kernel":
                return self.nft_marks() == {OFFSET + i for i in identifiers}
            return True

        wait_until(installed, timeout, f"LB table with targets {sorted(identifiers)}")

    # -- data plane

    def flush_conntrack(self) -> None:
        self.lb_ns.run("conntrack", "-F", check=False)

    def counters(self) -> dict[str, dict[str, int]]:
        """Target name -> counter name -> packets."""
        return {t.name: t.counters() for t in self.targets}

    def udp_flows(self, family: int, count: int) -> UdpFlows:
        return UdpFlows(self.client_ns.name, family, count)

    def tcp_connect(self, family: int, timeout: float = 3.0) -> TcpConn:
        """A TCP connection from the client to VIP:PORT that got its first echo."""
        af, vip, client = _family(family)
        with inside(self.client_ns.name):
            sock = socket.socket(af, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.bind((client, 0))
            sock.connect((vip, PORT))
            conn = TcpConn(sock, sock.getsockname()[1], "")
            name = conn.echo(b"hello", timeout)
            if name is None:
                raise ConnectionError("no echo")
            conn.target = name
            return conn
        except BaseException:
            sock.close()
            raise

    def raw_socket(self, family: int) -> socket.socket:
        """A raw socket in the client namespace: IPv4 with the IP header included; IPv6 for
        ICMPv6 messages (the kernel adds the IPv6 header and the checksum)."""
        with inside(self.client_ns.name):
            if family == 4:
                return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            return socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)

    # -- LB kernel state

    def lb_rules(self) -> list[dict[str, Any]]:
        """``ip rule`` entries with a fwmark, both families."""
        rules = []
        for family in ("-4", "-6"):
            for rule in ip_json(self.lb_ns, family, "rule", "show"):
                if "fwmark" in rule:
                    rules.append({**rule, "family": family})
        return rules

    def lb_routes(self, table: int, family: str = "-4") -> list[dict[str, Any]]:
        return ip_json(self.lb_ns, family, "route", "show", "table", str(table))


@contextlib.contextmanager
def lb_alone(
    workdir: Path, mode: str, *lb_args: str, prefix: str = PREFIX
) -> Iterator[tuple[Netns, Daemon, LbDaemon]]:
    """The LB side only, for control-plane tests: a namespace whose ``br0`` (a veth) holds the
    LB's addresses (so the targets' gateways resolve), an NSP (started) and an LB daemon (not
    started); all removed afterwards."""
    reap_stale(prefix)
    ns = make_ns("lbx", prefix)
    nsp: Daemon | None = None
    lb: LbDaemon | None = None
    try:
        sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        ip_batch(
            ns,
            [
                "link add br0 type veth peer name br0p",  # no dummy module here
                f"addr add {LB4}/24 dev br0",
                f"addr add {LB6}/64 dev br0 nodad",
                "link set br0p up",
                "link set br0 up",
            ],
        )
        nsp = start_nsp(ns, workdir)
        lb = lb_daemon(ns, workdir / "lb", nsp, mode, *lb_args)
        yield ns, nsp, lb
    finally:
        for daemon in (lb, nsp):
            if daemon is not None and daemon.alive():
                with contextlib.suppress(Exception):
                    run_async(daemon.stop(10))
                if daemon.alive():
                    daemon.kill()
        ns.close()
