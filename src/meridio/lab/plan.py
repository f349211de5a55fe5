"""What the lab is made of, decided without touching the host: names, addresses, placement,
scaling, the gateway's routes, the NSP's configuration and every daemon's command line.

The lab, in network namespaces named ``<prefix><host>`` (prefix ``mlab-``)::

  gw       the external host: gateway and traffic client. Bridge ``ext`` with 192.0.2.1/24 and
           fd00:e::1/64; the VIPs are routed over the LBs' external addresses (ECMP, L4 hash).
  lb-N     ``meridiod --role=lb``. ``eth1`` is a port of the gateway's bridge; the LB makes its
           external interface ``ext0`` on it (macvlan, or VLAN 100) with 192.0.2.(10+N)/24 and
           fd00:e::(10+N)/64, or uses ``eth1`` itself (external kind ``veth``).
  node-N   ``meridiod --role=proxy`` (the node's proxy), instance ``proxy-N``.
  target-N ``meridiod --role=target`` (the sidecar) beside the traffic server, which answers on
           the VIPs, port 5000, naming itself ``target-N``.
  nsp      ``meridiod --role=nsp``, 198.19.0.2:7778.
  ipam     ``meridiod --role=ipam``, 198.19.0.3:7777.
  pri      the primary network: bridge ``pri``, 198.19.0.0/16; every namespace above but ``gw``
           has ``eth0`` on it (LB N: 198.19.1.N, node N: 198.19.2.N, target N: 198.19.3.N).

Conduit addresses come from the IPAM (198.18.0.0/16 and fd00:10::/48); the VIPs are
203.0.113.1/32 and 2001:db8::1/128. Every address is in the ranges the project may use.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "mlab-"
TRENCH = "trench-a"
CONDUIT = "conduit-a"
STREAM = "stream-a"
FLOW = "flow-a"
MAX_TARGETS = 64
PORT = 5000
VIPS = {4: "203.0.113.1", 6: "2001:db8::1"}
PRIMARY = ipaddress.IPv4Network("198.19.0.0/16")
EXTERNAL: dict[int, ipaddress.IPv4Network | ipaddress.IPv6Network] = {
    4: ipaddress.IPv4Network("192.0.2.0/24"),
    6: ipaddress.IPv6Network("fd00:e::/64"),
}
IPAM_PREFIXES = {4: "198.18.0.0/16", 6: "fd00:10::/48"}
NSP_PORT = 7778
IPAM_PORT = 7777
LB_CONNECT_PORT = 7779
PROXY_CONNECT_PORT = 7781
VLAN_ID = 100
FAMILIES = {"dualstack": (4, 6), "ipv4": (4,), "ipv6": (6,)}
MECHANISMS = ("veth", "vxlan")
LB_MODES = ("first-packet", "kernel", "nfqueue")
EXTERNAL_KINDS = ("macvlan", "veth", "vlan")
LIMITS = {"lbs": (1, 16), "proxies": (1, 16), "targets": (0, MAX_TARGETS)}
FIXED_HOSTS = ("gw", "pri", "nsp", "ipam")
# Role daemons and what runs beside them, in the order they start (and the reverse of stop).
ROLE_ORDER = ("nsp", "ipam", "lb", "proxy", "target", "server")


class PlanError(ValueError):
    """A lab that cannot be built as asked; the message says what to change."""


# --- the lab's shape ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LabSpec:
    """What ``lab up`` was asked for."""

    lbs: int = 2
    proxies: int = 2
    targets: int = 4
    ip_family: str = "dualstack"
    mechanism: str = "veth"
    lb_mode: str = "first-packet"
    external: str = "macvlan"
    """How each LB meets the gateway: ``macvlan`` or ``vlan`` made by the LB on ``eth1``, or
    ``veth`` (``eth1`` itself is the external interface)."""
    prefix: str = PREFIX

    @property
    def families(self) -> tuple[int, ...]:
        return FAMILIES[self.ip_family]

    def check(self) -> None:
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise PlanError(f"--{name} {value}: must be within {low}..{high}")
        choices = {
            "ip-family": (self.ip_family, tuple(FAMILIES)),
            "mechanism": (self.mechanism, MECHANISMS),
            "lb-mode": (self.lb_mode, LB_MODES),
            "external": (self.external, EXTERNAL_KINDS),
        }
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise PlanError(f"--{option} {value!r}: one of {', '.join(allowed)}")
        check_prefix(self.prefix)


def check_prefix(prefix: str) -> None:
    if not re.fullmatch(r"mlab-([a-z0-9]+-)?", prefix) or len(prefix) > 24:
        raise PlanError(
            f"namespace prefix {prefix!r}: must be 'mlab-' or 'mlab-<letters and digits>-'"
        )


# --- names -------------------------------------------------------------------------------------


def lb_host(index: int) -> str:
    return f"lb-{index}"


def node_host(index: int) -> str:
    return f"node-{index}"


def target_host(index: int) -> str:
    return f"target-{index}"


def netns_name(prefix: str, host: str) -> str:
    return f"{prefix}{host}"


def lab_netns_pattern(prefix: str) -> re.Pattern[str]:
    """Matches exactly the namespace names a lab with ``prefix`` makes (so that the default
    lab never takes the namespaces of a lab with a longer prefix for its own)."""
    hosts = "|".join(FIXED_HOSTS)
    return re.compile(rf"{re.escape(prefix)}(?:{hosts}|(?:lb|node|target)-\d+)")


def is_lab_netns(prefix: str, name: str) -> bool:
    return lab_netns_pattern(prefix).fullmatch(name) is not None


def port_name(host: str) -> str:
    """The primary bridge's port toward ``host`` (at most 15 characters)."""
    return f"p-{host}"[:15]


