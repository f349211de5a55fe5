"""The lab's operations: up, down, scale, kill, status and traffic.

Every operation loads the state file, changes the host step by step (saving the state after
each step), and waits for what it started to report ready. ``up`` over a lab that exists, in
whatever condition, takes it down first; ``down`` removes every namespace the lab made (and
every process in them, so the LBs' own BIRDs too) whether or not the state file is there or
readable.

With ``bgp`` and ``static-bfd`` routing the gateway routers (``gw``, and ``gw-2`` with two)
run BIRD (instances ``bird-gw``, ``bird-gw-2``), started and stopped by the lab like its
other processes; the lab never edits their routes, it waits until their kernel tables route
the VIPs over the LBs it expects and reads them back for ``status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from meridio.lab import plan, system
from meridio.lab.plan import LabSpec
from meridio.lab.state import LabState, Process, load, save, state_path
from meridio.lab.system import LabError

DEFAULT_STATE_DIR = Path("/run/meridio-lab")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
GATEWAY_TIMEOUT = 30.0
"""How long ``up`` and ``scale`` wait for the gateways to route the VIPs over the LBs (a BGP
session takes about 5 s to come up)."""
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


def resolve_external(choice: str) -> str:
    """``auto``: macvlan where the kernel has it, else a plain veth."""
    if choice != "auto":
        return choice
    return "macvlan" if system.link_kind_supported("macvlan", mode="bridge") is None else "veth"


# --- traffic -----------------------------------------------------------------------------------


@dataclass
class TrafficRun:
    """A traffic client running in the gateway namespace (``-o json``)."""

    proc: subprocess.Popen[str]
    argv: list[str]

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for the end of the run; its report."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
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
        lbs, nodes = list(state.lb_indexes), list(state.node_indexes)
        self._start_control(state)
        for i in lbs:
            self._start_lb(state, i)
        for i in nodes:
            args = plan.proxy_args(self.state_dir, spec, i)
            self._start(state, f"proxy-{i}", "proxy", plan.node_host(i), args)
        names = [plan.lb_host(i) for i in lbs] + [f"proxy-{i}" for i in nodes]
        self._wait_ready(state, names, "load balancers and proxies")
        if not spec.dynamic:
            self._route_gateway(state, lbs)
        self._start_targets(state, state.target_nodes)
        self._wait_tables(state)
        if spec.dynamic:
            self._wait_gateway_routes(state, lbs, "gateways route the VIPs over the LBs")
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
        nodes = list(range(1, spec.proxies + 1))
        placement = plan.place_targets({}, range(1, spec.targets + 1), nodes)
        lbs = list(range(1, spec.lbs + 1))
        hosts = [plan.lb_host(i) for i in lbs] + [plan.node_host(i) for i in nodes]
        hosts += [plan.target_host(i) for i in placement]

        step = self.reporter.step("namespaces and links", 1)
        self._make_network(state, hosts, first=True)
        state.lb_indexes, state.node_indexes = lbs, nodes
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
            if host.startswith("lb-"):
                self._attach_external(int(host.split("-")[1]))

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
        if host.startswith("lb-"):
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

    def _routable_targets(self, state: LabState, lb: int) -> int:
        """How many targets LB ``lb`` has a ``fwmark`` rule for in every family of the lab (it
        installs one only once it can route to the target, i.e. once the target's proxy is
        connected to it)."""
        netns = self.netns(plan.lb_host(lb))
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

    def _attach_external(self, lb: int) -> None:
        """The LB's ``eth1``: a port of the gateway's bridge (the LB makes ``ext0`` on it, or
        uses it as it is)."""
        port = plan.external_port_name(lb)
        system.run("ip", "-n", self.netns("gw"), "link", "del", port, check=False)  # see above
        system.ip_batch(
            [
                f"link add {port} type veth peer name eth1 netns {self.netns(plan.lb_host(lb))}",
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
        proc = system.spawn(
            name, role, self.netns(host), [*program, *args], plan.log_path(self.state_dir, name)
        )
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

    def _start_lb(self, state: LabState, index: int) -> None:
        args = plan.lb_args(self.state_dir, state.spec, index)
        self._start(state, plan.lb_host(index), "lb", plan.lb_host(index), args)

    def _start_targets(self, state: LabState, placement: dict[int, int]) -> None:
        names = []
        for index, node in sorted(placement.items()):
            host = plan.target_host(index)
            args = plan.target_args(self.state_dir, state.spec, index, node)
            self._start(state, host, "target", host, args)
            self._start(state, f"server-{index}", "server", host, plan.server_args(index))
            names += [host, f"server-{index}"]
        if names:
            self._wait_ready(state, names, "targets and their traffic servers")

    def _wait_ready(self, state: LabState, names: Sequence[str], title: str) -> None:
        system.run_async(self._await_ready(state, names, title))

    async def _await_ready(self, state: LabState, names: Sequence[str], title: str) -> None:
        step = self.reporter.step(title, len(names))
        pending = list(names)
        deadline = time.monotonic() + READY_TIMEOUT
        while pending:
            for name in pending:
                proc = state.processes[name]
                if not system.alive(proc):
                    raise LabError(
                        f"{name} exited before it was ready; the end of {proc.log}:\n"
                        + system.tail(proc.log)
                    )
            answers = await asyncio.gather(*(self._ready_async(state, n) for n in pending))
            pending = [n for n, ok in zip(pending, answers, strict=True) if not ok]
            step.update(len(names) - len(pending), ", ".join(pending[:4]))
            if not pending:
                break
            if time.monotonic() > deadline:
                detail = "\n".join(
                    f"--- {n}: {state.processes[n].log}\n{system.tail(state.processes[n].log)}"
                    for n in pending
                )
                raise LabError(
                    f"not ready within {READY_TIMEOUT:g}s: {', '.join(pending)}\n{detail}"
                )
            await asyncio.sleep(0.1)
        step.finish()

    async def _ready_async(self, state: LabState, name: str) -> bool:
        proc = state.processes[name]
        if proc.role == "server":
            return system.announced(proc.log, "serving on")
        if proc.role == "gateway":
            return system.bird_ready(plan.bird_socket(self.state_dir, name))
        return await system.readiness(plan.health_socket(self.state_dir, name))

    def _wait_tables(self, state: LabState, title: str = "load balancer tables") -> None:
        """Wait until every LB's table holds exactly the running targets (by number: their
        addresses come from the IPAM)."""
        system.run_async(self._await_tables(state, title))

    async def _await_tables(self, state: LabState, title: str) -> None:
        lbs = list(state.lb_indexes)
        want = len(self._running_targets(state))
        step = self.reporter.step(f"{title} ({want} targets)", len(lbs))
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            shows = await asyncio.gather(
                *(system.lb_show(plan.lb_socket(self.state_dir, plan.lb_host(i))) for i in lbs)
            )
            counts = [len(system.lb_target_ips(show)) for show in shows]
            routable = [self._routable_targets(state, i) for i in lbs]
            done = sum(1 for c, r in zip(counts, routable, strict=True) if c == r == want)
            step.update(
                done,
                " ".join(f"lb-{i}:{c}/{r}" for i, c, r in zip(lbs, counts, routable, strict=True)),
            )
            if done == len(lbs):
                break
            if time.monotonic() > deadline:
                raise LabError(
                    f"the LBs do not route to {want} targets within {READY_TIMEOUT:g}s "
                    "(in the table / routable): "
                    + ", ".join(
                        f"lb-{i} {c}/{r}" for i, c, r in zip(lbs, counts, routable, strict=True)
                    )
                )
            await asyncio.sleep(0.1)
        step.finish()

    def _route_gateway(self, state: LabState, lbs: Iterable[int]) -> None:
        """``static`` routing: make the gateway routers route the VIPs over exactly ``lbs``."""
        chosen = sorted(set(lbs))
        for router in state.spec.routers:
            netns = self.netns(plan.gateway_host(router))
            for family in state.spec.families:
                args = plan.gateway_route(chosen, family)
                system.run("ip", "-n", netns, *args, check=bool(chosen))
        state.gateway_lbs = chosen
        self._save(state)

    # -- the gateway routers

    def _gateway_running(self, state: LabState, router: int) -> bool:
        proc = state.processes.get(plan.gateway_instance(router))
        return proc is not None and system.alive(proc)

    def _route_lbs(self, state: LabState, router: int) -> dict[int, tuple[list[int], list[str]]]:
        """Per family, the LBs gateway router ``router``'s kernel routes the VIP over, and the
        next hops that are no LB's."""
        netns = self.netns(plan.gateway_host(router))
        return {
            family: plan.vip_next_hop_lbs(
                system.route_next_hops(netns, family, plan.vip_cidr(family))
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
        (default: the running LBs)."""
        state = self.load()
        want = self._running_lbs(state) if lbs is None else lbs
        self._wait_gateway_routes(state, want, "gateways route the VIPs", timeout)

    def _wait_gateway_routes(
        self,
        state: LabState,
        lbs: Iterable[int],
        title: str,
        timeout: float = GATEWAY_TIMEOUT,
    ) -> None:
        want = sorted(set(lbs))
        routers = [r for r in state.spec.routers if self._gateway_running(state, r)]
        if state.spec.dynamic and not routers:
            raise LabError("no gateway router's BIRD is running")
        if not state.spec.dynamic:
            routers = list(state.spec.routers)
        checks = [(r, f) for r in routers for f in state.spec.families]
        names = ", ".join(plan.lb_host(i) for i in want) or "no LB"
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
            seen = {r: self._route_lbs(state, r) for r in routers}
            pending = [(r, f) for r, f in checks if seen[r][f][0] != want or seen[r][f][1]]
            step.update(
                len(checks) - len(pending),
                " ".join(
                    f"{plan.gateway_host(r)}/v{f}:"
                    + (",".join(plan.lb_host(i) for i in seen[r][f][0]) or "-")
                    for r, f in pending[:4]
                ),
            )
            if not pending:
                break
            if time.monotonic() > deadline:
                detail = "; ".join(
                    f"{plan.gateway_host(r)} routes {plan.vip_cidr(f)} over "
                    + (", ".join(map(plan.lb_host, seen[r][f][0])) or "nothing")
                    for r, f in pending
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
        if 1 in seen:
            state.gateway_lbs = sorted({i for lbs_, _ in seen[1].values() for i in lbs_})
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
                    index = plan.lb_of_external_address(b.address)
                    if b.state == "Up" or index in state.lb_indexes:
                        sessions.append(
                            self._session(b.address, "bfd", b.state, b.state == "Up", b.since)
                        )
        except system.BirdError as exc:
            return {"error": str(exc)}
        have = {s["neighbor"] for s in sessions}
        for index in state.lb_indexes:
            for family in state.spec.families:
                address = plan.external_address(family, index).split("/")[0]
                if address not in have:
                    sessions.append(self._session(address, None, "none", False, None))
        sessions.sort(key=lambda s: (s["index"] or 999, s["family"], s["neighbor"]))
        for s in sessions:
            del s["index"]
        return {"sessions": sessions}

    @staticmethod
    def _session(
        neighbor: str, protocol: str | None, state: str, established: bool, since: str | None
    ) -> dict[str, Any]:
        index = plan.lb_of_external_address(neighbor)
        return {
            "lb": plan.lb_host(index) if index is not None else None,
            "index": index,
            "neighbor": neighbor,
            "family": 6 if ":" in neighbor else 4,
            "protocol": protocol,
            "state": state,
            "established": established,
            "since": since,
        }

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

    def _running_lbs(self, state: LabState) -> list[int]:
        return [
            i
            for i in state.lb_indexes
            if plan.lb_host(i) in state.processes and system.alive(state.processes[plan.lb_host(i)])
        ]

    # -- down

    def down(self) -> list[str]:
        """Stop every process (targets first, the NSP and IPAM last) and remove every namespace
        of the lab; the names of the namespaces removed."""
        state = load(self.state_dir)
        procs = list(state.processes.values()) if state else []
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
        self._remove_files(state)
        return sorted(names & present)

    def _remove_files(self, state: LabState | None) -> None:
        """The state file and the instances' directories (nothing else in the state dir)."""
        names = set(state.processes) if state else set()
        for path in self.state_dir.glob("*") if self.state_dir.exists() else []:
            if path.is_dir() and (path.name in names or _instance_dir(path.name)):
                shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            state_path(self.state_dir).unlink()
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
        running = self._running_lbs(state)
        dead = [i for i in state.lb_indexes if i not in running]
        change = plan.scale_plan(running, dead, want)
        state.lbs = want
        self._save(state)
        if change.empty:
            return
        keep = [i for i in running if i not in change.remove]
        dynamic = state.spec.dynamic
        if change.remove or change.clear:
            if not dynamic:
                # the gateway first: no new packet goes to a leaving LB, then it stops
                self._route_gateway(state, keep)
            # bgp, static-bfd: on SIGTERM the LB withdraws from the gateways itself first
            step = self.reporter.step("load balancers leaving", len(change.remove))
            system.stop([state.processes[plan.lb_host(i)] for i in change.remove], STOP_TIMEOUT)
            for done, index in enumerate([*change.remove, *change.clear], 1):
                host = plan.lb_host(index)
                system.delete_netns(self.netns(host))
                if self.netns(host) in state.namespaces:
                    state.namespaces.remove(self.netns(host))
                state.processes.pop(host, None)
                state.lb_indexes.remove(index)
                self._save(state)
                step.update(done)
            step.finish()
            if dynamic and not change.add:
                self._wait_gateway_routes(state, keep, "gateways route the VIPs")
        if change.add:
            step = self.reporter.step("namespaces and links", 1)
            self._make_network(state, [plan.lb_host(i) for i in change.add], first=False)
            state.lb_indexes = sorted({*state.lb_indexes, *change.add})
            self._save(state)
            step.update(1)
            step.finish()
            for index in change.add:
                self._start_lb(state, index)
            self._wait_ready(state, [plan.lb_host(i) for i in change.add], "load balancers")
            self._wait_tables(state)
            if dynamic:
                # the LB announces itself once it is ready; wait until the gateways route to it
                self._wait_gateway_routes(state, [*keep, *change.add], "gateways route the VIPs")
            else:
                # ready, with every target in its table: now the gateway may send it traffic
                self._route_gateway(state, [*keep, *change.add])

    # -- kill

    def kill(self, name: str, *, netns: bool = False) -> None:
        """Kill an instance at once (SIGKILL).

        - ``target-N``: as a pod dies: its processes get SIGKILL and its network namespace
          (so its conduit link) goes.
        - ``lb-N``: the LB process crashes: only it gets SIGKILL, its namespace stays with
          whatever else runs there (an LB's BIRD must die with it, or it keeps attracting
          traffic); with ``netns`` the namespace goes too, with everything in it (the pod is
          gone: its link to the gateways goes down).
        - ``gateway-N`` (``gateway``: ``gw``'s, ``gateway-2``: ``gw-2``'s): the gateway
          router's BIRD gets SIGKILL (its kernel routes stay, as BIRD leaves them); with
          ``netns`` (``gw-2`` only) the router's namespace goes.

        ``scale`` replaces a killed target or LB.
        """
        state = self.load()
        router = plan.gateway_router_from_name(name)
        kind, _, number = name.partition("-")
        if router is not None:
            self._kill_gateway(state, router, netns=netns)
        elif kind == "lb" and number.isdigit() and int(number) in state.lb_indexes:
            self._kill_lb(state, int(number), netns=netns)
        elif kind == "target" and number.isdigit() and int(number) in state.target_nodes:
            self._kill_target(state, int(number))
        else:
            choices = [
                *self._target_names(state),
                *(plan.lb_host(i) for i in state.lb_indexes),
                *(f"gateway-{r}" for r in state.spec.routers if state.spec.dynamic),
            ]
            raise LabError(f"nothing named {name!r} to kill; there are {', '.join(choices)}")

    def _kill_target(self, state: LabState, index: int) -> None:
        name = plan.target_host(index)
        for proc_name in (name, f"server-{index}"):
            proc = state.processes.get(proc_name)
            if proc is not None:
                system.send_signal(proc, signal.SIGKILL)
        self._delete_netns(state, name)

    def _kill_lb(self, state: LabState, index: int, *, netns: bool) -> None:
        proc = state.processes.get(plan.lb_host(index))
        if proc is not None:
            system.send_signal(proc, signal.SIGKILL)
        if netns:
            self._delete_netns(state, plan.lb_host(index))

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

    # -- status

    def status(self) -> dict[str, Any]:
        state = self.load()
        spec = state.spec
        return system.run_async(self._status(state, spec))

    async def _status(self, state: LabState, spec: LabSpec) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        for name, proc in sorted(state.processes.items(), key=lambda kv: _order(kv[1])):
            running = system.alive(proc)
            row: dict[str, Any] = {
                "name": name,
                "role": proc.role,
                "namespace": proc.netns,
                "pid": proc.pid if running else None,
                "running": running,
                "ready": False,
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
            seen = self._route_lbs(state, router) if present else {}
            routes = {
                plan.vip_cidr(f): [plan.lb_host(i) for i in lbs] + others
                for f, (lbs, others) in seen.items()
            }
            entry: dict[str, Any] = {
                "host": host,
                "namespace": self.netns(host),
                "addresses": [plan.gateway_router_cidr(f, router) for f in state.spec.families],
                "bird": name,
                "running": bool(name and self._gateway_running(state, router)),
                "routes": routes,
                "routes_over": [
                    plan.lb_host(i) for i in sorted({i for lbs, _ in seen.values() for i in lbs})
                ],
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
        if proc.role == "lb":
            return [plan.primary_address("lb", index)] + [
                plan.external_address(f, index) for f in state.spec.families
            ]
        if proc.role == "proxy":
            return [plan.primary_address("node", index)]
        if proc.role == "target":
            return [plan.primary_address("target", index)]
        if proc.role == "gateway":
            router = plan.gateway_router_from_name(proc.name) or 1
            return [plan.gateway_router_cidr(f, router) for f in state.spec.families]
        return [plan.hostport(plan.VIPS[f], plan.PORT) for f in state.spec.families]

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
    ) -> list[str]:
        """The traffic client's (or ``command``'s: ``probe``) command line, run in the gateway
        namespace against the VIPs (of ``families``, default all of the lab's) unless
        ``args`` name addresses."""
        state = self.load()
        fams = sorted(set(families) if families is not None else state.spec.families)
        for family in fams:
            if family not in state.spec.families:
                raise LabError(f"the lab has no IPv{family} (it is {state.ip_family})")
        addresses: list[str] = []
        if not any(a in ("-a", "--address") or a.startswith("--address=") for a in args):
            for endpoint in plan.vip_endpoints(fams):
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
        self, args: Sequence[str], families: Iterable[int] | None = None, command: str = "client"
    ) -> TrafficRun:
        """Start a traffic client (or ``probe``; JSON report) in the background."""
        argv = self.traffic_argv(
            ["--output", "json", "--progress", "none", *args], families, command
        )
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=system.clean_environment(),
        )
        return TrafficRun(proc, argv)

    def traffic(self, args: Sequence[str], families: Iterable[int] | None = None) -> dict[str, Any]:
        """Run a traffic client to its end; its report."""
        return self.start_traffic(args, families).result()


def _order(proc: Process) -> tuple[int, int, str]:
    kind = plan.ROLE_ORDER.index(proc.role) if proc.role in plan.ROLE_ORDER else 99
    return (kind, _index(proc.name), proc.name)


def _index(name: str) -> int:
    number = name.rpartition("-")[2]
    return int(number) if number.isdigit() else 0


def _instance_dir(name: str) -> bool:
    kind, _, number = name.partition("-")
    if name in ("nsp", "ipam") or re.fullmatch(r"bird-gw(-\d+)?", name):
        return True
    return kind in ("lb", "proxy", "target", "server") and number.isdigit()


def _gateway_host(host: str) -> bool:
    """``gw`` or another gateway router (``gw-N``)."""
    return re.fullmatch(r"gw(-\d+)?", host) is not None
