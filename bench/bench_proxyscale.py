"""The proxy's control path at scale: N targets on one node (links, addresses, registrations).

A real NSP, a real IPAM and a real proxy (``meridiod --role=proxy``, default settings) in a
throw-away namespace. The N targets are not target daemons (about 44 MB each) but network
namespaces this process makes, and one connect client per target in this process: it sends
the requests the target role's ConnectClient sends (``proxy.<conduit>.<trench>``, a veth into
the target's namespace named ``conduit0``, the stream's identifier and the node in the extra
context), over a connection of its own, brings its end of the veth up as the target does,
refreshes every third of the expiry the proxy answers with, and asks again at once when its
connection to the proxy drops. Per case:

* cold start: the proxy spawned while the N targets keep asking (every 0.1 s) until every
  target's link is up in the proxy's bridge and every target is registered ENABLED in NSP;
* steady state: the proxy's CPU (share of one core) over 15 s, or over the longest period of
  its periodic work when that is longer (the targets' refreshes, every third of the connect
  expiry; the keepalives, every ``register-interval``), so that each target's refresh and
  keepalive fall in it once; and its RSS (NSP's CPU beside it: the keepalives are its load);
* one change, several times, at random moments of the periodic work: a target closes its
  connection (Close, as a target does when its last stream closes) until its registration
  leaves NSP and until its link leaves the proxy's namespace; the same target connects again
  until it is registered ENABLED and until its link is up in the bridge;
* a target's namespace disappears (its pod is gone, nobody says a word) until its
  registration leaves NSP.

The baseline is the smallest case (N = 10) of the same run: ratios are against it.

    python -m bench proxyscale              # N = 10, 100, 1000
    python -m bench.bench_proxyscale 1000   # N = 10 (baseline) and 1000

``MERIDIO_BENCH_PROFILE=DIR``: record the proxy with py-spy (raw collapsed stacks) during the
cold start and the steady state, into ``DIR/<case>-cold.txt`` and ``DIR/<case>-steady.txt``
(``MERIDIO_BENCH_PROFILE_RATE``: samples a second, 50 unless given).
``MERIDIO_BENCH_LOGS=DIR``: keep the daemons' logs, as ``DIR/<case>-<role>.log``.
``MERIDIO_BENCH_COLD_ONLY=1``: measure only the cold starts (no steady state, no changes).
``MERIDIO_BENCH_PROXY_ARGS``: more proxy settings (``--register-interval=30 ...``).
``MERIDIO_BENCH_PROXY_SRC`` / ``MERIDIO_BENCH_CONTROL_SRC``: a source tree (its ``src``
directory) to run the proxy / the NSP and IPAM from instead of the installed one, to compare
two versions of the proxy against the same control plane.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpclib
import yaml
from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError

from bench.common import progress, row
from meridio.api.meridio.connect.v1 import CloseRequest, ConnectStub
from meridio.api.nsp.v1 import Conduit, Stream, Target, Trench
from meridio.connect.client import ClientSpec, build_request
from meridio.core import conduit, rtnl
from meridio.roles.proxy import ProxySettings
from meridio.runtime.grpc import on_connection_lost
from tests.netns.daemons import MERIDIOD, Daemon, RawCodec, bench_netns, run_async

TRENCH, CONDUIT, STREAM, NODE = "trench-a", "conduit-a", "s0", "node1"
BRIDGE = "bridge0"
STEADY = 15.0
CHANGES = 10
VANISH = 3
COLD_LIMIT = 300.0
CHANGE_LIMIT = 30.0
RETRY = 0.1
CASES = {"10": 10, "100": 100, "1000": 1000}
ERRORS: collections.Counter[str] = collections.Counter()  # failed requests, by exception

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 0x2
NETNS_DIR = "/run/netns"
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
RTMGRP_LINK = 0x1
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# --- target namespaces, made by this process ----------------------------------------------------


@dataclass
class TargetNs:
    fd: int
    sock: socket.socket  # rtnetlink, in the target's namespace
    name: str  # under /run/netns: the proxy accepts it through its allow-list

    @property
    def path(self) -> str:
        return f"{NETNS_DIR}/{self.name}"

    def close(self) -> None:
        """The namespace goes (as a pod's does): its name unmounted, our last handle closed."""
        self.sock.close()
        _libc.umount2(self.path.encode(), MNT_DETACH)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def make_namespaces(n: int) -> list[TargetNs]:
    """``n`` network namespaces, each named under /run/netns (as ``ip netns add`` does: a bind
    mount) and held by a file descriptor of this process, with a netlink socket inside. The
    proxy accepts a namespace reference only when it can prove it is the caller's or the name
    is on its ``connect-netns-allow`` list: one process playing N targets needs the list. Made
    in a thread of their own: unshare and setns change only the calling thread's namespace."""
    out: list[TargetNs] = []
    error: list[BaseException] = []
    os.makedirs(NETNS_DIR, exist_ok=True)

    def work() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for i in range(n):
                _check(_libc.unshare(CLONE_NEWNET), "unshare")
                fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                name = f"mbench-px{os.getpid()}-{i}"
                path = f"{NETNS_DIR}/{name}"
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))
                _check(
                    _libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None),
                    "mount",
                )
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
                sock.bind((0, 0))
                sock.setblocking(False)
                out.append(TargetNs(fd, sock, name))
                _check(_libc.setns(home, CLONE_NEWNET), "setns")
        except BaseException as exc:
            error.append(exc)
        finally:
            os.close(home)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if error:
        for t in out:
            t.close()
        raise error[0]
    return out