def external_port_name(lb_index: int) -> str:
    """The gateway bridge's port toward LB ``lb_index``."""
    return f"x-lb-{lb_index}"


def external_interface(external: str) -> str:
    """The LB's interface toward the gateway: the one it makes, or ``eth1`` itself."""
    return "eth1" if external == "veth" else "ext0"


# --- addresses ---------------------------------------------------------------------------------

_PRIMARY_HOSTS = {"nsp": (0, 2), "ipam": (0, 3), "lb": (1, None), "node": (2, None)}


def primary_address(kind: str, index: int = 0) -> str:
    """The primary-network address of ``nsp``, ``ipam``, or ``lb``/``node``/``target`` N."""
    if kind == "target":
        third, fourth = 3, index
    else:
        third, fixed = _PRIMARY_HOSTS[kind]
        fourth = fixed if fixed is not None else index
    if not 1 <= fourth <= 254:
        raise PlanError(f"{kind} {index}: no primary address")
    return str(PRIMARY.network_address + (third << 8) + fourth)


def primary_cidr(kind: str, index: int = 0) -> str:
    return f"{primary_address(kind, index)}/{PRIMARY.prefixlen}"


def external_address(family: int, lb_index: int) -> str:
    """LB ``lb_index``'s external address (CIDR); index 0 is the gateway."""
    network = EXTERNAL[family]
    host = 1 if lb_index == 0 else 10 + lb_index
    return f"{network.network_address + host}/{network.prefixlen}"


def gateway_address(family: int) -> str:
    return external_address(family, 0).split("/")[0]


def vip_cidr(family: int) -> str:
    return f"{VIPS[family]}/{32 if family == 4 else 128}"


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def nsp_address() -> str:
    return hostport(primary_address("nsp"), NSP_PORT)


def ipam_address() -> str:
    return hostport(primary_address("ipam"), IPAM_PORT)


def vip_endpoints(families: Iterable[int]) -> list[str]:
    """``VIP:port`` of each family, as the traffic client takes them."""
    return [hostport(VIPS[f], PORT) for f in sorted(families)]


# --- placement and scaling ---------------------------------------------------------------------


def place_target(placement: Mapping[int, int], nodes: Sequence[int]) -> int:
    """The node for one more target: the one with the fewest targets, the first on a tie."""
    if not nodes:
        raise PlanError("no node to place a target on")
    load = {node: 0 for node in nodes}
    for node in placement.values():
        if node in load:
            load[node] += 1
    return min(nodes, key=lambda node: (load[node], node))


