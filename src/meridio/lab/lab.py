"""The lab's operations: up, down, scale, kill, restart, tap (a target's TAPA), rotate (the
certificates and the CA of the lab's mutual TLS), status and traffic.

Every operation loads the state file, changes the host step by step (saving the state after
each step), and waits for what it started to report ready. ``up`` over a lab that exists, in
whatever condition, takes it down first; ``down`` removes every namespace the lab made (and
every process in them, so the LBs' own BIRDs too) whether or not the state file is there or
readable.

With ``bgp`` and ``static-bfd`` routing the gateway routers (``gw``, and ``gw-2`` with two)
run BIRD (instances ``bird-gw``, ``bird-gw-2``), started and stopped by the lab like its
other processes; the lab never edits their routes, it waits until their kernel tables route
the VIPs over the LBs it expects and reads them back for ``status``.

Every role's process and every target's application runs under a supervisor of its own
(``meridio.lab.supervise``), which starts it again when it dies, as a kubelet does; a
process's ``pid`` in the state is its supervisor's, its own is in the supervisor's status file
(``system.role_pid``). ``kill`` crashes the process (its supervisor starts it again) or, with
``netns``, removes the pod; ``down`` stops the supervisors, which stop their processes.

The targets' sidecars open no stream by themselves: the lab opens each target's streams
(``plan.target_streams``) through its TAPA socket, as an application would, and reads them back
from it to know what every LB's tables should hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from meridio import pki
from meridio.lab import plan, system
from meridio.lab.plan import LabSpec
from meridio.lab.state import LabState, Process, load, save, state_path
from meridio.lab.system import LabError

# Roles that run as meridiod and get a certificate (the traffic server does not).
MERIDIOD_ROLES = frozenset({"nsp", "ipam", "lb", "proxy", "target"})

DEFAULT_STATE_DIR = Path("/run/meridio-lab")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
CRASH_LOOP = 3
"""A process started again this often while the lab waits for it to be ready is given up on
(its log says why)."""
RESTART_TIMEOUT = STOP_TIMEOUT + plan.RESTART_DELAY_MAX + 5
"""How long ``restart`` and ``kill`` wait for a supervisor to start its program again."""
ROTATE_TIMEOUT = 30.0
"""How long each step of ``rotate`` waits for the daemons to load their new files (they poll
them every ``tls-reload-interval``, 5 s)."""
GATEWAY_TIMEOUT = 60.0
"""How long ``up`` and ``scale`` wait for the gateways to route the VIPs over the LBs (a BGP
session takes about 5 s to come up)."""
OTHERS = ("nsp", "ipam", "proxy")
"""Roles ``kill`` crashes without their namespace (``restart`` starts them again)."""
EXTERNAL_SUPPORT = {
    "vlan": "802.1Q VLAN support (CONFIG_VLAN_8021Q, module 8021q)",
    "macvlan": "macvlan support (CONFIG_MACVLAN, module macvlan)",
}


# --- progress ----------------------------------------------------------------------------------


class Step(Protocol):
    def update(self, done: int, detail: str = "") -> None: ...
    def finish(self) -> None: ...


class Reporter(Protocol):
    """Where the lab tells how far it got (a rich progress display in the CLI)."""

    def step(self, title: str, total: int) -> Step: ...
    def note(self, text: str) -> None: ...


class _QuietStep:
    def update(self, done: int, detail: str = "") -> None:
        pass

    def finish(self) -> None:
        pass


class QuietReporter:
    def step(self, title: str, total: int) -> Step:
        return _QuietStep()

    def note(self, text: str) -> None:
        pass


# --- programs ----------------------------------------------------------------------------------


def meridiod() -> list[str]:
    """``meridiod`` of this installation (next to this Python), or the module."""
    script = Path(sys.executable).parent / "meridiod"
    return [str(script)] if script.exists() else [sys.executable, "-m", "meridio.daemon"]


def traffic_tool() -> list[str]:
    return [sys.executable, "-m", "meridio.traffic"]


def supervisor() -> list[str]:
    """The supervisor every role's process runs under (``meridio.lab.supervise``)."""
    return [sys.executable, "-m", "meridio.lab.supervise"]


def resolve_external(choice: str) -> str:
    """``auto``: macvlan where the kernel has it, else a plain veth."""
    if choice != "auto":
        return choice
    return "macvlan" if system.link_kind_supported("macvlan", mode="bridge") is None else "veth"


# --- traffic -----------------------------------------------------------------------------------


# ``name: value`` and ``a/b/c: 1/2/3`` groups of the traffic tool's progress lines
PROGRESS_GROUP = re.compile(r"([a-z]+(?:/[a-z]+)*): (\d+(?:/\d+)*)")


def parse_progress(line: str) -> dict[str, int]:
    """The counts of a progress line of the traffic client or probe (``--progress line``):
    ``active``, ``failed``, ``connecting``, ``lost``, ``sent``, ``received``, ``dropped``;
    ``ok``, ``failed``, ``skipped``, ``flight`` (in flight). Empty for any other line."""
    counts: dict[str, int] = {}
    for names, values in PROGRESS_GROUP.findall(line):
        keys, numbers = names.split("/"), values.split("/")
        if len(keys) == len(numbers):
            counts.update(zip(keys, map(int, numbers), strict=True))
    return counts


