"""Stateless destination port NAT: the conduits' ``destination-port-nats`` as the LB applies them.

Meridio's conduit field ``destination-port-nats`` (``port``, ``target-port``, ``vips``,
``protocol``): traffic through the conduit to one of the VIPs on ``port`` reaches its target on
``target-port``; replies leave with ``port`` again. As in Meridio (its LB's ``inet
meridio-nat`` table, prerouting priority 100, both directions, no conntrack), the LB does both
rewrites: the targets' replies pass the LB (the proxies route them over the LBs), so nothing
is needed in the proxy or the target. The target is chosen on the original port, so every LB
picks the same one; then the destination port is rewritten. How each mode renders it:
:mod:`meridio.lb.nftables`.

Because it is stateless, two entries may not share a VIP, protocol and port (which port would
a packet get?), nor a VIP, protocol and target port (which port would its reply get back?): the
NSP refuses such a configuration (:mod:`meridio.core.nspconfig`); should one arrive anyway (a
newer NSP, several conduits served by one LB) the later entry is left out with a problem
reported. This module is pure: :func:`port_nats` turns the conduits of the LB's streams into
:class:`~meridio.lb.nftables.PortNat` entries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from meridio.api.nsp.v1 import Conduit, Stream
from meridio.core.classifier import PROTOCOLS, IPAddress
from meridio.lb.nftables import PortNat

__all__ = ["port_nats", "port_nats_of_streams"]


def port_nats(conduits: Iterable[Conduit]) -> tuple[tuple[PortNat, ...], tuple[str, ...]]:
    """The port NAT entries of ``conduits`` (sorted), and a problem for each entry left out."""
    nats: list[PortNat] = []
    problems: list[str] = []
    taken: dict[tuple[int, int, IPAddress], str] = {}
    taken_reply: dict[tuple[int, int, IPAddress], str] = {}
    for conduit in conduits:
        for index, nat in enumerate(conduit.destination_port_nats):
            label = f"conduit {conduit.name!r} destination-port-nats[{index}]"
            proto = PROTOCOLS.get(str(nat.protocol).strip().lower())
            if proto is None:
                problems.append(f"{label}: protocol {nat.protocol!r} is not tcp, udp or sctp")
                continue
            if not (1 <= nat.port <= 65535 and 1 <= nat.target_port <= 65535):
                problems.append(f"{label}: port {nat.port} -> {nat.target_port} out of range")
                continue
            try:
                vips = tuple(
                    sorted(
                        {ipaddress.ip_interface(str(v.address)).ip for v in nat.vips},
                        key=lambda a: (a.version, int(a)),
                    )
                )
            except ValueError as exc:
                problems.append(f"{label}: {exc}")
                continue
            clash = next(
                (
                    taken.get((proto, nat.port, v)) or taken_reply.get((proto, nat.target_port, v))
                    for v in vips
                    if (proto, nat.port, v) in taken or (proto, nat.target_port, v) in taken_reply
                ),
                None,
            )
            if clash is not None:
                problems.append(f"{label}: overlaps {clash}; left out")
                continue
            if not vips:
                continue
            for v in vips:
                taken[(proto, nat.port, v)] = label
                taken_reply[(proto, nat.target_port, v)] = label
            nats.append(PortNat(proto, nat.port, nat.target_port, vips))
    return tuple(sorted(nats)), tuple(problems)


def port_nats_of_streams(streams: Iterable[Stream]) -> tuple[tuple[PortNat, ...], tuple[str, ...]]:
    """:func:`port_nats` of the conduits the streams belong to (each conduit once)."""
    conduits: dict[tuple[str, str], Conduit] = {}
    for stream in streams:
        conduit = stream.conduit
        if conduit is None:
            continue
        trench = conduit.trench.name if conduit.trench else ""
        conduits.setdefault((trench, conduit.name), conduit)
    return port_nats(conduits[key] for key in sorted(conduits))