def socket_in(netns_path: str, groups: int = 0) -> socket.socket:
    """An rtnetlink socket in the namespace at ``netns_path`` (bound to ``groups``)."""
    box: list[Any] = []

    def work() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(target, CLONE_NEWNET), "setns")
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.bind((0, groups))
            box.append(sock)
            _check(_libc.setns(home, CLONE_NEWNET), "setns back")
        except BaseException as exc:
            box.append(exc)
        finally:
            os.close(home)
            os.close(target)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    sock = box[0]
    sock.setblocking(False)
    return sock


_seq = 0


async def link_up(sock: socket.socket, ifname: str) -> None:
    """``ip link set <ifname> up`` on ``sock``'s namespace, acknowledged."""
    global _seq
    _seq += 1
    name = ifname.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(name), 3) + name + b"\0" * (-len(name) % 4)
    body = struct.pack("=BxHiII", 0, 0, 0, IFF_UP, IFF_UP) + attr
    header = struct.pack(
        "=IHHII", 16 + len(body), rtnl.RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, _seq, 0
    )
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, header + body)
    while True:
        data = await loop.sock_recv(sock, 65536)
        _length, msg_type, _f, seq, _p = struct.unpack_from("=IHHII", data)
        if seq != _seq or msg_type != rtnl.NLMSG_ERROR:
            continue
        (code,) = struct.unpack_from("=i", data, 16)
        if code:
            raise OSError(-code, f"link up {ifname}: {os.strerror(-code)}")
        return


# --- what the proxy's namespace and NSP show ---------------------------------------------------