class TrafficRun:
    """A traffic client running in the gateway namespace (``-o json``).

    With ``progress``, it runs with ``--progress line`` and its progress is followed while it
    runs (:meth:`wait_progress`): a caller can wait for its connections to be up, or for
    replies to come, instead of waiting for some time.
    """

    def __init__(self, proc: subprocess.Popen[str], argv: list[str], progress: bool = False):
        self.proc = proc
        self.argv = argv
        self.progress: dict[str, int] = {}
        self._lines: dict[str, list[str]] = {"out": [], "err": []}
        self._changed = threading.Condition()
        self._readers: list[threading.Thread] = []
        if progress:
            for name, stream in (("out", proc.stdout), ("err", proc.stderr)):
                reader = threading.Thread(target=self._read, args=(name, stream), daemon=True)
                reader.start()
                self._readers.append(reader)

    def _read(self, name: str, stream: Any) -> None:
        for line in stream:
            counts = parse_progress(line) if name == "err" else {}
            with self._changed:
                if counts:
                    self.progress = counts
                else:
                    self._lines[name].append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_progress(
        self, condition: Callable[[dict[str, int]], bool], what: str, timeout: float = 60.0
    ) -> dict[str, int]:
        """Wait until the latest progress line's counts satisfy ``condition``; those counts.
        LabError if the run ends first or ``timeout`` seconds pass (a hang, not a goal)."""
        assert self._readers, "started without progress"
        with self._changed:
            met = self._changed.wait_for(
                lambda: condition(self.progress) or self.proc.poll() is not None, timeout
            )
            if met and condition(self.progress):
                return dict(self.progress)
        how = "ended" if self.proc.poll() is not None else f"not within {timeout:g}s"
        raise LabError(f"traffic client: {what}: {how} (last progress {self.progress})")

    def wait_connected(self, timeout: float = 60.0) -> dict[str, int]:
        """Wait until every connection of the client is up (none connecting, none failed)."""
        wanted = 10  # the client's default
        for flag, value in itertools.pairwise(self.argv):
            if flag in ("-c", "--connections"):
                wanted = int(value)
        return self.wait_progress(
            lambda p: p.get("active") == wanted, f"{wanted} connections up", timeout
        )

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for the end of the run; its report."""
        try:
            if self._readers:
                self.proc.wait(timeout)
                for reader in self._readers:
                    reader.join(timeout)
                out, err = ("".join(self._lines[k]) for k in ("out", "err"))
            else:
                out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            if self._readers:
                self.proc.wait()
                err = "".join(self._lines["err"])
            else:
                _, err = self.proc.communicate()
            raise LabError(f"traffic client did not finish within {timeout}s: {err}") from None
        try:
            report: dict[str, Any] = json.loads(out)
        except json.JSONDecodeError:
            raise LabError(
                f"traffic client failed (exit {self.proc.returncode}): {err.strip() or out}"
            ) from None
        return report


# --- the lab -----------------------------------------------------------------------------------


class Lab:
    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        prefix: str = plan.PREFIX,
        reporter: Reporter | None = None,
    ) -> None:
        plan.check_prefix(prefix)
        self.state_dir = state_dir
        self.prefix = prefix
        self.reporter: Reporter = reporter or QuietReporter()

    # -- state

    def load(self) -> LabState:
        state = load(self.state_dir)
        if state is None:
            raise LabError(f"no lab here ({self.state_dir}): start one with `meridioctl lab up`")
        return state

    def exists(self) -> bool:
        return state_path(self.state_dir).exists() or bool(self._namespaces_found())

    def _save(self, state: LabState) -> None:
        save(self.state_dir, state)

    def netns(self, host: str) -> str:
        return plan.netns_name(self.prefix, host)

    def _namespaces_found(self) -> list[str]:
        return [n for n in system.netns_list() if plan.is_lab_netns(self.prefix, n)]

    # -- up

    def up(self, spec: LabSpec) -> LabState:
        """Build the lab and wait until every role is ready (a lab already there goes first)."""
        state = self.up_network(spec)
        nodes = list(state.node_indexes)
        self._start_control(state)
        names = []
        for conduit in spec.conduit_plans:
            for i in state.lbs_of(conduit):
                self._start_lb(state, i, conduit)
                names.append(plan.lb_host(i, conduit))
        for conduit in spec.conduit_plans:
            for i in nodes:
                self._start_proxy(state, i, conduit)
                names.append(plan.proxy_instance(i, conduit))
        self._wait_ready(state, names, "load balancers and proxies")
        if not spec.dynamic:
            for conduit in spec.conduit_plans:
                self._route_gateway(state, state.lbs_of(conduit), conduit)
        self._start_targets(state, state.target_nodes)
        self._wait_tables(state)
        if spec.dynamic:
            want = self._gateway_want(state, state.lb_indexes)
            self._wait_gateway_routes(state, want, "gateways route the VIPs over the LBs")
        state.phase = "up"
        self._save(state)
        return state

    def up_network(self, spec: LabSpec) -> LabState:
        """The first part of ``up``: every namespace and link of the lab (a lab already there
        goes first) and, with ``bgp`` or ``static-bfd`` routing, the gateway routers' BIRD;
        no role daemon. ``up`` goes on from there; alone, it is a network to run LBs (or a
        BIRD playing one) in by hand: ``down`` removes it."""
        if spec.prefix != self.prefix:
            raise LabError(f"the lab's prefix is {self.prefix!r}, not {spec.prefix!r}")
        spec.check()
        self._check_kernel(spec)
        bird = self._bird(spec)
        if self.exists():
            self.reporter.note("a lab is already here: taking it down first")
            self.down()
        state = LabState.from_spec(spec)
        self._save(state)
        with contextlib.suppress(FileNotFoundError):
            plan.hold_path(self.state_dir).unlink()
        nodes = list(range(1, spec.proxies + 1))
        placement = plan.place_targets({}, range(1, spec.targets + 1), nodes)
        lbs = list(range(1, spec.lbs + 1))
        hosts = [plan.lb_host(i, c) for c in spec.conduit_plans for i in lbs]
        hosts += [plan.node_host(i, c) for c in spec.conduit_plans for i in nodes]
        hosts += [plan.target_host(i) for i in placement]

        step = self.reporter.step("namespaces and links", 1)
        self._make_network(state, hosts, first=True)
        state.lb_indexes, state.node_indexes = lbs, nodes
        state.lbb_indexes = list(lbs) if spec.conduits == 2 else []
        state.targets = {str(i): n for i, n in placement.items()}
        self._save(state)
        step.update(1)
        step.finish()
        if bird is not None:
            self._start_gateways(state, bird)
        return state

    def _bird(self, spec: LabSpec) -> str | None:
        """BIRD for the gateway routers (None with ``static`` routing)."""
        if not spec.dynamic:
            return None
        bird = system.find_bird()
        if bird is None:
            raise LabError(
                f"--routing {spec.routing}: the gateways run BIRD 2, which is not installed "
                "(apt-get install bird2); or use --routing static"
            )
        return bird

    def _check_kernel(self, spec: LabSpec) -> None:
        if spec.external in EXTERNAL_SUPPORT:
            args = {"id": str(plan.VLAN_ID)} if spec.external == "vlan" else {"mode": "bridge"}
            refused = system.link_kind_supported(spec.external, **args)
            if refused is not None:
                raise LabError(
                    f"--external {spec.external}: this kernel has no "
                    f"{EXTERNAL_SUPPORT[spec.external]} ({refused}); use --external veth"
                )

    def _make_network(self, state: LabState, hosts: Sequence[str], *, first: bool) -> None:
        """Namespaces for ``hosts`` on the primary network (LBs on the external one too); with
        ``first``, also the fixed ones: gateway, primary network, NSP and IPAM."""
        routers = [plan.gateway_host(r) for r in state.spec.routers[1:]] if first else []
        made = [*plan.FIXED_HOSTS, *routers, *hosts] if first else list(hosts)
        names = [self.netns(h) for h in made]
        state.namespaces += [n for n in names if n not in state.namespaces]
        self._save(state)
        system.ip_batch([f"netns add {n}" for n in names])
        primary = [h for h in made if h != "pri" and not _gateway_host(h)]
        lines = ["link set lo up", "link add pri type bridge", "link set pri up"] if first else []
        for host in primary:
            port = plan.port_name(host)
            if not first:
                # a namespace just deleted lives on (with this port's peer) until its last
                # process is gone: the port of the host it replaces may still be here
                system.run("ip", "-n", self.netns("pri"), "link", "del", port, check=False)
            lines += [
                f"link add {port} type veth peer name eth0 netns {self.netns(host)}",
                f"link set {port} master pri",
                f"link set {port} up",
            ]
        system.ip_batch(lines, self.netns("pri"))
        if first:
            self._make_gateway(state)
        for host in primary:
            kind, _, index = host.partition("-")
            address = plan.primary_cidr(kind, int(index) if index else 0)
            self._sysctls(host)  # first: arp_notify must be on when eth0 comes up
            system.ip_batch(
                ["link set lo up", f"addr add {address} dev eth0", "link set eth0 up"],
                self.netns(host),
            )
        for host in hosts:
            lb = plan.lb_from_name(host)
            if lb is not None:
                self._attach_external(lb[1], lb[0])

    def _sysctls(self, host: str) -> None:
        values = {
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            # a host replaced under the same address (an LB or a target back after a crash)
            # tells its neighbours its new MAC address when its interfaces come up
            "net.ipv4.conf.all.arp_notify": "1",
            "net.ipv6.conf.all.ndisc_notify": "1",
        }
        if plan.lb_from_name(host) is not None:
            values |= {
                "net.ipv4.ip_forward": "1",
                "net.ipv6.conf.all.forwarding": "1",
                "net.netfilter.nf_conntrack_tcp_loose": "1",
            }
        if _gateway_host(host):
            values |= {
                "net.ipv4.fib_multipath_hash_policy": "1",
                "net.ipv6.fib_multipath_hash_policy": "1",
            }
        if host.startswith("gw-"):
            # a second router: it forwards the LBs' replies to the client in gw
            values |= {
                "net.ipv4.ip_forward": "1",
                "net.ipv6.conf.all.forwarding": "1",
                "net.ipv4.conf.all.send_redirects": "0",
                "net.ipv4.conf.default.send_redirects": "0",
            }
        system.write_sysctls(self.netns(host), values)

    def _routable_targets(self, state: LabState, lb: str) -> int:
        """How many targets (of every stream: one per target and stream) LB ``lb`` has a
        ``fwmark`` rule for in every family of the lab (it installs one only once it can route
        to the target, i.e. once the target's proxy is connected to it)."""
        netns = self.netns(lb)
        counts = []
        for family in state.spec.families:
            out = system.run("ip", "-n", netns, f"-{family}", "-j", "rule", "show", check=False)
            rules = json.loads(out.stdout or "[]")
            counts.append(sum(1 for r in rules if "fwmark" in r and r.get("priority") == 100))
        return min(counts)

    def _make_gateway(self, state: LabState) -> None:
        """The gateway ``gw`` with the external network's bridge ``ext``, and the other
        gateway routers (``gw-N``), each with a port of ``ext``."""
        lines = [
            "link set lo up",
            "link add ext type bridge",
            f"link set ext address {plan.EXTERNAL_BRIDGE_MAC}",
            "link set ext up",
        ]
        for router in state.spec.routers[1:]:
            port = plan.gateway_port_name(router)
            lines += [
                f"link add {port} type veth peer name eth1 netns "
                f"{self.netns(plan.gateway_host(router))}",
                f"link set {port} master ext",
                f"link set {port} up",
            ]
        system.ip_batch(lines, self.netns("gw"))
        for router in state.spec.routers:
            host = plan.gateway_host(router)
            iface = plan.gateway_interface(state.external, router)
            base = iface.split(".")[0]
            lines = [] if router == 1 else ["link set lo up", f"link set {base} up"]
            if state.external == "vlan":
                lines += [f"link add link {base} name {iface} type vlan id {plan.VLAN_ID}"]
            for family in state.spec.families:
                lines.append(
                    f"addr add {plan.gateway_router_cidr(family, router)} dev {iface}"
                    + (" nodad" if family == 6 else "")
                )
            lines.append(f"link set {iface} up")
            system.ip_batch(lines, self.netns(host))
            self._sysctls(host)

    def _attach_external(self, lb: int, conduit: plan.ConduitPlan = plan.CONDUIT_A) -> None:
        """The LB's ``eth1``: a port of the gateway's bridge (the LB makes ``ext0`` on it, or
        uses it as it is)."""
        port = plan.external_port_name(lb, conduit)
        netns = self.netns(plan.lb_host(lb, conduit))
        system.run("ip", "-n", self.netns("gw"), "link", "del", port, check=False)  # see above
        system.ip_batch(
            [
                f"link add {port} type veth peer name eth1 netns {netns}",
                f"link set {port} master ext",
                f"link set {port} up",
            ],
            self.netns("gw"),
        )

    # -- processes

    def _start(
        self,
        state: LabState,
        name: str,
        role: str,
        host: str,
        args: Sequence[str],
        program: Sequence[str] | None = None,
    ) -> Process:
        if program is None:
            program = traffic_tool() if role == "server" else meridiod()
        if role in MERIDIOD_ROLES:
            # mutual TLS: a certificate of the lab's CA for this instance (kept across restarts)
            pki.ensure_credentials(plan.pki_dir(self.state_dir), role, name)
        argv = [*program, *args]
        log = plan.log_path(self.state_dir, name)
        if role in plan.SUPERVISED_ROLES:
            # a pod: its supervisor starts the program again when it dies
            options = plan.supervise_args(self.state_dir, name, restart=state.restart)
            wrapper = [*supervisor(), *options]
            status = plan.supervise_status_path(self.state_dir, name)
            proc = system.spawn(name, role, self.netns(host), argv, log, wrapper, status)
        else:
            proc = system.spawn(name, role, self.netns(host), argv, log)
        state.processes[name] = proc
        self._save(state)
        return proc

    def restart_gateway(self, router: int) -> None:
        """Start gateway router ``router``'s BIRD again after it died (its configuration is
        where the lab wrote it); nothing when it runs."""
        state = self.load()
        name = plan.gateway_instance(router)
        proc = state.processes.get(name)
        if proc is None or router not in state.spec.routers:
            raise LabError(f"no gateway router {router} in this lab")
        if system.alive(proc):
            return
        bird = system.find_bird()
        if bird is None:
            raise LabError("BIRD 2 is not installed (Debian package bird2)")
        argv = plan.gateway_bird_args(self.state_dir, router, bird)
        self._start(state, name, "gateway", plan.gateway_host(router), argv, program=[])
        self._wait_ready(state, [name], "gateway router")

    def _start_gateways(self, state: LabState, bird: str) -> None:
        """BIRD on every gateway router, and wait until each answers on its socket."""
        names = []
        for router in state.spec.routers:
            name = plan.gateway_instance(router)
            config = plan.bird_config_path(self.state_dir, name)
            plan.run_dir(self.state_dir, name).mkdir(parents=True, exist_ok=True)
            config.write_text(plan.gateway_bird_config(state.spec, router))
            argv = plan.gateway_bird_args(self.state_dir, router, bird)
            self._start(state, name, "gateway", plan.gateway_host(router), argv, program=[])
            names.append(name)
        self._wait_ready(state, names, f"gateway routers (BIRD, {state.routing} routing)")

    def _start_control(self, state: LabState) -> None:
        config = plan.nsp_config_path(self.state_dir)
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(plan.spec_nsp_configuration(state.spec), sort_keys=False))
        self._start(state, "nsp", "nsp", "nsp", plan.nsp_args(self.state_dir))
        self._start(
            state, "ipam", "ipam", "ipam", plan.ipam_args(self.state_dir, state.spec.families)
        )
        self._wait_ready(state, ["nsp", "ipam"], "control plane (NSP, IPAM)")

    def _start_lb(
        self, state: LabState, index: int, conduit: plan.ConduitPlan = plan.CONDUIT_A
    ) -> None:
        args = plan.lb_args(self.state_dir, state.spec, index, conduit)
        host = plan.lb_host(index, conduit)
        self._start(state, host, "lb", host, args)

    def _start_proxy(
        self, state: LabState, index: int, conduit: plan.ConduitPlan = plan.CONDUIT_A
    ) -> None:
        args = plan.proxy_args(self.state_dir, state.spec, index, conduit)
        name = plan.proxy_instance(index, conduit)
        self._start(state, name, "proxy", plan.node_host(index, conduit), args)

    def _start_targets(self, state: LabState, placement: dict[int, int]) -> None:
        """Start the targets (sidecar and traffic server), wait until they are ready, then
        open each one's streams through its TAPA and wait until every one is ``OPEN``."""
        names = []
        ports = plan.server_ports(state.spec)
        for index, node in sorted(placement.items()):
            host = plan.target_host(index)
            args = plan.target_args(self.state_dir, state.spec, index, node)
            self._start(state, host, "target", host, args)
            server = plan.server_args(index, ports)
            self._start(state, f"server-{index}", "server", host, server)
            names += [host, f"server-{index}"]
        if names:
            self._wait_ready(state, names, "targets and their traffic servers")
            system.run_async(self._open_streams(state, sorted(placement)))

    async def _open_streams(self, state: LabState, indexes: Sequence[int]) -> None:
        """Open the streams the plan gives targets ``indexes`` (``plan.target_streams``)
        through their TAPA, and wait until each is ``OPEN``."""
        spec = state.spec
        wanted = {i: plan.target_streams(spec, i) for i in indexes}
        total = sum(len(streams) for streams in wanted.values())
        step = self.reporter.step("streams opened through TAPA", total)
        calls = [
            system.tap_call(
                plan.tap_socket(self.state_dir, plan.target_host(i)),
                "open",
                system.tap_stream(plan.TRENCH, stream.conduit.name, stream.name),
            )
            for i, streams in wanted.items()
            for stream in streams
        ]
        await asyncio.gather(*calls)
        names = {plan.target_host(i): {s.name for s in streams} for i, streams in wanted.items()}
        await self._await_open(state, names, step)

    async def _await_open(
        self, state: LabState, names: dict[str, set[str]], step: Step | None = None
    ) -> None:
        """Wait until every target of ``names`` lists those streams ``OPEN`` in its TAPA."""
        total = sum(len(streams) for streams in names.values())
        step = step or self.reporter.step("streams OPEN", total)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            for name in names:
                proc = state.processes[name]
                if not system.alive(proc):
                    raise LabError(
                        f"{name} exited; the end of {proc.log}:\n{system.tail(proc.log)}"
                    )
            lists = await asyncio.gather(
                *(system.tap_list(plan.tap_socket(self.state_dir, n)) for n in names)
            )
            pending = []
            for (name, streams), rows in zip(names.items(), lists, strict=True):
                status = {r["stream"]: r["status"] for r in rows or ()}
                pending += [
                    f"{name}/{s}:{status.get(s, 'closed')}"
                    for s in sorted(streams)
                    if status.get(s) != "OPEN"
                ]
            step.update(total - len(pending), " ".join(pending[:4]))
            if not pending:
                break
            if time.monotonic() > deadline:
                late = sorted({p.split("/")[0] for p in pending})
                detail = _log_tails(state, late)
                raise LabError(
                    f"streams not OPEN within {READY_TIMEOUT:g}s: {', '.join(pending)}\n{detail}"
                )
            await asyncio.sleep(0.1)
        step.finish()

    def _wait_ready(self, state: LabState, names: Sequence[str], title: str) -> None:
        system.run_async(self._await_ready(state, names, title))

    async def _await_ready(self, state: LabState, names: Sequence[str], title: str) -> None:
        step = self.reporter.step(title, len(names))
        pending = list(names)
        deadline = time.monotonic() + READY_TIMEOUT
        restarts = {n: _restarts(state.processes[n]) for n in names}
        while pending:
            for name in pending:
                proc = state.processes[name]
                if not system.alive(proc):
                    raise LabError(
                        f"{name} exited before it was ready; the end of {proc.log}:\n"
                        + system.tail(proc.log)
                    )
                if _restarts(proc) - restarts[name] >= CRASH_LOOP:
                    raise LabError(
                        f"{name} keeps dying before it is ready (started again "
                        f"{_restarts(proc) - restarts[name]} times); the end of {proc.log}:\n"
                        + system.tail(proc.log)
                    )
            answers = await asyncio.gather(*(self._ready_async(state, n) for n in pending))
            pending = [n for n, ok in zip(pending, answers, strict=True) if not ok]
            step.update(len(names) - len(pending), ", ".join(pending[:4]))
            if not pending:
                break
            if time.monotonic() > deadline:
                detail = _log_tails(state, pending)
                raise LabError(
                    f"not ready within {READY_TIMEOUT:g}s: {', '.join(pending)}\n{detail}"
                )
            await asyncio.sleep(0.1)
        step.finish()

    def ready(self, name: str) -> bool:
        """Whether instance ``name`` is ready now (a role: its Readiness; a traffic server:
        serving since it was last started; a gateway: its BIRD answering)."""
        state = self.load()
        if name not in state.processes:
            raise LabError(f"no instance {name!r}")
        return system.run_async(self._ready_async(state, name))

    async def _ready_async(self, state: LabState, name: str) -> bool:
        proc = state.processes[name]
        if proc.role == "server":
            return system.role_pid(proc) is not None and system.announced(proc.log, "serving on")
        if proc.role == "gateway":
            return system.bird_ready(plan.bird_socket(self.state_dir, name))
        return await system.readiness(plan.health_socket(self.state_dir, name))

    def _wait_tables(self, state: LabState, title: str = "load balancer tables") -> None:
        """Wait until every LB's table holds exactly the running targets of each stream of its
        conduit (by number: their addresses come from the IPAM), as their TAPA lists their
        open streams, and routes to each."""
        system.run_async(self._await_tables(state, title))

    def _lb_names(self, state: LabState) -> list[str]:
        """Every LB of the lab, conduit-a's first."""
        return [plan.lb_host(i, c) for c in state.spec.conduit_plans for i in state.lbs_of(c)]

    async def _open_streams_now(self, state: LabState) -> dict[int, list[tuple[str, str]]]:
        """Per running target, the streams its TAPA lists open, as (conduit, stream)."""
        running = self._running_targets(state)
        lists = await asyncio.gather(
            *(
                system.tap_list(plan.tap_socket(self.state_dir, plan.target_host(i)))
                for i in running
            )
        )
        spec = state.spec
        return {
            # a TAPA that does not answer (yet): what the lab opens on it
            i: [(r["conduit"], r["stream"]) for r in rows]
            if rows is not None
            else [(s.conduit.name, s.name) for s in plan.target_streams(spec, i)]
            for i, rows in zip(running, lists, strict=True)
        }

    def _running_lb_names(self, state: LabState) -> list[str]:
        return [
            plan.lb_host(i, c)
            for c in state.spec.conduit_plans
            for i in self._running_lbs(state, c)
        ]

    async def _table_checks(
        self, state: LabState, open_streams: dict[int, list[tuple[str, str]]]
    ) -> dict[str, plan.TableCheck]:
        names = self._running_lb_names(state)
        shows = await asyncio.gather(
            *(system.lb_show(plan.lb_socket(self.state_dir, n)) for n in names)
        )
        checks = {}
        for name, show in zip(names, shows, strict=True):
            found = plan.lb_from_name(name)
            assert found is not None
            checks[name] = plan.TableCheck(
                want=plan.table_want(state.spec, found[0], open_streams),
                have=system.lb_stream_counts(show),
                routable=self._routable_targets(state, name),
            )
        return checks

    async def _await_tables(self, state: LabState, title: str) -> None:
        open_streams = await self._open_streams_now(state)
        want = len(open_streams)
        names = self._running_lb_names(state)
        step = self.reporter.step(f"{title} ({want} targets)", len(names))
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            checks = await self._table_checks(state, open_streams)
            done = sum(1 for c in checks.values() if c.done)
            step.update(done, " ".join(c.text(n) for n, c in checks.items()))
            if done == len(names):
                break
            if time.monotonic() > deadline:
                raise LabError(
                    f"the LBs do not route to {want} targets within {READY_TIMEOUT:g}s "
                    "(per stream, wanted / in the table; fwmark rules): "
                    + "; ".join(
                        f"{n} {dict(c.want)} / {dict(c.have)}; {c.routable}"
                        for n, c in checks.items()
                        if not c.done
                    )
                )
            await asyncio.sleep(0.1)
        step.finish()

    def _route_gateway(
        self, state: LabState, lbs: Iterable[int], conduit: plan.ConduitPlan = plan.CONDUIT_A
    ) -> None:
        """``static`` routing: make the gateway routers route ``conduit``'s VIPs over exactly
        ``lbs`` (of that conduit)."""
        chosen = sorted(set(lbs))
        for router in state.spec.routers:
            netns = self.netns(plan.gateway_host(router))
            for family in state.spec.families:
                args = plan.gateway_route(chosen, family, conduit)
                system.run("ip", "-n", netns, *args, check=bool(chosen))
        state.set_routed_lbs_of(conduit, chosen)
        self._save(state)

    # -- the gateway routers

    def _gateway_running(self, state: LabState, router: int) -> bool:
        proc = state.processes.get(plan.gateway_instance(router))
        return proc is not None and system.alive(proc)

    def _route_lbs(
        self, state: LabState, router: int, conduit: plan.ConduitPlan = plan.CONDUIT_A
    ) -> dict[int, tuple[list[int], list[str]]]:
        """Per family, the LBs (of ``conduit``) gateway router ``router``'s kernel routes the
        conduit's VIP over, and the next hops that are not that conduit's LBs."""
        netns = self.netns(plan.gateway_host(router))
        return {
            family: plan.vip_next_hop_lbs(
                system.route_next_hops(netns, family, plan.vip_cidr(family, conduit)), conduit
            )
            for family in state.spec.families
        }

    def gateway_route_lbs(self, router: int = 1) -> dict[int, list[int]]:
        """Per family, the LB indexes gateway router ``router`` (1: ``gw``, 2: ``gw-2``)
        routes the VIP over now (read from its kernel routing table)."""
        state = self.load()
        return {f: lbs for f, (lbs, _) in self._route_lbs(state, router).items()}

    def wait_gateway_routes(
        self, lbs: Iterable[int] | None = None, timeout: float = GATEWAY_TIMEOUT
    ) -> None:
        """Wait until every running gateway router routes each VIP over exactly ``lbs``
        (default: the running LBs; conduit-b's VIPs, with two conduits: over its running
        LBs while a target has its stream open)."""
        state = self.load()
        want = self._running_lbs(state) if lbs is None else lbs
        self._wait_gateway_routes(
            state, self._gateway_want(state, want), "gateways route the VIPs", timeout
        )

    def _gateway_want(
        self, state: LabState, lbs: Iterable[int]
    ) -> dict[plan.ConduitPlan, list[int]]:
        """Over which LBs the gateways should route each conduit's VIPs: conduit-a's over
        ``lbs``; another conduit's over its running LBs, when a target has a stream of it open
        (with ``bgp`` and ``static-bfd`` an LB announces only VIPs it has targets for)."""
        want = {plan.CONDUIT_A: sorted(set(lbs))}
        others = state.spec.conduit_plans[1:]
        if not others:
            return want
        opened = system.run_async(self._open_streams_now(state))
        serving = {c for streams in opened.values() for c, _ in streams}
        for conduit in others:
            has_targets = conduit.name in serving or not state.spec.dynamic
            want[conduit] = self._running_lbs(state, conduit) if has_targets else []
        return want

    def _wait_gateway_routes(
        self,
        state: LabState,
        want: dict[plan.ConduitPlan, list[int]],
        title: str,
        timeout: float = GATEWAY_TIMEOUT,
    ) -> None:
        """Wait until every running gateway router routes each conduit's VIPs over exactly
        the LBs ``want`` gives it."""
        routers = [r for r in state.spec.routers if self._gateway_running(state, r)]
        if state.spec.dynamic and not routers:
            raise LabError("no gateway router's BIRD is running")
        if not state.spec.dynamic:
            routers = list(state.spec.routers)
        checks = [(r, c, f) for r in routers for c in want for f in state.spec.families]
        names = ", ".join(plan.lb_host(i, c) for c, lbs in want.items() for i in lbs) or "no LB"
        step = self.reporter.step(f"{title} ({names})", len(checks))
        deadline = time.monotonic() + timeout
        while True:
            for router in routers:
                name = plan.gateway_instance(router)
                if state.spec.dynamic and not self._gateway_running(state, router):
                    proc = state.processes[name]
                    raise LabError(
                        f"{name} exited; the end of {proc.log}:\n{system.tail(proc.log)}"
                    )
            seen = {(r, c): self._route_lbs(state, r, c) for r in routers for c in want}
            pending = [
                (r, c, f) for r, c, f in checks if seen[r, c][f][0] != want[c] or seen[r, c][f][1]
            ]
            step.update(
                len(checks) - len(pending),
                " ".join(
                    f"{plan.gateway_host(r)}/{c.name}/v{f}:"
                    + (",".join(plan.lb_host(i, c) for i in seen[r, c][f][0]) or "-")
                    for r, c, f in pending[:4]
                ),
            )
            if not pending:
                break
            if time.monotonic() > deadline:
                detail = "; ".join(
                    f"{plan.gateway_host(r)} routes {plan.vip_cidr(f, c)} over "
                    + (", ".join(plan.lb_host(i, c) for i in seen[r, c][f][0]) or "nothing")
                    for r, c, f in pending
                )
                sessions = "\n".join(
                    f"{plan.gateway_instance(r)}: {self._sessions_text(state, r)}"
                    for r in routers
                    if state.spec.dynamic
                )
                raise LabError(
                    f"the gateways do not route the VIPs over {names} within {timeout:g}s: "
                    f"{detail}\n{sessions}".rstrip()
                )
            time.sleep(0.1)
        step.finish()
        if 1 in routers:
            for conduit in want:
                lbs = sorted({i for lbs_, _ in seen[1, conduit].values() for i in lbs_})
                state.set_routed_lbs_of(conduit, lbs)
            self._save(state)

    def _sessions_text(self, state: LabState, router: int) -> str:
        report = self._gateway_sessions(state, router)
        if "error" in report:
            return str(report["error"])
        return (
            ", ".join(
                f"{s['lb'] or s['neighbor']} v{s['family']} {s['state']}"
                for s in report["sessions"]
            )
            or "no sessions"
        )

    def gateway_sessions(self, router: int = 1) -> list[dict[str, Any]]:
        """Gateway router ``router``'s sessions with the LBs, from its BIRD: BGP sessions
        (``bgp``) or BFD sessions (``static-bfd``); see ``_gateway_sessions``."""
        state = self.load()
        report = self._gateway_sessions(state, router)
        if "error" in report:
            raise LabError(str(report["error"]))
        sessions: list[dict[str, Any]] = report["sessions"]
        return sessions

    def _gateway_sessions(self, state: LabState, router: int) -> dict[str, Any]:
        """``{"sessions": [...]}`` or ``{"error": text}``. A session: ``lb`` (``lb-N``, None
        for an address that is no LB's), ``neighbor``, ``family``, ``protocol`` (BIRD's name,
        ``bfd`` for BFD, None when the LB has none), ``state`` (BGP: ``Established``,
        ``Active``, ...; BFD: ``Up``, ``Down``, ...; ``none``), ``established`` and
        ``since``. The lab's LBs without a session are listed too."""
        if not state.spec.dynamic:
            return {"sessions": []}
        sock = plan.bird_socket(self.state_dir, plan.gateway_instance(router))
        sessions: list[dict[str, Any]] = []
        try:
            if state.routing == "bgp":
                reply = system.bird_query(sock, "show protocols all")
                for p in system.parse_bird_protocols(reply):
                    if p.proto != "BGP" or not p.neighbor:
                        continue
                    bgp_state = p.bgp_state or p.state
                    sessions.append(
                        self._session(
                            p.neighbor, p.name, bgp_state, bgp_state == "Established", p.since
                        )
                    )
            else:
                reply = system.bird_query(sock, "show bfd sessions")
                for b in system.parse_bfd_sessions(reply):
                    found = plan.lb_of_address(b.address)
                    ours = found is not None and found[1] in state.lbs_of(found[0])
                    if b.state == "Up" or ours:
                        sessions.append(
                            self._session(b.address, "bfd", b.state, b.state == "Up", b.since)
                        )
        except system.BirdError as exc:
            return {"error": str(exc)}
        have = {s["neighbor"] for s in sessions}
        for conduit in state.spec.conduit_plans:
            for index in state.lbs_of(conduit):
                for family in state.spec.families:
                    address = plan.external_address(family, index, conduit).split("/")[0]
                    if address not in have:
                        sessions.append(self._session(address, None, "none", False, None))
        sessions.sort(key=lambda s: (s["index"] or (999,), s["family"], s["neighbor"]))
        for s in sessions:
            del s["index"]
        return {"sessions": sessions}

    @staticmethod
    def _session(
        neighbor: str, protocol: str | None, state: str, established: bool, since: str | None
    ) -> dict[str, Any]:
        found = plan.lb_of_address(neighbor)
        return {
            "lb": plan.lb_host(found[1], found[0]) if found is not None else None,
            "index": (plan.CONDUITS.index(found[0]), found[1]) if found is not None else None,
            "neighbor": neighbor,
            "family": 6 if ":" in neighbor else 4,
            "protocol": protocol,
            "state": state,
            "established": established,
            "since": since,
        }

    # -- whole, and what the kernels hold

    def problems(self) -> list[str]:
        """What keeps the lab from being whole now; empty when it is: every process running
        and ready (a gateway's BIRD answering), every target's TAPA listing its streams
        ``OPEN``, every LB's table holding exactly the targets with each stream open and
        routing to them, and (``bgp``, ``static-bfd``) every running gateway router routing
        each VIP over exactly the running LBs."""
        state = self.load()
        problems = system.run_async(self._problems(state))
        if problems or not state.spec.dynamic:
            return problems
        want = self._gateway_want(state, self._running_lbs(state))
        for router in state.spec.routers:
            if not self._gateway_running(state, router):
                continue
            for conduit, lbs in want.items():
                for family, (got, others) in self._route_lbs(state, router, conduit).items():
                    if got != lbs or others:
                        over = [plan.lb_host(i, conduit) for i in got] + others
                        problems.append(
                            f"{plan.gateway_host(router)} routes {plan.vip_cidr(family, conduit)}"
                            f" over {', '.join(over) or 'nothing'}"
                        )
        return problems

    async def _problems(self, state: LabState) -> list[str]:
        names = [
            n
            for n, p in sorted(state.processes.items(), key=lambda kv: _order(kv[1]))
            if p.role in (*plan.SUPERVISED_ROLES, "gateway")
        ]
        answers = await asyncio.gather(*(self._ready_async(state, n) for n in names))
        problems = [f"{n} not ready" for n, ok in zip(names, answers, strict=True) if not ok]
        if problems:
            return problems
        running = self._running_targets(state)
        lists = await asyncio.gather(
            *(
                system.tap_list(plan.tap_socket(self.state_dir, plan.target_host(i)))
                for i in running
            )
        )
        opened: dict[int, list[tuple[str, str]]] = {}
        for index, rows in zip(running, lists, strict=True):
            name = plan.target_host(index)
            if rows is None:
                problems.append(f"{name}'s TAPA does not answer")
                continue
            problems += [
                f"{name}/{r['stream']} {r['status']}" for r in rows if r["status"] != "OPEN"
            ]
            opened[index] = [(r["conduit"], r["stream"]) for r in rows]
        if problems:
            return problems
        checks = await self._table_checks(state, opened)
        return [f"{n} table {c.text(n)}" for n, c in checks.items() if not c.done]

    def wait_whole(self, timeout: float = READY_TIMEOUT) -> float:
        """Wait until ``problems`` is empty; how long it took. LabError with what is still
        wrong when it is not within ``timeout``."""
        started = time.monotonic()
        while True:
            problems = self.problems()
            if not problems:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise LabError(
                    f"the lab is not whole within {timeout:g}s: {'; '.join(problems[:8])}"
                )
            time.sleep(0.2)

    def kernel_states(self) -> dict[str, system.KernelState]:
        """What every namespace of the lab holds in its kernel (``system.kernel_state``), by
        namespace: links, addresses, routes, rules, nftables and xtables rules, processes."""
        state = self.load()
        present = set(system.netns_list())
        names = [n for n in sorted(state.namespaces) if n in present]
        with ThreadPoolExecutor(max_workers=3) as pool:
            states = pool.map(lambda n: system.kernel_state(n, state.spec.families), names)
            return dict(zip(names, states, strict=True))

    def kernel_changes(
        self, before: dict[str, system.KernelState], timeout: float = 10.0
    ) -> tuple[list[str], float]:
        """Wait until every namespace's kernel holds again what ``before`` says (a reading of
        ``kernel_states``), at most ``timeout`` seconds: what still differs then
        (``namespace: + kind item``, empty when nothing does: nothing stale) and how long it
        took. A process started again may take a moment to put everything back (a proxy
        routes replies over a restarted LB once that LB says it takes them)."""
        started = time.monotonic()
        while True:
            after = self.kernel_states()
            changes = [
                f"{netns}: {line}"
                for netns in sorted(set(before) | set(after))
                for line in system.kernel_state_diff(before.get(netns, {}), after.get(netns, {}))
            ]
            took = time.monotonic() - started
            if not changes or took > timeout:
                return changes, took
            time.sleep(0.5)

    # -- what runs

    def _running_targets(self, state: LabState) -> list[int]:
        return [
            i
            for i in sorted(state.target_nodes)
            if all(
                name in state.processes and system.alive(state.processes[name])
                for name in (plan.target_host(i), f"server-{i}")
            )
        ]

    def _running_lbs(
        self, state: LabState, conduit: plan.ConduitPlan = plan.CONDUIT_A
    ) -> list[int]:
        running = []
        for i in state.lbs_of(conduit):
            proc = state.processes.get(plan.lb_host(i, conduit))
            if proc is not None and system.alive(proc):
                running.append(i)
        return running

    # -- down

    def down(self, keep_logs: Path | None = None) -> list[str]:
        """Stop every process (targets first, the NSP and IPAM last) and remove every namespace
        of the lab; the names of the namespaces removed. With `keep_logs`, every instance's
        logs (its own and its BIRD's) are copied there first, one directory per instance."""
        state = load(self.state_dir)
        procs = list(state.processes.values()) if state else []
        if self.state_dir.exists():
            # first of all: no supervisor starts anything again while the lab goes
            plan.hold_path(self.state_dir).touch()
        # in stages, so that each role drains while what it talks to is still there (the LBs
        # withdraw from the gateways' BIRD); deleting a namespace kills whatever still runs in
        # it, such as an LB's own BIRD
        for stage in (("target", "server"), ("lb", "proxy"), ("gateway",), ("nsp", "ipam")):
            system.stop([p for p in procs if p.role in stage], timeout=3)
        system.stop([p for p in procs if p.role not in plan.ROLE_ORDER], timeout=3)
        names = set(state.namespaces if state else ()) | set(self._namespaces_found())
        present = set(system.netns_list())
        for name in sorted(names):
            if name in present:
                system.delete_netns(name)
        if keep_logs is not None:
            self._keep_logs(state, keep_logs)
        self._remove_files(state)
        return sorted(names & present)

    def _keep_logs(self, state: LabState | None, into: Path) -> None:
        for name in sorted(state.processes) if state else []:
            source = plan.role_dir(self.state_dir, name)
            logs = sorted(source.glob("*.log")) if source.is_dir() else []
            if logs:
                (into / name).mkdir(parents=True, exist_ok=True)
            for log in logs:
                with contextlib.suppress(OSError):
                    shutil.copy2(log, into / name / log.name)

    def _remove_files(self, state: LabState | None) -> None:
        """The state file, the instances' directories and the lab's CA (nothing else in the
        state dir)."""
        names = set(state.processes) if state else set()
        for path in self.state_dir.glob("*") if self.state_dir.exists() else []:
            if path.is_dir() and (path.name in names or _instance_dir(path.name)):
                shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(plan.pki_dir(self.state_dir), ignore_errors=True)
        for path in (state_path(self.state_dir), plan.hold_path(self.state_dir)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):
            self.state_dir.rmdir()

    # -- scale

    def scale(self, *, targets: int | None = None, lbs: int | None = None) -> LabState:
        state = self.load()
        if lbs is not None:
            low, high = plan.LIMITS["lbs"]
            if not low <= lbs <= high:
                raise LabError(f"--lbs {lbs}: must be within {low}..{high}")
            self._scale_lbs(state, lbs)
        if targets is not None:
            low, high = plan.LIMITS["targets"]
            if not low <= targets <= high:
                raise LabError(f"--targets {targets}: must be within {low}..{high}")
            self._scale_targets(state, targets)
        return state

    def _scale_targets(self, state: LabState, want: int) -> None:
        running = self._running_targets(state)
        dead = [i for i in state.target_nodes if i not in running]
        change = plan.scale_plan(running, dead, want)
        state.targets_wanted = want
        self._save(state)
        if change.empty:
            return
        if change.remove or change.clear:
            step = self.reporter.step(
                "targets leaving (dead ones cleared)", len(change.remove) + len(change.clear)
            )
            # graceful: the sidecar leaves the stream and drains, then the application stops
            sidecars = [state.processes[plan.target_host(i)] for i in change.remove]
            system.stop(sidecars, STOP_TIMEOUT)
            servers = [
                state.processes[f"server-{i}"]
                for i in change.remove
                if f"server-{i}" in state.processes
            ]
            system.stop(servers, STOP_TIMEOUT)
            for done, index in enumerate([*change.remove, *change.clear], 1):
                self._forget_target(state, index)
                step.update(done)
            step.finish()
        if change.add:
            nodes = list(state.node_indexes)
            placement = plan.place_targets(state.target_nodes, change.add, nodes)
            hosts = [plan.target_host(i) for i in placement]
            for host in hosts:
                # a new target (a new pod): nothing of the one that had its number before
                with contextlib.suppress(FileNotFoundError):
                    plan.target_state_file(self.state_dir, host).unlink()
            step = self.reporter.step("namespaces and links", 1)
            self._make_network(state, hosts, first=False)
            for index, node in placement.items():
                state.targets[str(index)] = node
            self._save(state)
            step.update(1)
            step.finish()
            self._start_targets(state, placement)
        self._wait_tables(state)

    def _forget_target(self, state: LabState, index: int) -> None:
        host = plan.target_host(index)
        netns = self.netns(host)
        system.delete_netns(netns)
        if netns in state.namespaces:
            state.namespaces.remove(netns)
        for name in (host, f"server-{index}"):
            state.processes.pop(name, None)
        state.targets.pop(str(index), None)
        self._save(state)

    def _scale_lbs(self, state: LabState, want: int) -> None:
        """Every conduit's LBs to ``want``."""
        state.lbs = want
        self._save(state)
        for conduit in state.spec.conduit_plans:
            self._scale_conduit_lbs(state, want, conduit)

    def _scale_conduit_lbs(self, state: LabState, want: int, conduit: plan.ConduitPlan) -> None:
        running = self._running_lbs(state, conduit)
        made = state.lbs_of(conduit)
        dead = [i for i in made if i not in running]
        change = plan.scale_plan(running, dead, want)
        if change.empty:
            return
        keep = [i for i in running if i not in change.remove]
        dynamic = state.spec.dynamic
        label = "load balancers" if conduit is plan.CONDUIT_A else f"{conduit.name} LBs"
        if change.remove or change.clear:
            if not dynamic:
                # the gateway first: no new packet goes to a leaving LB, then it stops
                self._route_gateway(state, keep, conduit)
            # bgp, static-bfd: on SIGTERM the LB withdraws from the gateways itself first
            step = self.reporter.step(f"{label} leaving", len(change.remove))
            leaving = [state.processes[plan.lb_host(i, conduit)] for i in change.remove]
            system.stop(leaving, STOP_TIMEOUT)
            for done, index in enumerate([*change.remove, *change.clear], 1):
                host = plan.lb_host(index, conduit)
                system.delete_netns(self.netns(host))
                if self.netns(host) in state.namespaces:
                    state.namespaces.remove(self.netns(host))
                state.processes.pop(host, None)
                made.remove(index)
                self._save(state)
                step.update(done)
            step.finish()
            if dynamic and not change.add:
                want_routes = self._gateway_want(state, self._running_lbs(state))
                self._wait_gateway_routes(state, want_routes, "gateways route the VIPs")
        if change.add:
            step = self.reporter.step("namespaces and links", 1)
            hosts = [plan.lb_host(i, conduit) for i in change.add]
            self._make_network(state, hosts, first=False)
            state.set_lbs_of(conduit, sorted({*state.lbs_of(conduit), *change.add}))
            self._save(state)
            step.update(1)
            step.finish()
            for index in change.add:
                self._start_lb(state, index, conduit)
            self._wait_ready(state, hosts, label)
            self._wait_tables(state)
            if dynamic:
                # the LB announces itself once it is ready; wait until the gateways route to it
                want_routes = self._gateway_want(state, self._running_lbs(state))
                self._wait_gateway_routes(state, want_routes, "gateways route the VIPs")
            else:
                # ready, with every target in its table: now the gateway may send it traffic
                self._route_gateway(state, [*keep, *change.add], conduit)

    # -- kill

    def kill(self, name: str, *, netns: bool = False) -> int | None:
        """Kill an instance at once (SIGKILL); the pid killed (None for a pod or a gateway).

        - A role's process (``nsp``, ``ipam``, ``lb-N``, ``lbb-N``, ``proxy-N``, ``proxyb-N``,
          ``target-N``: the sidecar) or a target's application (``server-N``, its traffic
          server) crashes, as a container does: its supervisor starts it again (not with
          ``--no-restart``: then ``restart`` does, or ``scale`` for a target or an LB). Its
          namespace stays, with whatever else runs there (an LB's BIRD must die with the LB,
          or it keeps attracting traffic).
        - With ``netns`` (``target-N``, ``server-N``, ``lb-N``, ``lbb-N``) the pod is gone: its
          supervisors, everything in its namespace and the namespace itself (its links: a
          target's conduit link, an LB's link to the gateways); ``scale`` replaces it.
        - ``gateway-N`` (``gateway``: ``gw``'s, ``gateway-2``: ``gw-2``'s): the gateway
          router's BIRD gets SIGKILL (its kernel routes stay, as BIRD leaves them); nothing
          starts it again but ``restart gateway-N``; with ``netns`` (``gw-2`` only) the
          router's namespace goes.
        """
        state = self.load()
        router = plan.gateway_router_from_name(name)
        if router is not None:
            self._kill_gateway(state, router, netns=netns)
            return None
        lb = plan.lb_from_name(name)
        target = plan.target_of(name)
        if netns:
            if lb is not None and lb[1] in state.lbs_of(lb[0]):
                self._kill_pod(state, [plan.lb_host(lb[1], lb[0])], plan.lb_host(lb[1], lb[0]))
            elif target is not None and _index(target) in state.target_nodes:
                self._kill_pod(state, [target, f"server-{_index(target)}"], target)
            else:
                raise LabError(
                    f"--netns: only a target's, an LB's or gw-2's namespace can go, not {name!r}"
                )
            return None
        proc = state.processes.get(name)
        if proc is None or plan.chaos_kind(name) is None:
            raise LabError(
                f"nothing named {name!r} to kill; there are {', '.join(self._killable(state))}"
            )
        if proc.netns not in system.netns_list():
            raise LabError(f"{name}'s namespace is gone: `meridioctl lab scale` replaces it")
        pid = system.kill_role(proc)
        if pid is None:
            raise LabError(f"{name} is not running{_waiting_text(proc)}")
        return pid

    def _killable(self, state: LabState) -> list[str]:
        procs = sorted(state.processes.values(), key=_order)
        names = [p.name for p in procs if plan.chaos_kind(p.name) is not None]
        routers = [f"gateway-{r}" for r in state.spec.routers if state.spec.dynamic]
        return [*names, *routers]

    def _kill_pod(self, state: LabState, names: Sequence[str], host: str) -> None:
        """The pod is gone: its supervisors first (nothing is started again), then its
        processes, then its namespace with whatever else is in it."""
        procs = [state.processes[n] for n in names if n in state.processes]
        pids = [pid for pid in map(system.role_pid, procs) if pid is not None]
        for proc in procs:
            system.send_signal(proc, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._delete_netns(state, host)

    def _kill_gateway(self, state: LabState, router: int, *, netns: bool) -> None:
        if router not in state.spec.routers:
            raise LabError(f"the lab has {state.gateways} gateway router(s), no gateway-{router}")
        proc = state.processes.get(plan.gateway_instance(router))
        if netns and router == 1:
            raise LabError("gw is also the traffic client: only gw-2's namespace can go")
        if proc is None and not netns:
            raise LabError(
                f"with {state.routing} routing the gateways run no BIRD; --netns removes gw-2"
            )
        if proc is not None:
            system.send_signal(proc, signal.SIGKILL)
        if netns:
            self._delete_netns(state, plan.gateway_host(router))

    def _delete_netns(self, state: LabState, host: str) -> None:
        netns = self.netns(host)
        system.delete_netns(netns)
        if netns in state.namespaces:
            state.namespaces.remove(netns)
        self._save(state)

    def _target_names(self, state: LabState) -> list[str]:
        return [plan.target_host(i) for i in sorted(state.target_nodes)]

    # -- restart

    def _restartable(self, state: LabState) -> list[str]:
        """What ``restart`` starts again in its namespace: the NSP, the IPAM, the LBs, the
        proxies and the targets' sidecars."""
        roles = ("nsp", "ipam", "lb", "proxy", "target")
        procs = sorted(state.processes.values(), key=_order)
        return [p.name for p in procs if p.role in roles]

    def restart(self, name: str, *, kill: bool = False) -> None:
        """Stop instance ``name``'s process if it runs (SIGTERM, gracefully; with ``kill``
        SIGKILL, a crash) and start it again in its namespace with the same command line,
        then wait until it is ready: a target until the streams it reopens by itself (from
        its state file) are ``OPEN``; for anything but the IPAM also until every LB's table
        holds every target again. ``gateway-N``: the gateway router's BIRD.

        A supervised process is stopped and its supervisor starts it again (as a container
        restarted in its pod: ``restarts`` counts it); where no supervisor would (``--no-restart``,
        or the supervisor is gone), a new supervisor starts it."""
        state = self.load()
        router = plan.gateway_router_from_name(name)
        if router is not None:
            proc = state.processes.get(plan.gateway_instance(router))
            if proc is not None and system.alive(proc):
                self._stop_one(proc, kill=kill)
            self.restart_gateway(router)
            return
        proc = state.processes.get(name)
        if proc is None or name not in self._restartable(state):
            choices = self._restartable(state)
            raise LabError(f"nothing named {name!r} to restart; there are {', '.join(choices)}")
        if proc.netns not in system.netns_list():
            raise LabError(
                f"{name}'s namespace {proc.netns} is gone: `meridioctl lab scale` replaces it"
            )
        status = system.supervised(proc)
        if status is not None and status.restart and system.alive(proc):
            # its supervisor starts it again once it has gone
            old = system.signal_role(proc, signal.SIGKILL if kill else signal.SIGTERM)
            if system.wait_restarted(proc, old, RESTART_TIMEOUT) is None:
                raise LabError(
                    f"{name} was not started again within {RESTART_TIMEOUT:g}s"
                    f"{_waiting_text(proc)}; the end of {proc.log}:\n{system.tail(proc.log)}"
                )
        else:
            if system.alive(proc):
                self._stop_one(proc, kill=kill)
            host = proc.netns.removeprefix(self.prefix)
            self._start(state, name, proc.role, host, proc.argv, program=[])
        self._wait_ready(state, [name], f"{name} started again")
        if proc.role != "ipam":
            # the targets reconnect (the NSP, a proxy) or reopen their streams (a target)
            system.run_async(self._await_all_open(state))
            self._wait_tables(state)
        if proc.role == "lb" and state.spec.dynamic:
            # it announces the VIPs again once it forwards
            want = self._gateway_want(state, self._running_lbs(state))
            self._wait_gateway_routes(state, want, "gateways route the VIPs")

    async def _await_all_open(self, state: LabState) -> None:
        """Wait until every running target lists the lab's streams it has open ``OPEN``."""
        ours = {(s.conduit.name, s.name) for s in state.spec.stream_plans}
        opened = await self._open_streams_now(state)
        names = {
            plan.target_host(i): {s for c, s in streams if (c, s) in ours}
            for i, streams in opened.items()
        }
        await self._await_open(state, names)

    @staticmethod
    def _stop_one(proc: Process, *, kill: bool) -> None:
        """Stop an instance for good (its supervisor too): SIGTERM, which a supervisor passes
        on, or SIGKILL to the supervisor first (so that it starts nothing again) and then to
        the process."""
        if kill:
            pid = system.role_pid(proc)
            system.send_signal(proc, signal.SIGKILL)
            system.wait_gone([proc], STOP_TIMEOUT)
            if pid is not None and pid != proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                system.wait_pid_gone(pid, STOP_TIMEOUT)
        else:
            system.stop([proc], STOP_TIMEOUT)

    # -- certificates

    def certified(self) -> list[str]:
        """The instances with a certificate of the lab's CA (every meridiod), in ``status``
        order."""
        return self._certified(self.load())

    @staticmethod
    def _certified(state: LabState) -> list[str]:
        procs = sorted(state.processes.values(), key=_order)
        return [p.name for p in procs if p.role in MERIDIOD_ROLES]

    def rotate(
        self, names: Sequence[str] = (), *, ca: bool = False, timeout: float = ROTATE_TIMEOUT
    ) -> RotateReport:
        """Issue new certificates (new keys) from the lab's CA to instances ``names`` (all
        when none), and wait until each running one has loaded them: new handshakes, as a
        server and as a client, use them; established connections go on.

        With ``ca``: rotate the CA itself, every instance, in three steps, each waited for
        before the next begins: a new CA is added to every trust bundle; every instance is
        issued a certificate of the new CA; the old CA is removed from the bundles (its
        certificates are refused from then on). A rotation that did not finish (the new CA is
        in ``pki/ca-next``) is finished by the next ``rotate --ca``, with the same new CA.

        Each wait is on the daemons' logs: a daemon polls its files every
        ``tls-reload-interval`` seconds (5) and logs ``tls credentials reloaded`` (or
        ``mutual tls`` when it starts) with ``files``, the digest of what it loaded; the wait
        ends when every running instance logged the digest of the files written for it.
        LabError, naming the late instances, when that takes longer than ``timeout`` or the
        files do not load."""
        state = self.load()
        certified = self._certified(state)
        directory = plan.pki_dir(self.state_dir)
        if ca and names:
            raise LabError("rotate --ca issues every instance a certificate: name none")
        unknown = [n for n in names if n not in certified]
        if unknown:
            raise LabError(
                f"no instance {', '.join(map(repr, unknown))} with a certificate; there are "
                f"{', '.join(certified)}"
            )
        if not ca and pki.rotation_pending(directory):
            raise LabError(
                f"a CA rotation did not finish ({directory / pki.NEXT_CA} is there): "
                "`meridioctl lab rotate --ca` finishes it"
            )
        started = time.monotonic()
        try:
            old = pki.load_ca(directory)
            if not ca:
                chosen = list(dict.fromkeys(names)) or certified
                self._rewrite(
                    state,
                    chosen,
                    "certificates re-issued",
                    lambda n: self._issue(state, n, old, old.pem),
                    timeout,
                )
                return RotateReport(chosen, _ca_text(old), _ca_text(old), _elapsed(started))
            new = pki.next_ca(directory)
            both = old.pem + new.pem
            present = [
                n for n in certified if (plan.tls_dir(self.state_dir, n) / "tls.crt").exists()
            ]
            self._rewrite(
                state,
                present,
                "new CA added to the trust bundles",
                lambda n: pki.write_bundle(plan.tls_dir(self.state_dir, n), both),
                timeout,
            )
            self._rewrite(
                state,
                certified,
                "certificates issued by the new CA",
                lambda n: self._issue(state, n, new, both),
                timeout,
            )
            pki.promote_ca(directory)
            self._rewrite(
                state,
                certified,
                "old CA removed from the trust bundles",
                lambda n: pki.write_bundle(plan.tls_dir(self.state_dir, n), new.pem),
                timeout,
            )
            return RotateReport(certified, _ca_text(old), _ca_text(new), _elapsed(started))
        except pki.PkiError as exc:
            raise LabError(str(exc)) from None

    def _issue(self, state: LabState, name: str, ca: pki.Ca, bundle: bytes) -> None:
        role = state.processes[name].role
        pki.issue(
            plan.pki_dir(self.state_dir),
            role,
            name,
            plan.tls_dir(self.state_dir, name),
            ca=ca,
            bundle=bundle,
        )

    def _rewrite(
        self,
        state: LabState,
        names: Sequence[str],
        title: str,
        write: Callable[[str], None],
        timeout: float,
    ) -> None:
        """``write(name)`` every instance's files, then wait until every running one logs
        that it uses them."""
        from meridio.runtime.tls import files_digest, resolve_paths

        step = self.reporter.step(title, len(names))
        marks = {n: _size(Path(state.processes[n].log)) for n in names}
        want: dict[str, str] = {}
        for name in names:
            write(name)
            paths = resolve_paths(str(plan.tls_dir(self.state_dir, name)))
            assert paths is not None
            want[name] = files_digest(paths)
        deadline = time.monotonic() + timeout
        pending = list(names)
        while True:
            late = []
            for name in pending:
                proc = state.processes[name]
                found, error = _loaded(Path(proc.log), marks[name], want[name])
                if error is not None:
                    raise LabError(f"{name} does not load its new certificate: {error}")
                # one that does not run now reads the files when it starts
                if not found and system.role_pid(proc) is not None:
                    late.append(name)
            pending = late
            step.update(len(names) - len(pending), ", ".join(pending[:4]))
            if not pending:
                break
            if time.monotonic() > deadline:
                detail = _log_tails(state, pending)
                raise LabError(
                    f"not using their new TLS files within {timeout:g}s: "
                    f"{', '.join(pending)}\n{detail}"
                )
            time.sleep(0.1)
        step.finish()

    # -- TAPA

    def _running_target(self, state: LabState, name: str) -> Process:
        proc = state.processes.get(name)
        if proc is None or proc.role != "target":
            targets = ", ".join(self._target_names(state)) or "none"
            raise LabError(f"no target {name!r}; the targets are {targets}")
        if not system.alive(proc):
            raise LabError(f"{name} is not running (`meridioctl lab scale` replaces it)")
        return proc

    def tap_socket(self, target: str) -> Path:
        """Target ``target``'s TAPA socket (``meridioctl tap --socket``)."""
        state = self.load()
        self._running_target(state, target)
        return plan.tap_socket(self.state_dir, target)

    def tap(self, target: str, action: str, streams: Sequence[str], *, wait: bool = True) -> None:
        """``open`` or ``close`` streams (``stream-b``, or ``conduit/stream``) on target
        ``target`` through its TAPA. With ``wait``: after ``open`` until each stream the lab
        defines is ``OPEN``; after either until every LB's tables hold exactly the targets
        with each stream open."""
        if action not in ("open", "close"):
            raise LabError(f"tap {action!r}: open or close")
        state = self.load()
        self._running_target(state, target)
        try:
            refs = [plan.resolve_stream(s) for s in streams]
        except plan.PlanError as exc:
            raise LabError(str(exc)) from None
        if not refs:
            raise LabError(f"tap {action}: name the streams")
        system.run_async(self._tap(state, target, action, refs, wait))

    async def _tap(
        self,
        state: LabState,
        target: str,
        action: str,
        refs: Sequence[tuple[str, str]],
        wait: bool,
    ) -> None:
        sock = plan.tap_socket(self.state_dir, target)
        for conduit, stream in refs:
            await system.tap_call(sock, action, system.tap_stream(plan.TRENCH, conduit, stream))
        if not wait:
            return
        if action == "open":
            ours = {(s.conduit.name, s.name) for s in state.spec.stream_plans}
            await self._await_open(state, {target: {s for c, s in refs if (c, s) in ours}})
        await self._await_tables(state, "load balancer tables")

    def tap_list(self, target: str) -> list[dict[str, str]]:
        """The streams target ``target`` has open, with their status, from its TAPA."""
        state = self.load()
        self._running_target(state, target)
        rows = system.run_async(system.tap_list(plan.tap_socket(self.state_dir, target)))
        if rows is None:
            raise LabError(f"{target}'s TAPA does not answer")
        return rows

    # -- status

    def status(self) -> dict[str, Any]:
        state = self.load()
        spec = state.spec
        return system.run_async(self._status(state, spec))

    async def _status(self, state: LabState, spec: LabSpec) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        for name, proc in sorted(state.processes.items(), key=lambda kv: _order(kv[1])):
            pid = system.role_pid(proc)
            running = pid is not None
            row: dict[str, Any] = {
                "name": name,
                "role": proc.role,
                "namespace": proc.netns,
                "pid": pid,
                "running": running,
                "ready": False,
                "restarts": _restarts(proc),
                "supervisor": _supervisor_row(proc),
                "addresses": self._addresses(state, proc),
                "log": proc.log,
            }
            if running and proc.role == "server":
                row["ready"] = system.announced(proc.log, "serving on")
            elif running and proc.role == "gateway":
                row["ready"] = system.bird_ready(plan.bird_socket(self.state_dir, name))
            elif running:
                row["ready"] = await system.readiness(plan.health_socket(self.state_dir, name))
            if running and proc.role == "lb":
                show = await system.lb_show(plan.lb_socket(self.state_dir, name))
                row["targets"] = len(system.lb_target_ips(show))
                row["streams"] = system.lb_stream_counts(show)
            if proc.role == "target":
                # the streams it has open and their status, from its TAPA
                sock = plan.tap_socket(self.state_dir, name)
                row["streams"] = await system.tap_list(sock) if running else None
            if proc.role == "lb" and spec.dynamic:
                # the LB's own BIRD (it must not outlive the LB)
                row["bird"] = system.netns_processes(proc.netns, "bird")
            if proc.role in ("target", "server"):
                row["node"] = plan.node_host(state.target_nodes.get(_index(name), 0))
            rows.append(row)
        return {
            "state_dir": str(self.state_dir),
            "phase": state.phase,
            "lbs": state.lbs,
            "proxies": state.proxies,
            "targets": state.targets_wanted,
            "ip_family": spec.ip_family,
            "mechanism": spec.mechanism,
            "lb_mode": spec.lb_mode,
            "external": spec.external,
            "routing": spec.routing,
            "gateways": spec.gateways,
            "restart": state.restart,
            "conduits": [c.name for c in spec.conduit_plans],
            "streams": [
                {
                    "name": st.name,
                    "conduit": st.conduit.name,
                    "endpoints": plan.vip_endpoints(spec.families, st),
                }
                for st in spec.stream_plans
            ],
            "vips": plan.vip_endpoints(spec.families),
            "gateway": self._gateway_status(state, rows),
            "instances": rows,
        }

    def _gateway_status(self, state: LabState, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``gw`` (the traffic client's router): its namespace, addresses and the LBs its
        kernel routes the VIPs over (``routes_over``: over any VIP; ``routes``: per VIP);
        ``routers``: every gateway router with its sessions with the LBs and its routes."""
        routers = []
        for router in state.spec.routers:
            host = plan.gateway_host(router)
            name = plan.gateway_instance(router) if state.spec.dynamic else None
            present = self.netns(host) in system.netns_list()
            conduits = state.spec.conduit_plans if present else ()
            seen = {c: self._route_lbs(state, router, c) for c in conduits}
            routes = {
                plan.vip_cidr(f, c): [plan.lb_host(i, c) for i in lbs] + others
                for c, per_family in seen.items()
                for f, (lbs, others) in per_family.items()
            }
            over = [
                plan.lb_host(i, c)
                for c, per_family in seen.items()
                for i in sorted({i for lbs, _ in per_family.values() for i in lbs})
            ]
            entry: dict[str, Any] = {
                "host": host,
                "namespace": self.netns(host),
                "addresses": [plan.gateway_router_cidr(f, router) for f in state.spec.families],
                "bird": name,
                "running": bool(name and self._gateway_running(state, router)),
                "routes": routes,
                "routes_over": over,
                "sessions": [],
            }
            if entry["running"]:
                report = self._gateway_sessions(state, router)
                entry["sessions"] = report.get("sessions", [])
                if "error" in report:
                    entry["error"] = report["error"]
            for row in rows:
                if row["name"] == name:
                    row["sessions"] = len(entry["sessions"])
                    row["established"] = sum(1 for s in entry["sessions"] if s["established"])
            routers.append(entry)
        first = routers[0]
        return {
            "namespace": first["namespace"],
            "addresses": first["addresses"],
            "routing": state.routing,
            "routes_over": first["routes_over"],
            "routes": first["routes"],
            "routers": routers,
        }

    def _addresses(self, state: LabState, proc: Process) -> list[str]:
        index = _index(proc.name)
        if proc.role in ("nsp", "ipam"):
            return [plan.primary_address(proc.role)]
        lb = plan.lb_from_name(proc.name)
        if proc.role == "lb" and lb is not None:
            return [plan.primary_address(lb[0].lb_kind, index)] + [
                plan.external_address(f, index, lb[0]) for f in state.spec.families
            ]
        proxy = plan.proxy_from_name(proc.name)
        if proc.role == "proxy" and proxy is not None:
            return [plan.primary_address(proxy[0].node_kind, index)]
        if proc.role == "target":
            return [plan.primary_address("target", index)]
        if proc.role == "gateway":
            router = plan.gateway_router_from_name(proc.name) or 1
            return [plan.gateway_router_cidr(f, router) for f in state.spec.families]
        ports = plan.server_ports(state.spec)
        return [plan.hostport(plan.VIPS[f], p) for f in state.spec.families for p in ports]

    def log_file(self, name: str) -> Path:
        state = self.load()
        proc = state.processes.get(name)
        if proc is None:
            raise LabError(f"no instance {name!r}; instances: {', '.join(sorted(state.processes))}")
        return Path(proc.log)

    # -- traffic

    def traffic_argv(
        self,
        args: Sequence[str],
        families: Iterable[int] | None = None,
        command: str = "client",
        stream: str | None = None,
    ) -> list[str]:
        """The traffic client's (or ``command``'s: ``probe``) command line, run in the gateway
        namespace against the VIPs (of ``families``, default all of the lab's; of
        ``stream``'s conduit, on its port, default ``stream-a``'s) unless ``args`` name
        addresses."""
        state = self.load()
        fams = sorted(set(families) if families is not None else state.spec.families)
        for family in fams:
            if family not in state.spec.families:
                raise LabError(f"the lab has no IPv{family} (it is {state.ip_family})")
        chosen = plan.STREAM_A
        if stream is not None:
            known = {s.name: s for s in state.spec.stream_plans}
            if stream not in known:
                raise LabError(f"the lab has no stream {stream!r}; it has {', '.join(known)}")
            chosen = known[stream]
        addresses: list[str] = []
        if not any(a in ("-a", "--address") or a.startswith("--address=") for a in args):
            for endpoint in plan.vip_endpoints(fams, chosen):
                addresses += ["--address", endpoint]
        return [
            "ip",
            "netns",
            "exec",
            self.netns("gw"),
            *traffic_tool(),
            command,
            *addresses,
            *args,
        ]

    def start_traffic(
        self,
        args: Sequence[str],
        families: Iterable[int] | None = None,
        command: str = "client",
        stream: str | None = None,
        *,
        progress: bool = False,
    ) -> TrafficRun:
        """Start a traffic client (or ``probe``; JSON report) in the background; with
        ``progress``, followed while it runs (:meth:`TrafficRun.wait_progress`)."""
        shown = "line" if progress else "none"
        argv = self.traffic_argv(
            ["--output", "json", "--progress", shown, *args], families, command, stream
        )
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=system.clean_environment(),
        )
        return TrafficRun(proc, argv, progress)

    def traffic(self, args: Sequence[str], families: Iterable[int] | None = None) -> dict[str, Any]:
        """Run a traffic client to its end; its report."""
        return self.start_traffic(args, families).result()


def _waiting_text(proc: Process) -> str:
    """``; its supervisor starts it again in 1.6 s`` (or why it does not), for messages."""
    status = system.supervised(proc)
    if status is None:
        return "" if system.alive(proc) else " (gone)"
    if not system.alive(proc):
        return " (its supervisor is gone)"
    if status.state == "waiting" and status.next_start is not None:
        seconds = max(0.0, status.next_start - time.time())
        return f"; its supervisor starts it again in {seconds:.1f} s"
    return f" (its supervisor is {status.state})"


def _supervisor_row(proc: Process) -> dict[str, Any] | None:
    """What ``status`` says of an instance's supervisor: its pid (None when it is gone), its
    state (``running``, ``waiting`` to start the program again, ``exited``, ...), the
    restarts, how the program last ended and, while ``waiting``, in how many seconds it starts
    again. None for a process without one."""
    if not proc.supervised:
        return None
    status = system.supervised(proc)
    alive = system.alive(proc)
    row: dict[str, Any] = {
        "pid": proc.pid if alive else None,
        "state": (status.state if status is not None else "starting") if alive else "gone",
        "restarts": status.restarts if status is not None else 0,
        "last_exit": None,
        "next_start": None,
    }
    if status is not None and status.last_exit is not None:
        end = status.last_exit
        row["last_exit"] = {
            "code": end.code,
            "signal": end.signal,
            "ago": round(time.time() - end.at, 1),
            "ran": end.ran,
        }
    if alive and status is not None and status.state == "waiting" and status.next_start:
        row["next_start"] = round(max(0.0, status.next_start - time.time()), 1)
    if not alive and status is not None and status.state == "exited":
        row["state"] = "exited"
    return row


def _restarts(proc: Process) -> int:
    status = system.supervised(proc)
    return status.restarts if status is not None else 0


def _log_tails(state: LabState, names: Iterable[str]) -> str:
    """The end of each named instance's log, under its path (for an error message)."""
    return "\n".join(
        f"--- {n}: {state.processes[n].log}\n{system.tail(state.processes[n].log)}" for n in names
    )


def _order(proc: Process) -> tuple[int, str, int, str]:
    kind = plan.ROLE_ORDER.index(proc.role) if proc.role in plan.ROLE_ORDER else 99
    # lb-N before lbb-N, proxy-N before proxyb-N
    return (kind, proc.name.rpartition("-")[0], _index(proc.name), proc.name)


def _index(name: str) -> int:
    number = name.rpartition("-")[2]
    return int(number) if number.isdigit() else 0


def _instance_dir(name: str) -> bool:
    kind, _, number = name.partition("-")
    if name in ("nsp", "ipam") or re.fullmatch(r"bird-gw(-\d+)?", name):
        return True
    kinds = ("target", "server", *(k for c in plan.CONDUITS for k in (c.lb_kind, c.proxy_kind)))
    return kind in kinds and number.isdigit()


def _gateway_host(host: str) -> bool:
    """``gw`` or another gateway router (``gw-N``)."""
    return re.fullmatch(r"gw(-\d+)?", host) is not None


@dataclass(frozen=True)
class RotateReport:
    """What ``rotate`` did: the instances with new certificates, the CA before and after
    (``ca.crt``'s SHA-256 fingerprint, shortened, and its trust domain) and how long it took."""

    instances: list[str]
    ca_before: str
    ca_after: str
    seconds: float


RELOADED_EVENTS = ("tls credentials reloaded", "mutual tls")
NOT_LOADED_EVENT = "tls files changed but do not load, keeping the loaded ones"


def _loaded(log: Path, offset: int, digest: str) -> tuple[bool, str | None]:
    """Whether the log, from ``offset``, says the process uses the files of ``digest``; and
    the error when it says they do not load."""
    try:
        with log.open("rb") as f:
            if f.seek(0, os.SEEK_END) >= offset:
                f.seek(offset)
            else:  # a new log
                f.seek(0)
            data = f.read()
    except OSError:
        return False, None
    for line in data.splitlines():
        if not line.startswith(b"{") or digest.encode() not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("files") != digest:
            continue
        if record.get("event") in RELOADED_EVENTS:
            return True, None
        if record.get("event") == NOT_LOADED_EVENT:
            return False, str(record.get("error"))
    return False, None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _elapsed(started: float) -> float:
    return round(time.monotonic() - started, 1)


def _ca_text(ca: pki.Ca) -> str:
    return f"{pki.fingerprint(ca.pem)[:16]} (spiffe://{ca.trust_domain})"
