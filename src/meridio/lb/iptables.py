"""iptables/ip6tables rules that hand VIP packets to the NFQUEUE readers (nfqueue mode).

Used where the kernel has no nft ``queue`` statement (see
:func:`meridio.lb.nftables.probe_features`; where it has, the queue rules are in the LB's own
nft table and this module is not used). The xtables NFQUEUE target does it: our rules live in
a chain of our own in the mangle table, rewritten atomically with ``iptables-restore
--noflush`` (declaring a chain there flushes it first), reached by one jump from PREROUTING.
Nothing else: the kernel and first-packet modes use no iptables at all, and this mode no other
built-in chain (each one is a hook every packet of the namespace would cross).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import trio

PRE_CHAIN = "MERIDIO-LB"
# chains of earlier versions (first-packet and kernel mode used them): removed when found
OLD_CHAINS = (("mangle", "FORWARD", "MERIDIO-LB-FWD"), ("raw", "PREROUTING", "MERIDIO-LB-RAW"))
# (table, built-in chain, our chain): where each of our chains is jumped to from
JUMPS = (("mangle", "PREROUTING", PRE_CHAIN),)


class IptablesError(RuntimeError):
    pass


@dataclass(frozen=True)
class QueueSpec:
    first: int = 0
    count: int = 1
    bypass: bool = False
    """Fail-open: with no reader bound the kernel accepts packets unmarked instead of dropping."""

    def target(self) -> str:
        where = (
            f"--queue-num {self.first}"
            if self.count == 1
            else f"--queue-balance {self.first}:{self.first + self.count - 1}"
        )
        return f"-j NFQUEUE {where}" + (" --queue-bypass" if self.bypass else "")


def render(family: int, vips: Sequence[str], queue: QueueSpec) -> str:
    """The iptables-restore script for one family (4 or 6): every packet to a VIP is queued."""
    dests = sorted(
        {
            str(ipaddress.ip_network(v, strict=False))
            for v in vips
            if ipaddress.ip_network(v, strict=False).version == family
        }
    )
    pre = [f"-A {PRE_CHAIN} -d {dst} {queue.target()}" for dst in dests]
    return "\n".join(["*mangle", f":{PRE_CHAIN} - [0:0]", *pre, "COMMIT", ""])


def _tool(family: int, suffix: str = "") -> str:
    return ("iptables" if family == 4 else "ip6tables") + suffix


async def _run(cmd: list[str], stdin: bytes | None = None, check: bool = True) -> int:
    result = await trio.run_process(
        cmd, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
    )
    if check and result.returncode != 0:
        raise IptablesError(f"{' '.join(cmd)}: {result.stderr.decode().strip()}")
    return result.returncode


async def apply(family: int, script: str) -> None:
    """Load our chains and make sure PREROUTING and FORWARD jump to them."""
    await _run([_tool(family, "-restore"), "--noflush", "--wait"], stdin=script.encode())
    for table, builtin, chain in JUMPS:
        rule = [builtin, "-j", chain]
        tool = [_tool(family), "--wait", "-t", table]
        if await _run([*tool, "-C", *rule], check=False) != 0:
            await _run([*tool, "-I", *rule])


async def remove(family: int) -> None:
    """Remove the jumps and our chains (those of earlier versions too); harmless when they are
    not there (nothing is created in their place)."""
    for table, builtin, chain in (*JUMPS, *OLD_CHAINS):
        tool = [_tool(family), "--wait", "-t", table]
        while await _run([*tool, "-D", builtin, "-j", chain], check=False) == 0:
            pass
        await _run([*tool, "-F", chain], check=False)
        await _run([*tool, "-X", chain], check=False)


async def present(family: int) -> bool:
    """Whether a chain of ours (of any version) is in iptables (``iptables-save``, which
    creates nothing where there is no table)."""
    result = await trio.run_process(
        [_tool(family, "-save")], capture_stdout=True, capture_stderr=True, check=False
    )
    text = result.stdout.decode(errors="replace")
    return any(f":{chain} " in text for _, _, chain in (*JUMPS, *OLD_CHAINS))


async def current(family: int) -> str:
    """Our chains as ``iptables -S`` prints them (for drift detection and tests)."""
    out = []
    for table, _, chain in JUMPS:
        result = await trio.run_process(
            [_tool(family), "--wait", "-t", table, "-S", chain],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        out.append(result.stdout.decode())
    return "".join(out)