class Board:
    """Wakes waiters whenever something observed changed."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def bump(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], limit: float) -> float:
        """Seconds until ``predicate`` holds (checked at every change), inf after ``limit``."""
        start = time.monotonic()
        while not predicate():
            left = limit - (time.monotonic() - start)
            if left <= 0:
                return float("inf")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
        return time.monotonic() - start

    async def since(self, started: float, predicate: Callable[[], bool]) -> float:
        """Seconds from ``started`` until ``predicate`` holds (inf after CHANGE_LIMIT)."""
        waited = await self.until(predicate, CHANGE_LIMIT - (time.monotonic() - started))
        return waited if waited == float("inf") else time.monotonic() - started


class LinkMonitor:
    """The links of the proxy's namespace, from link events (and one dump to start)."""

    def __init__(self, netns_path: str, board: Board) -> None:
        self.sock = socket_in(netns_path, RTMGRP_LINK)
        self.board = board
        self.links: dict[str, rtnl.Link] = {}
        self.bridge_index: int | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, rtnl.dump_request("link", 0, 1))
        while True:
            data = await loop.sock_recv(self.sock, 1 << 20)
            for msg_type, payload in rtnl.messages(data, None):
                if msg_type not in (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK):
                    continue
                link = rtnl.parse_link(payload)
                if msg_type == rtnl.RTM_DELLINK:
                    self.links.pop(link.name, None)
                else:
                    self.links[link.name] = link
                if link.name == BRIDGE:
                    self.bridge_index = link.index if msg_type == rtnl.RTM_NEWLINK else None
            self.board.bump()

    def configured(self, name: str) -> bool:
        """Up (with carrier: the target's end is up too) in the proxy's bridge."""
        link = self.links.get(name)
        return (
            link is not None
            and self.bridge_index is not None
            and link.master == self.bridge_index
            and link.flags & (IFF_UP | IFF_LOWER_UP) == IFF_UP | IFF_LOWER_UP
        )

    def count_configured(self, names: set[str]) -> int:
        return sum(1 for n in names if self.configured(n))


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7


def _fields(data: bytes) -> list[tuple[int, bytes]]:
    """(field number, bytes) of each length-delimited field of a protobuf message."""
    out = []
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        wire = key & 7
        if wire == 2:
            length, offset = _varint(data, offset)
            out.append((key >> 3, data[offset : offset + length]))
            offset += length
        elif wire == 0:
            _, offset = _varint(data, offset)
        elif wire == 5:
            offset += 4
        elif wire == 1:
            offset += 8
        else:
            raise ValueError(f"wire type {wire}")
    return out


class Registrations:
    """The addresses of the targets NSP lists ENABLED in the stream, from a Watch."""

    def __init__(self, socket_path: Path, board: Board) -> None:
        self.socket_path = socket_path
        self.board = board
        self.ips: set[str] = set()

    async def run(self) -> None:
        from grpclib.const import Cardinality

        request = Target(
            stream=Stream(name=STREAM, conduit=Conduit(name=CONDUIT, trench=Trench(name=TRENCH)))
        )
        while True:
            ch = Channel(path=str(self.socket_path), codec=RawCodec())
            try:
                async with ch.request(
                    "/nsp.v1.TargetRegistry/Watch", Cardinality.UNARY_STREAM, Target, bytes
                ) as stream:
                    await stream.send_message(request, end=True)
                    while (message := await stream.recv_message()) is not None:
                        ips = set()
                        for number, target in _fields(message):
                            if number == 1:
                                ips.update(
                                    v.decode().split("/")[0] for n, v in _fields(target) if n == 1
                                )
                        self.ips = ips
                        self.board.bump()
            except (OSError, grpclib.GRPCError, StreamTerminatedError):
                await asyncio.sleep(0.2)
            finally:
                ch.close()


# --- the targets' connect clients --------------------------------------------------------------


