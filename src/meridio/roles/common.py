"""Pieces the proxy and target roles share: NSP watches and the egress routing they install."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio
from pyroute2.netlink.exceptions import NetlinkError

from meridio.core.proxystate import SourceRule
from meridio.runtime.netlink import NetlinkManager, NoSuchLink

if TYPE_CHECKING:
    from meridio.runtime import Runtime

FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
KERNEL_ERRORS = (NetlinkError, NoSuchLink, OSError)
"""What a pass that changes the kernel may meet and retry: the kernel refusing a change for now
(netlink; a lean dump's error is an OSError), a link that went away meanwhile, a socket error.
Anything else is a bug: it crashes the daemon, for its supervisor to restart it, rather than
being retried forever."""
IP_FAMILIES = {"dualstack": (4, 6), "ipv4": (4,), "ipv6": (6,)}


async def watch(
    runtime: Runtime,
    name: str,
    open_stream: Callable[[], AsyncIterator[Any]],
    store: Callable[[Any], None],
    on_state: Callable[[str, bool], None],
) -> None:
    """Consume a level-triggered NSP stream (reopened on failure): ``store`` every message."""
    send, recv = trio.open_memory_channel[Any](4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: runtime.grpc.pump(
                open_stream, send, on_state=lambda up: on_state(name, up), name=name
            )
        )
        async for message in recv:
            store(message)


async def wait_any(deadline: float, *waits: Callable[[], Awaitable[object]]) -> None:
    """Return when the first of ``waits`` returns, or at ``deadline`` (trio time)."""
    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:

            async def one(wait: Callable[[], Awaitable[object]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            for wait in waits:
                nursery.start_soon(one, wait)


class Egress:
    """``from <VIP> lookup <table>`` rules and the table's default route, per family.

    The table's default route goes via ``next_hops`` (several: multipath) and, optionally, out of
    a given interface. What is installed is remembered, so an update changes only the
    difference; :meth:`clear` removes all of it.
    """

    def __init__(self, netlink: NetlinkManager, table: int, priority: int) -> None:
        self.netlink = netlink
        self.table = table
        self.priority = priority
        self.rules: set[SourceRule] = set()
        self.routes: dict[int, tuple[tuple[str, ...], str | None]] = {}

    async def update(
        self,
        rules: Iterable[SourceRule],
        next_hops: Mapping[int, tuple[str, ...]],
        oif: str | None = None,
        *,
        check_drift: bool = False,
    ) -> bool:
        """Install exactly ``rules`` and, per family, a default route via ``next_hops``;
        True when something changed."""
        want = set(rules)
        have = await self._read_rules() if check_drift else set(self.rules)
        changed = False
        for rule in sorted(have - want):
            await self._rule(rule, add=False)
            changed = True
        for rule in sorted(want - have):
            await self._rule(rule, add=True)
            changed = True
        self.rules = want
        for family in (4, 6):
            hops = next_hops.get(family, ())
            current = self.routes.get(family)
            if check_drift and current is not None and not await self._route_present(family):
                current = None
            if hops and (current != (hops, oif)):
                await self.netlink.ensure_route(
                    "default",
                    table=self.table,
                    family=FAMILY[family],
                    oif=oif,
                    **({"gateway": hops[0]} if len(hops) == 1 else {"multipath": list(hops)}),
                )
                self.routes[family] = (hops, oif)
                changed = True
            elif not hops and current is not None:
                await self.netlink.ensure_route_absent(
                    "default", table=self.table, family=FAMILY[family]
                )
                del self.routes[family]
                changed = True
        return changed

    async def clear(self) -> None:
        await self.update((), {})

    async def _rule(self, rule: SourceRule, *, add: bool) -> None:
        fn = self.netlink.ensure_rule if add else self.netlink.ensure_rule_absent
        await fn(family=FAMILY[rule.family], priority=self.priority, table=self.table, src=rule.src)

    async def _read_rules(self) -> set[SourceRule]:
        """Our rules as the kernel has them: one lean dump per family (see
        :mod:`meridio.core.rtnl`)."""
        found = set()
        for rule in await self.netlink.rule_list():
            if rule.table == self.table and rule.priority == self.priority and rule.src:
                net = ipaddress.ip_network(rule.src, strict=False)
                found.add(SourceRule(net.version, str(net)))
        return found

    async def _route_present(self, family: int) -> bool:
        """Whether the table's default route is there: one lean dump of the family's routes
        (a proxy's namespace holds a few routes per target link)."""
        return any(
            route.table == self.table and route.dst is None
            for route in await self.netlink.route_list(FAMILY[family])
        )


class NspInputs:
    """What a proxy or a target keeps from the NSP's VIP watch, and the wake-up of its loops.

    Loops take ``_inputs_changed`` before they read the inputs and wait on it afterwards;
    ``_kick`` sets it and puts a fresh one in place, so no change between the two is missed.
    """

    vips: list[str] | None
    _inputs_changed: trio.Event

    def _store_vips(self, message: Any) -> None:
        self.vips = [v.address for v in message.vips]
        self._kick()

    def _kick(self) -> None:
        self._inputs_changed.set()
        self._inputs_changed = trio.Event()