def place_targets(
    placement: Mapping[int, int], new: Iterable[int], nodes: Sequence[int]
) -> dict[int, int]:
    """Nodes for the ``new`` target indexes, one after the other (so round robin from an even
    start): target index -> node index."""
    current = dict(placement)
    chosen = {}
    for index in sorted(new):
        node = place_target(current, nodes)
        current[index] = chosen[index] = node
    return chosen


@dataclass(frozen=True)
class ScalePlan:
    """Which instances go and which come for one kind of instance."""

    remove: tuple[int, ...]
    """Running instances to stop, newest (highest index) first."""
    clear: tuple[int, ...]
    """Dead instances to clear away (their index is free again)."""
    add: tuple[int, ...]
    """New instances, lowest free index first."""

    @property
    def empty(self) -> bool:
        return not (self.remove or self.clear or self.add)


def scale_plan(running: Iterable[int], dead: Iterable[int], want: int) -> ScalePlan:
    """From the ``running`` and ``dead`` instance indexes to ``want`` running ones.

    Dead instances are cleared and replaced; extra running ones are removed newest first; new
    ones take the lowest free indexes.
    """
    if want < 0:
        raise PlanError(f"cannot scale to {want}")
    alive = sorted(set(running))
    gone = sorted(set(dead) - set(alive))
    remove = tuple(sorted(alive, reverse=True)[: max(0, len(alive) - want)])
    kept = set(alive) - set(remove)
    add: list[int] = []
    candidate = 1
    while len(kept) + len(add) < want:
        if candidate not in kept:
            add.append(candidate)
        candidate += 1
    return ScalePlan(remove=remove, clear=tuple(gone), add=tuple(add))


# --- the gateway -------------------------------------------------------------------------------


def gateway_next_hops(lbs: Iterable[int], family: int) -> tuple[str, ...]:
    """The LBs' external addresses the gateway routes the VIP of ``family`` over."""
    return tuple(external_address(family, i).split("/")[0] for i in sorted(set(lbs)))


def gateway_route(lbs: Iterable[int], family: int) -> list[str]:
    """``ip`` arguments that make the gateway's route to the VIP of ``family`` go over exactly
    ``lbs`` (equal-cost multipath), or delete it when there is none."""
    hops = gateway_next_hops(lbs, family)
    head = [f"-{family}", "route"]
    if not hops:
        return [*head, "del", vip_cidr(family)]
    if len(hops) == 1:
        return [*head, "replace", vip_cidr(family), "via", hops[0]]
    via = [word for hop in hops for word in ("nexthop", "via", hop)]
    return [*head, "replace", vip_cidr(family), *via]


# --- the NSP's configuration ------------------------------------------------------------------


def nsp_configuration(families: Iterable[int]) -> dict[str, Any]:
    """The trench in Meridio's configuration format: one conduit, one stream, one flow for the
    VIPs of the lab's families (TCP, UDP and SCTP to port 5000)."""
    fams = sorted(set(families))
    vips = [{"name": f"vip{f}", "address": vip_cidr(f), "trench": TRENCH} for f in fams]
    return {
        "trench": {"name": TRENCH},
        "conduits": {"items": [{"name": CONDUIT, "trench": TRENCH}]},
        "streams": {"items": [{"name": STREAM, "conduit": CONDUIT, "max-targets": MAX_TARGETS}]},
        "vips": {"items": vips},
        "flows": {
            "items": [
                {
                    "name": FLOW,
                    "stream": STREAM,
                    "vips": [v["name"] for v in vips],
                    "protocols": ["tcp", "udp", "sctp"],
                    "destination-port-ranges": [str(PORT)],
                }
            ]
        },
    }


# --- command lines -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One process of the lab: a role daemon or a traffic server."""

    name: str
    """``nsp``, ``ipam``, ``lb-N``, ``proxy-N``, ``target-N`` or ``server-N``."""
    role: str
    """The meridiod role, or ``server`` for the traffic server."""
    host: str
    """Where it runs: the namespace is ``<prefix><host>``."""
    index: int = 0


def role_dir(state_dir: Path, name: str) -> Path:
    return state_dir / name