@dataclass
class FakeTarget:
    """One target: its namespace and a connect client like the target role's."""

    index: int
    ns: TargetNs
    endpoint: Path
    wanted: bool = True
    stopped: bool = False  # a cancel can be swallowed by grpclib: this one is not
    up_done: bool = False
    ips: tuple[str, ...] = ()
    requests: int = 0
    failures: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    period: float = 0.0  # seconds between refreshes, as the proxy's expiry asks

    @property
    def connection_id(self) -> str:
        return f"bt{self.index}@{CONDUIT}"

    @property
    def link(self) -> str:
        return conduit.link_name("tgt", self.connection_id)

    @property
    def ipv4(self) -> str:
        return next((a.split("/")[0] for a in self.ips if ":" not in a), "")

    def spec(self) -> ClientSpec:
        return ClientSpec(
            connection_id=self.connection_id,
            endpoint=f"unix://{self.endpoint}",
            network_service=f"proxy.{CONDUIT}.{TRENCH}",
            mechanism="veth",
            interface="conduit0",
            netns_path=self.ns.path,
            context={f"identifier/{STREAM}": str(self.index + 1), "node": NODE},
        )

    async def run(self) -> None:
        request = build_request(self.spec(), f"bt{self.index}")
        channel = Channel(path=str(self.endpoint))
        stub = ConnectStub(channel, timeout=10)
        try:
            while not self.stopped:
                if not self.wanted:
                    await self.wake.wait()
                    self.wake.clear()
                    continue
                async with self.busy:  # a Close waits for a request on its way
                    if not self.wanted:
                        continue
                    self.requests += 1
                    try:
                        reply = await stub.request(request)
                        if not self.up_done:
                            await link_up(self.ns.sock, "conduit0")
                            self.up_done = True
                    except Exception as exc:  # as the target's client: any failure, ask again
                        self.failures += 1
                        ERRORS[type(exc).__name__] += 1
                        if ERRORS[type(exc).__name__] == 1 and os.environ.get("DBG"):
                            import traceback

                            traceback.print_exc()
                        reply = None
                if reply is None:
                    await asyncio.sleep(RETRY)
                    continue
                self.ips = tuple(reply.client_addresses)
                self.period = max(0.2, reply.expiry_seconds / 3)
                on_connection_lost(channel, self.index, self.wake.set)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.period)
                self.wake.clear()
        finally:
            channel.close()

    async def close(self) -> None:
        """Stop refreshing and Close, as a target whose last stream closed does (its
        connection's task ends first: a refresh on its way is not answered after the Close)."""
        self.wanted = False
        channel = Channel(path=str(self.endpoint))
        try:
            async with self.busy:
                self.up_done = False
                with contextlib.suppress(Exception):  # not answered: the waits say what happened
                    await ConnectStub(channel, timeout=10).close(
                        CloseRequest(
                            network_service=f"proxy.{CONDUIT}.{TRENCH}",
                            connection_id=self.connection_id,
                        )
                    )
        finally:
            channel.close()

    def reopen(self) -> None:
        self.wanted = True
        self.ips = ()
        self.wake.set()


# --- processes ---------------------------------------------------------------------------------


