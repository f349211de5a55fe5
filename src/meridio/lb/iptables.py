"""iptables/ip6tables rules that hand VIP packets to the NFQUEUE readers.

The kernel here has no nft ``queue`` expression, so queueing goes through the xtables NFQUEUE
target. Our rules live in chains of our own in the mangle table, rewritten atomically with
``iptables-restore --noflush`` (declaring a chain there flushes it first), and reached by one
jump each from PREROUTING and FORWARD.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import trio

PRE_CHAIN = "MERIDIO-LB"
FWD_CHAIN = "MERIDIO-LB-FWD"
RAW_CHAIN = "MERIDIO-LB-RAW"
# (table, built-in chain, our chain): where each of our chains is jumped to from
JUMPS = (
    ("mangle", "PREROUTING", PRE_CHAIN),
    ("mangle", "FORWARD", FWD_CHAIN),
    ("raw", "PREROUTING", RAW_CHAIN),
)

ICMP_ERRORS = {
    4: ("icmp", "--icmp-type", (3, 11, 12)),
    6: ("ipv6-icmp", "--icmpv6-type", (1, 2, 3, 4)),
}


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


def render(
    mode: str, family: int, vips: Sequence[str], queue: QueueSpec, *, untrack_syn: bool = False
) -> str:
    """The iptables-restore script for one family ("4" or "6") and LB mode."""
    dests = sorted(
        {
            str(ipaddress.ip_network(v, strict=False))
            for v in vips
            if ipaddress.ip_network(v, strict=False).version == family
        }
    )
    pre: list[str] = []
    fwd: list[str] = []
    raw: list[str] = []
    for dst in dests:
        if mode == "nfqueue":
            pre.append(f"-A {PRE_CHAIN} -d {dst} {queue.target()}")
        elif mode == "first-packet":
            # With several LBs, replies may leave through another LB, so this LB may see only
            # the client's side of a connection; tracked from its SYN, such a connection stays
            # SYN_SENT, its later packets are INVALID and its mark is never restored.
            # Untracked SYNs let conntrack pick it up at the client's first ACK. The price,
            # measured with one LB: about half of new connections wait 200 ms longer.
            if untrack_syn:
                raw.append(f"-A {RAW_CHAIN} -d {dst} -p tcp --syn -j CT --notrack")
            pre.append(f"-A {PRE_CHAIN} -d {dst} -j CONNMARK --restore-mark")
            pre.append(f"-A {PRE_CHAIN} -d {dst} -m mark --mark 0 {queue.target()}")
            # NFQUEUE's accept resumes at the next hook, so the mark is saved in FORWARD
            fwd.append(
                f"-A {FWD_CHAIN} -d {dst} -m connmark --mark 0 -m mark ! --mark 0 "
                "-j CONNMARK --save-mark"
            )
        elif mode == "kernel":
            proto, option, types = ICMP_ERRORS[family]
            for icmp_type in types:
                pre.append(
                    f"-A {PRE_CHAIN} -d {dst} -p {proto} {option} {icmp_type} {queue.target()}"
                )
        else:
            raise ValueError(f"unknown LB mode {mode!r}")
    lines = ["*raw", f":{RAW_CHAIN} - [0:0]", *raw, "COMMIT"]
    lines += ["*mangle", f":{PRE_CHAIN} - [0:0]", f":{FWD_CHAIN} - [0:0]", *pre, *fwd, "COMMIT", ""]
    return "\n".join(lines)


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
    """Remove the jumps and our chains; harmless when they are not there."""
    for table, builtin, chain in JUMPS:
        tool = [_tool(family), "--wait", "-t", table]
        while await _run([*tool, "-D", builtin, "-j", chain], check=False) == 0:
            pass
        await _run([*tool, "-F", chain], check=False)
        await _run([*tool, "-X", chain], check=False)


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
