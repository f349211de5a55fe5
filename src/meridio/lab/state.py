"""The lab's state file: what was asked, what was made and which process runs where.

Written (atomically: a temporary file renamed over the old one) after every step, so that
``lab status``, ``scale`` and ``down`` work from a new process, and a lab whose building was
interrupted can still be taken down.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from meridio.lab.plan import CONDUIT_A, ConduitPlan, LabSpec

STATE_FILE = "lab.json"
VERSION = 1


class Process(msgspec.Struct, kw_only=True):
    """One started process (a role daemon or a traffic server)."""

    name: str
    role: str
    netns: str
    pid: int
    start_time: int
    """Its start time in clock ticks since boot (``/proc/<pid>/stat``), so a recycled pid is
    never taken for it."""
    log: str
    argv: list[str]
    """The program and its arguments (without the supervisor's)."""
    supervised: bool = False
    """It runs under a supervisor (``meridio.lab.supervise``): ``pid`` and ``start_time`` are
    the supervisor's, which outlives the program's crashes (a pod, whose container is
    restarted); the program's own pid is in the supervisor's status file."""
    status_file: str = ""
    """The supervisor's status file (``supervised`` only)."""


class LabState(msgspec.Struct, kw_only=True):
    version: int = VERSION
    lbs: int = 2
    proxies: int = 2
    targets_wanted: int = 4
    ip_family: str = "dualstack"
    mechanism: str = "veth"
    lb_mode: str = "first-packet"
    external: str = "macvlan"
    routing: str = "static"
    """``bgp``, ``static-bfd`` or ``static``. A state file without it is of a lab from before
    the gateways ran BIRD, so ``static``; ``from_spec`` always sets it."""
    gateways: int = 1
    """Gateway routers (1: ``gw``; 2: ``gw`` and ``gw-2``)."""
    prefix: str = "mlab-"
    streams: int = 1
    """Streams of conduit-a (1: ``stream-a``; 2: and ``stream-b``)."""
    conduits: int = 1
    """Conduits (1: ``conduit-a``; 2: and ``conduit-b``, with LBs ``lbb-N`` and proxies
    ``proxyb-N`` of its own)."""
    restart: bool = True
    """Whether the supervisors start a role's process again when it dies (``lab up
    --no-restart``: they do not, to study a failure)."""
    phase: str = "building"
    """``building`` until ``up`` has finished, then ``up``."""
    namespaces: list[str] = msgspec.field(default_factory=list)
    lb_indexes: list[int] = msgspec.field(default_factory=list)
    """LBs made (in the gateway's route once ready: ``gateway_lbs``)."""
    gateway_lbs: list[int] = msgspec.field(default_factory=list)
    """The LBs the gateway ``gw`` routes the VIPs over: set by the lab itself with ``static``
    routing; with ``bgp`` and ``static-bfd`` what the lab last saw in ``gw``'s kernel (``lab
    status`` reads the kernel)."""
    lbb_indexes: list[int] = msgspec.field(default_factory=list)
    """conduit-b's LBs made (``lbb-N``; with two conduits)."""
    gateway_lbbs: list[int] = msgspec.field(default_factory=list)
    """What ``gateway_lbs`` is for conduit-a's VIPs, for conduit-b's (``lbb-N``)."""
    node_indexes: list[int] = msgspec.field(default_factory=list)
    """Nodes (a proxy ``proxy-N`` each, and ``proxyb-N`` with two conduits)."""
    targets: dict[str, int] = msgspec.field(default_factory=dict)
    """Target index (as text: JSON keys) -> node index."""
    processes: dict[str, Process] = msgspec.field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: LabSpec) -> LabState:
        return cls(
            lbs=spec.lbs,
            proxies=spec.proxies,
            targets_wanted=spec.targets,
            ip_family=spec.ip_family,
            mechanism=spec.mechanism,
            lb_mode=spec.lb_mode,
            external=spec.external,
            routing=spec.routing,
            gateways=spec.gateways,
            prefix=spec.prefix,
            streams=spec.streams,
            conduits=spec.conduits,
            restart=spec.restart,
        )

    @property
    def spec(self) -> LabSpec:
        return LabSpec(
            lbs=self.lbs,
            proxies=self.proxies,
            targets=self.targets_wanted,
            ip_family=self.ip_family,
            mechanism=self.mechanism,
            lb_mode=self.lb_mode,
            external=self.external,
            routing=self.routing,
            gateways=self.gateways,
            prefix=self.prefix,
            streams=self.streams,
            conduits=self.conduits,
            restart=self.restart,
        )

    def lbs_of(self, conduit: ConduitPlan) -> list[int]:
        """The LBs made for ``conduit`` (the list itself: changing it changes the state)."""
        return self.lb_indexes if conduit is CONDUIT_A else self.lbb_indexes

    def set_lbs_of(self, conduit: ConduitPlan, indexes: list[int]) -> None:
        if conduit is CONDUIT_A:
            self.lb_indexes = indexes
        else:
            self.lbb_indexes = indexes

    def routed_lbs_of(self, conduit: ConduitPlan) -> list[int]:
        """``gateway_lbs`` of ``conduit``."""
        return self.gateway_lbs if conduit is CONDUIT_A else self.gateway_lbbs

    def set_routed_lbs_of(self, conduit: ConduitPlan, indexes: list[int]) -> None:
        if conduit is CONDUIT_A:
            self.gateway_lbs = indexes
        else:
            self.gateway_lbbs = indexes

    @property
    def target_nodes(self) -> dict[int, int]:
        return {int(k): v for k, v in self.targets.items()}


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def load(state_dir: Path) -> LabState | None:
    """The saved state, or None when there is none (or it cannot be read: a lab so broken is
    taken down by the namespaces' names alone)."""
    try:
        data = state_path(state_dir).read_bytes()
    except FileNotFoundError:
        return None
    try:
        state = msgspec.json.decode(data, type=LabState)
    except msgspec.DecodeError:
        return None
    return state if state.version == VERSION else None


def save(state_dir: Path, state: LabState) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_path(state_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(state), indent=2) + b"\n")
    os.replace(tmp, path)