class BenchDaemon(Daemon):
    """A daemon run from the installed tree, or from the source tree ``src`` when given (an
    older tree may not know every setting the test harness passes in the environment)."""

    def __init__(self, netns: Any, role: str, workdir: Path, *args: str, src: str = "") -> None:
        super().__init__(netns, role, workdir, *args)
        self.src = src

    def spawn(self) -> subprocess.Popen[bytes]:
        if not self.src:
            return super().spawn()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MERIDIOD_")}
        env["PYTHONPATH"] = self.src
        with self.log_path.open("ab") as log:
            self.proc = self.netns.popen(
                *self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        return self.proc


class ProxyDaemon(BenchDaemon):
    @property
    def argv(self) -> list[str]:
        return [
            MERIDIOD,
            "--role=proxy",
            f"--run-dir={self.run_dir}",
            "--log-format=json",
            *self.extra_args,
        ]


def profile(pid: int, name: str, seconds: float) -> Any:
    """py-spy on ``pid`` for ``seconds`` when MERIDIO_BENCH_PROFILE names a directory."""
    where = os.environ.get("MERIDIO_BENCH_PROFILE")
    spy = Path(sys.executable).parent / "py-spy"
    if not where or not spy.exists():
        return None
    Path(where).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--nonblocking",
            "-r",
            os.environ.get("MERIDIO_BENCH_PROFILE_RATE", "50"),
            "-f",
            "raw",
            "-d",
            str(int(seconds)),
            "-p",
            str(pid),
            "-o",
            str(Path(where) / f"{name}.txt"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def register_interval() -> float:
    """The proxy's keepalive period: from MERIDIO_BENCH_PROXY_ARGS, else the default."""
    found = re.findall(
        r"--register-interval[= ](\S+)", os.environ.get("MERIDIO_BENCH_PROXY_ARGS", "")
    )
    return float(found[-1]) if found else ProxySettings().register_interval


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def config(n: int) -> dict[str, Any]:
    return {
        "trench": {"name": TRENCH},
        "conduits": {"items": [{"name": CONDUIT, "trench": TRENCH}]},
        "streams": {"items": [{"name": STREAM, "conduit": CONDUIT, "max-targets": max(n, 10)}]},
        "vips": {"items": [{"name": "v4", "address": "203.0.113.1/32", "trench": TRENCH}]},
        "flows": {
            "items": [
                {
                    "name": "f0",
                    "stream": STREAM,
                    "vips": ["v4"],
                    "protocols": ["tcp"],
                    "destination-port-ranges": ["80"],
                }
            ]
        },
    }


@dataclass
class Result:
    case: str
    targets: int
    cold: float
    cold_links: float
    cold_nsp: float
    cpu: float
    nsp_cpu: float
    rss: float
    close_nsp: list[float]
    close_link: list[float]
    open_nsp: list[float]
    open_link: list[float]
    vanish_nsp: list[float]


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def top(values: list[float]) -> float:
    return max(values) if values else float("nan")


async def run_case(name: str, workdir: Path, ns: Any, targets_ns: list[TargetNs]) -> Result:
    n = CASES[name]
    conf = workdir / "config.yaml"
    conf.write_text(yaml.safe_dump(config(n)))
    control_src = os.environ.get("MERIDIO_BENCH_CONTROL_SRC", "")
    nsp = BenchDaemon(
        ns,
        "nsp",
        workdir / "nsp",
        f"--configuration-file={conf}",
        "--entry-timeout=60",
        src=control_src,
    )
    ipam = BenchDaemon(
        ns,
        "ipam",
        workdir / "ipam",
        "--prefix-ipv4=198.18.0.0/16",
        "--prefix-ipv6=fd00:10::/48",
        "--conduit-prefix-length-ipv4=18",
        "--node-prefix-length-ipv4=20",
        src=control_src,
    )
    connect = workdir / "connect.sock"
    proxy = ProxyDaemon(
        ns,
        "proxy",
        workdir / "proxy",
        "--instance=proxy-node1",
        f"--node={NODE}",
        f"--nsp=unix://{nsp.socket}",
        f"--ipam=unix://{ipam.socket}",
        f"--trench={TRENCH}",
        f"--conduit={CONDUIT}",
        f"--connect-listen=unix://{connect}",
        "--connect-netns-allow=" + ",".join(t.name for t in targets_ns[:n]),
        *os.environ.get("MERIDIO_BENCH_PROXY_ARGS", "").split(),
        src=os.environ.get("MERIDIO_BENCH_PROXY_SRC", ""),
    )
    board = Board()
    tasks: list[asyncio.Task[Any]] = []
    targets = [FakeTarget(i, targets_ns[i], connect) for i in range(n)]
    try:
        nsp.spawn()
        ipam.spawn()
        await nsp.ready(30)
        await ipam.ready(30)
        links = LinkMonitor(f"/run/netns/{ns.name}", board)
        registered = Registrations(nsp.socket, board)
        tasks += [asyncio.create_task(links.run()), asyncio.create_task(registered.run())]
        names = {t.link for t in targets}

        def all_links() -> bool:
            return links.count_configured(names) == n

        def all_registered() -> bool:
            return sum(1 for t in targets if t.ipv4 and t.ipv4 in registered.ips) == n

        cpu0 = {d.role: cpu_seconds(d.pid) for d in (nsp, ipam)}
        bench0 = sum(os.times()[:2])
        proxy.spawn()
        started = time.monotonic()
        spy = profile(proxy.pid, f"{name}-cold", 60)
        tasks += [asyncio.create_task(t.run()) for t in targets]
        cold_links = await board.until(all_links, COLD_LIMIT)
        cold_nsp = await board.until(all_registered, COLD_LIMIT - cold_links)
        cold = time.monotonic() - started
        if cold_links == float("inf") or cold_nsp == float("inf"):
            cold = float("inf")
        cold_nsp = cold if cold_nsp != float("inf") else cold_nsp
        progress(
            f"{name}: cold start {cold:.2f} s (links {cold_links:.2f} s); "
            f"{links.count_configured(names)} links, "
            f"{sum(1 for t in targets if t.ipv4 in registered.ips)} registered, "
            f"{sum(t.failures for t in targets)} failed requests ({dict(ERRORS)})"
        )
        ERRORS.clear()
        cold_cpu = {d.role: cpu_seconds(d.pid) - cpu0.get(d.role, 0.0) for d in (proxy, nsp, ipam)}
        user, system = cpu_times(proxy.pid)
        progress(
            f"{name}: CPU during the cold start: "
            + ", ".join(f"{role} {cpu:.1f} s" for role, cpu in cold_cpu.items())
            + f" (proxy: user {user:.1f} s, system {system:.1f} s)"
            + f"; the targets (this process) {sum(os.times()[:2]) - bench0:.1f} s"
            + f"; load average {os.getloadavg()[0]:.1f}"
        )
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        if os.environ.get("MERIDIO_BENCH_COLD_ONLY"):
            nan = float("nan")
            return Result(name, n, cold, cold_links, cold_nsp, nan, nan, nan, [], [], [], [], [])
        await asyncio.sleep(2)
        steady = max(STEADY, register_interval(), *(t.period for t in targets))
        spy = profile(proxy.pid, f"{name}-steady", steady)
        before, nsp_before = cpu_seconds(proxy.pid), cpu_seconds(nsp.pid)
        await asyncio.sleep(steady)
        cpu = (cpu_seconds(proxy.pid) - before) / steady
        nsp_cpu = (cpu_seconds(nsp.pid) - nsp_before) / steady
        rss = rss_mb(proxy.pid)
        if spy is not None:
            spy.wait()
        progress(
            f"{name}: steady CPU {cpu * 100:.1f} % over {steady:.0f} s "
            f"(NSP {nsp_cpu * 100:.1f} %), RSS {rss:.0f} MB; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        rng = random.Random(7)
        close_nsp: list[float] = []
        close_link: list[float] = []
        open_nsp: list[float] = []
        open_link: list[float] = []
        for k in range(CHANGES if cold != float("inf") else 0):
            victim = targets[(k * 7919) % n]
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            ip, link = victim.ipv4, victim.link
            started = time.monotonic()
            nsp_gone, link_gone, _ = await asyncio.gather(
                board.since(started, lambda ip=ip: ip not in registered.ips),
                board.since(started, lambda link=link: link not in links.links),
                victim.close(),
            )
            close_nsp.append(nsp_gone)
            close_link.append(link_gone)
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            started = time.monotonic()
            victim.reopen()
            link_up, nsp_in = await asyncio.gather(
                board.since(started, lambda link=link: links.configured(link)),
                board.since(started, lambda v=victim: bool(v.ipv4) and v.ipv4 in registered.ips),
            )
            open_link.append(link_up)
            open_nsp.append(nsp_in)
        progress(
            f"{name}: close -> NSP {', '.join(f'{c:.2f}' for c in close_nsp)} s; "
            f"open -> NSP {', '.join(f'{c:.2f}' for c in open_nsp)} s"
        )
        vanish_nsp: list[float] = []
        for k in range(min(VANISH, n) if cold != float("inf") else 0):
            victim = targets[n - 1 - k]
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            ip = victim.ipv4
            started = time.monotonic()
            victim.wanted = False
            victim.ns.close()
            vanish_nsp.append(await board.since(started, lambda ip=ip: ip not in registered.ips))
        progress(f"{name}: namespace gone -> NSP {', '.join(f'{c:.2f}' for c in vanish_nsp)} s")
    finally:
        for t in targets:
            t.stopped = True
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        for daemon, limit in ((proxy, 120.0), (nsp, 10.0), (ipam, 10.0)):
            if daemon.alive():
                try:
                    await daemon.stop(timeout=limit)
                except AssertionError:
                    daemon.kill()
        keep = os.environ.get("MERIDIO_BENCH_LOGS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for daemon in (proxy, nsp, ipam):
                with contextlib.suppress(OSError):
                    shutil.copy(daemon.log_path, Path(keep) / f"{name}-{daemon.role}.log")
    return Result(
        name,
        n,
        cold,
        cold_links,
        cold_nsp,
        cpu,
        nsp_cpu,
        rss,
        close_nsp,
        close_link,
        open_nsp,
        open_link,
        vanish_nsp,
    )


def main() -> None:
    wanted = [a for a in sys.argv[1:] if a in CASES] or list(CASES)
    if "10" not in wanted:
        wanted.insert(0, "10")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * max(CASES[c] for c in wanted) + 1024
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    results = []
    for name in wanted:
        workdir = Path(tempfile.mkdtemp(prefix=f"mbench-proxy-{name}-", dir="/tmp"))
        started = time.monotonic()
        namespaces = make_namespaces(CASES[name])
        progress(
            f"{name}: {len(namespaces)} target namespaces in {time.monotonic() - started:.1f} s"
        )
        try:
            with bench_netns() as ns:
                results.append(run_async(run_case(name, workdir, ns, namespaces)))
        finally:
            for t in namespaces:
                t.close()
            shutil.rmtree(workdir, ignore_errors=True)
    base = results[0]

    def ratio(value: float, baseline: float) -> str:
        return f"{value / baseline:.1f}x" if baseline > 0 else "-"

    print(f"\n  {'case':<52} {'value':>16} {'vs N=10':>14}")
    for r in results:
        print(f"  --- {r.case}: {r.targets} targets on one node")
        row(
            "cold start: every link up, every target in NSP",
            f"{r.cold:.2f} s",
            ratio(r.cold, base.cold),
        )
        row(
            "  of which every link up in the bridge",
            f"{r.cold_links:.2f} s",
            ratio(r.cold_links, base.cold_links),
        )
        row("proxy CPU, steady", f"{r.cpu * 100:.1f} %", ratio(r.cpu, base.cpu))
        row(
            "NSP CPU, steady (the proxy's keepalives)",
            f"{r.nsp_cpu * 100:.1f} %",
            ratio(r.nsp_cpu, base.nsp_cpu),
        )
        row("proxy RSS", f"{r.rss:.0f} MB", ratio(r.rss, base.rss))
        for label, values, bvalues in (
            ("close -> gone from NSP", r.close_nsp, base.close_nsp),
            ("close -> link gone", r.close_link, base.close_link),
            ("connect -> registered", r.open_nsp, base.open_nsp),
            ("connect -> link up in the bridge", r.open_link, base.open_link),
            ("namespace gone -> gone from NSP", r.vanish_nsp, base.vanish_nsp),
        ):
            row(
                f"{label}, p50 / max of {len(values)}",
                f"{p50(values):.3f} / {top(values):.3f} s",
                f"{ratio(p50(values), p50(bvalues))} / {ratio(top(values), top(bvalues))}",
            )


if __name__ == "__main__":
    main()
