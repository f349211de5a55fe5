"""The lab's operations: up, down, scale, kill, status and traffic.

Every operation loads the state file, changes the host step by step (saving the state after
each step), and waits for what it started to report ready. ``up`` over a lab that exists, in
whatever condition, takes it down first; ``down`` removes every namespace the lab made (and
every process in them) whether or not the state file is there or readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
        if spec.prefix != self.prefix:
            raise LabError(f"the lab's prefix is {self.prefix!r}, not {spec.prefix!r}")
        spec.check()
        self._check_kernel(spec)
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

        self._start_control(state)
        for i in lbs:
            self._start_lb(state, i)
        for i in nodes:
            args = plan.proxy_args(self.state_dir, spec, i)
            self._start(state, f"proxy-{i}", "proxy", plan.node_host(i), args)
        names = [plan.lb_host(i) for i in lbs] + [f"proxy-{i}" for i in nodes]
        self._wait_ready(state, names, "load balancers and proxies")
        self._route_gateway(state, lbs)
        self._start_targets(state, placement)
        self._wait_tables(state)
        state.phase = "up"
        self._save(state)
        return state

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
        made = [*plan.FIXED_HOSTS, *hosts] if first else list(hosts)
        names = [self.netns(h) for h in made]
        state.namespaces += [n for n in names if n not in state.namespaces]
        self._save(state)
        system.ip_batch([f"netns add {n}" for n in names])
        primary = [h for h in made if h not in ("gw", "pri")]
        lines = ["link set lo up", "link add pri type bridge", "link set pri up"] if first else []
        for host in primary:
            port = plan.port_name(host)
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
            system.ip_batch(
                ["link set lo up", f"addr add {address} dev eth0", "link set eth0 up"],
                self.netns(host),
            )
            self._sysctls(host)
        for host in hosts:
            if host.startswith("lb-"):
                self._attach_external(int(host.split("-")[1]))

    def _sysctls(self, host: str) -> None:
        values = {
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        if host.startswith("lb-"):
            values |= {
                "net.ipv4.ip_forward": "1",
                "net.ipv6.conf.all.forwarding": "1",
                "net.netfilter.nf_conntrack_tcp_loose": "1",
            }
        if host == "gw":
            values |= {
                "net.ipv4.fib_multipath_hash_policy": "1",
                "net.ipv6.fib_multipath_hash_policy": "1",
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

    def _gateway_interface(self, state: LabState) -> str:
        return f"ext.{plan.VLAN_ID}" if state.external == "vlan" else "ext"

    def _make_gateway(self, state: LabState) -> None:
        lines = ["link set lo up", "link add ext type bridge", "link set ext up"]
        iface = self._gateway_interface(state)
        if state.external == "vlan":
            lines += [f"link add link ext name {iface} type vlan id {plan.VLAN_ID}"]
        for family in state.spec.families:
            lines.append(
                f"addr add {plan.external_address(family, 0)} dev {iface}"
                + (" nodad" if family == 6 else "")
            )
        lines.append(f"link set {iface} up")
        system.ip_batch(lines, self.netns("gw"))
        self._sysctls("gw")

    def _attach_external(self, lb: int) -> None:
        """The LB's ``eth1``: a port of the gateway's bridge (the LB makes ``ext0`` on it, or
        uses it as it is)."""
        port = plan.external_port_name(lb)
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
        self, state: LabState, name: str, role: str, host: str, args: Sequence[str]
    ) -> Process:
        program = traffic_tool() if role == "server" else meridiod()
        proc = system.spawn(
            name, role, self.netns(host), [*program, *args], plan.log_path(self.state_dir, name)
        )
        state.processes[name] = proc
        self._save(state)
        return proc

    def _start_control(self, state: LabState) -> None:
        config = plan.nsp_config_path(self.state_dir)
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            yaml.safe_dump(plan.nsp_configuration(state.spec.families), sort_keys=False)
        )
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
        """Make the gateway route the VIPs over exactly ``lbs``."""
        chosen = sorted(set(lbs))
        for family in state.spec.families:
            args = plan.gateway_route(chosen, family)
            system.run("ip", "-n", self.netns("gw"), *args, check=bool(chosen))
        state.gateway_lbs = chosen
        self._save(state)

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
        # in stages, so that each role drains while what it talks to is still there
        for stage in (("target", "server"), ("lb", "proxy"), ("nsp", "ipam")):
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
        if change.remove or change.clear:
            # the gateway first: no new packet goes to a leaving LB, then it stops gracefully
            self._route_gateway(state, keep)
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
            # ready, with every target in its table: now the gateway may send it traffic
            self._route_gateway(state, [*keep, *change.add])

    # -- kill

    def kill(self, name: str) -> None:
        """A target dies at once, as a pod does: its processes get SIGKILL and its network
        namespace (so its conduit link) goes. ``scale`` replaces it."""
        state = self.load()
        kind, _, number = name.partition("-")
        if kind != "target" or not number.isdigit() or int(number) not in state.target_nodes:
            raise LabError(f"no target {name!r}; targets: {', '.join(self._target_names(state))}")
        index = int(number)
        for proc_name in (name, f"server-{index}"):
            proc = state.processes.get(proc_name)
            if proc is not None:
                system.send_signal(proc, signal.SIGKILL)
        netns = self.netns(name)
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
            elif running:
                row["ready"] = await system.readiness(plan.health_socket(self.state_dir, name))
            if running and proc.role == "lb":
                show = await system.lb_show(plan.lb_socket(self.state_dir, name))
                row["targets"] = len(system.lb_target_ips(show))
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
            "vips": plan.vip_endpoints(spec.families),
            "gateway": {
                "namespace": self.netns("gw"),
                "addresses": [plan.external_address(f, 0) for f in spec.families],
                "routes_over": [plan.lb_host(i) for i in state.gateway_lbs],
            },
            "instances": rows,
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
        return [plan.hostport(plan.VIPS[f], plan.PORT) for f in state.spec.families]

    def log_file(self, name: str) -> Path:
        state = self.load()
        proc = state.processes.get(name)
        if proc is None:
            raise LabError(f"no instance {name!r}; instances: {', '.join(sorted(state.processes))}")
        return Path(proc.log)

    # -- traffic

    def traffic_argv(self, args: Sequence[str], families: Iterable[int] | None = None) -> list[str]:
        """The traffic client's command line, run in the gateway namespace against the VIPs
        (of ``families``, default all of the lab's) unless ``args`` name addresses."""
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
            "client",
            *addresses,
            *args,
        ]

    def start_traffic(
        self, args: Sequence[str], families: Iterable[int] | None = None
    ) -> TrafficRun:
        """Start a traffic client (JSON report) in the background."""
        argv = self.traffic_argv(["--output", "json", "--progress", "none", *args], families)
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
    if name in ("nsp", "ipam"):
        return True
    return kind in ("lb", "proxy", "target", "server") and number.isdigit()