def run_dir(state_dir: Path, name: str) -> Path:
    return role_dir(state_dir, name) / "run"


def log_path(state_dir: Path, name: str) -> Path:
    return role_dir(state_dir, name) / f"{name}.log"


def health_socket(state_dir: Path, name: str) -> Path:
    return run_dir(state_dir, name) / "health.sock"


def lb_socket(state_dir: Path, name: str) -> Path:
    return run_dir(state_dir, name) / "lb.sock"


def nsp_config_path(state_dir: Path) -> Path:
    return role_dir(state_dir, "nsp") / "meridio-configuration.yaml"


def _common(state_dir: Path, name: str) -> list[str]:
    return [f"--instance={name}", f"--run-dir={run_dir(state_dir, name)}", "--log-format=json"]


def nsp_args(state_dir: Path) -> list[str]:
    return [
        "--role=nsp",
        *_common(state_dir, "nsp"),
        f"--listen={nsp_address()}",
        f"--database={role_dir(state_dir, 'nsp') / 'nsp.db'}",
        f"--configuration-file={nsp_config_path(state_dir)}",
        f"--trench={TRENCH}",
    ]


def ipam_args(state_dir: Path, families: Iterable[int]) -> list[str]:
    fams = set(families)
    return [
        "--role=ipam",
        *_common(state_dir, "ipam"),
        f"--listen={ipam_address()}",
        f"--database={role_dir(state_dir, 'ipam') / 'ipam.db'}",
        f"--trench={TRENCH}",
        f"--prefix-ipv4={IPAM_PREFIXES[4] if 4 in fams else ''}",
        f"--prefix-ipv6={IPAM_PREFIXES[6] if 6 in fams else ''}",
    ]


def lb_args(state_dir: Path, spec: LabSpec, index: int) -> list[str]:
    name = lb_host(index)
    external = [
        f"--external-addresses={','.join(external_address(f, index) for f in spec.families)}",
        f"--gateways={','.join(gateway_address(f) for f in spec.families)}",
    ]
    if spec.external == "veth":
        external.append("--external-interface=eth1")
    else:
        external += ["--external-parent=eth1", f"--external-kind={spec.external}"]
        if spec.external == "vlan":
            external.append(f"--external-vlan-id={VLAN_ID}")
    return [
        "--role=lb",
        *_common(state_dir, name),
        f"--nsp={nsp_address()}",
        f"--trench={TRENCH}",
        f"--conduit={CONDUIT}",
        f"--mode={spec.lb_mode}",
        f"--connect-listen={hostport(primary_address('lb', index), LB_CONNECT_PORT)}",
        # several LBs behind one gateway: replies may return through another LB
        *(["--untrack-syn"] if spec.lb_mode == "first-packet" else []),
        *external,
    ]


def proxy_args(state_dir: Path, spec: LabSpec, index: int) -> list[str]:
    name = f"proxy-{index}"
    return [
        "--role=proxy",
        *_common(state_dir, name),
        f"--node={node_host(index)}",
        f"--nsp={nsp_address()}",
        f"--ipam={ipam_address()}",
        f"--trench={TRENCH}",
        f"--conduit={CONDUIT}",
        f"--connect-listen={hostport(primary_address('node', index), PROXY_CONNECT_PORT)}",
        f"--mechanism={spec.mechanism}",
        f"--ip-family={spec.ip_family}",
    ]


def target_args(state_dir: Path, spec: LabSpec, index: int, node: int) -> list[str]:
    name = target_host(index)
    return [
        "--role=target",
        *_common(state_dir, name),
        f"--node={node_host(node)}",
        f"--proxy={hostport(primary_address('node', node), PROXY_CONNECT_PORT)}",
        f"--nsp={nsp_address()}",
        f"--trench={TRENCH}",
        f"--conduit={CONDUIT}",
        f"--streams={STREAM}",
        f"--mechanism={spec.mechanism}",
        "--drain-time=1",
    ]


def server_args(index: int) -> list[str]:
    """The traffic server beside target ``index`` (``meridioctl traffic server``)."""
    return ["server", "--name", target_host(index), "--address", f"[::]:{PORT}"]
