"""``meridioctl lab chaos``: kill a random role instance every few seconds while traffic runs,
and tell what each kind of kill cost.

While it runs, the traffic client keeps long-lived TCP connections to every VIP of stream-a
(``--connections``, ``--rate``; with ``--udp`` UDP flows too) and ``traffic probe`` opens new
connections at a fixed rate (``--probe-rate``), both from the external host. Every
``--interval`` seconds a victim is drawn (``plan.chaos_pick``: a kind among ``--kinds``, evenly,
then one of its instances) and its process gets SIGKILL (``Lab.kill``); its supervisor starts it
again. The next kill waits until the lab is whole again (``Lab.problems``: every process ready,
every stream ``OPEN``, every LB's table whole, the gateways routing over every LB), as a
disruption budget of one would; a lab not whole within ``--recover-timeout`` ends the killing.
With ``check_kernel`` (on by default) every namespace's kernel is read when the lab is whole
before a kill and again once it is whole after it, until it holds what it held before (the next
kill waits for that too): what still differs ``KERNEL_SETTLE`` seconds later (left behind or
lost by the restarted process: rules, routes, links, nftables and xtables rules, a second
BIRD) is reported as stale.

At the end every lost connection and failed connect is put down to the last kill before it
(``plan.attribute``), and the figures per kind are judged against the goals of
``plan.CHAOS_GOALS``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from meridio.lab import plan, system
from meridio.lab.lab import Lab, TrafficRun
from meridio.lab.plan import ChaosKill, ChaosLoss
from meridio.lab.system import LabError

CLIENT_TIMEOUT = 3.0
"""The traffic client's ``--timeout``: a connection unanswered this long is lost."""
KERNEL_SETTLE = 10.0
"""Seconds the kernels may take, once the lab is whole, to hold again what they held before a
kill (``Lab.kernel_changes``); what still differs then is stale."""
WARMUP = 2.0
"""Seconds of traffic before the first kill (every connection established)."""


@dataclass
class ChaosSettings:
    duration: float = 600.0
    """Seconds during which instances are killed."""
    interval: float = 5.0
    """Seconds between kills (at least: a kill waits until the lab is whole again)."""
    seed: int | None = None
    kinds: tuple[str, ...] = plan.CHAOS_KINDS
    connections: int = 40
    rate: float = 200.0
    """Packets per second over all the long-lived connections."""
    probe_rate: float = 20.0
    """New connections per second."""
    udp: bool = False
    """UDP flows beside the TCP connections."""
    recover_timeout: float = 60.0
    check_kernel: bool = True


@dataclass
class KillRecord:
    """One kill as it happened."""

    at: float
    kind: str
    name: str
    pid: int | None
    back: float | None = None
    whole: float | None = None
    problems: list[str] = field(default_factory=list)
    """What was still wrong when the lab was not whole in time."""
    settled: float | None = None
    """Seconds after the kill until every namespace's kernel held again what it held before
    (``check_kernel``)."""
    stale: list[str] = field(default_factory=list)
    """Kernel state the kill changed for good: still different ``KERNEL_SETTLE`` seconds after
    the lab was whole again (``namespace: + kind item``)."""

    def plan(self) -> ChaosKill:
        return ChaosKill(
            at=self.at, kind=self.kind, name=self.name, back=self.back, whole=self.whole
        )


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def client_losses(report: dict[str, Any]) -> tuple[list[ChaosLoss], list[ChaosLoss]]:
    """A traffic client's report: its lost connections (when each broke, its target) and its
    failed connects (when each started)."""
    started = _epoch(report["started"])
    timeout = float(report.get("settings", {}).get("timeout", CLIENT_TIMEOUT))
    lost, failed = [], []
    for conn in report.get("connections", []):
        at = plan.broke_at(started, conn, timeout)
        if at is not None:
            lost.append(ChaosLoss(at=at, host=conn.get("host"), error=conn.get("error") or ""))
        elif conn.get("state") == "failed":
            failed.append(
                ChaosLoss(at=started + float(conn["started"]), error=conn.get("error") or "")
            )
    return lost, failed


def probe_failures(report: dict[str, Any]) -> list[ChaosLoss]:
    """A probe's report: its failed new connections (when each started)."""
    started = _epoch(report["started"])
    return [
        ChaosLoss(at=started + float(f["t"]), error=str(f.get("error", "")))
        for f in report.get("failures", [])
    ]


class Chaos:
    def __init__(
        self, lab: Lab, settings: ChaosSettings, say: Callable[[str], None] | None = None
    ) -> None:
        self.lab = lab
        self.settings = settings
        self.say = say or (lambda text: None)
        self.kills: list[KillRecord] = []
        self.stopped: str = ""
        self.seed = settings.seed if settings.seed is not None else random.randrange(2**32)
        self.rand = random.Random(self.seed)

    # -- traffic

    def _start_traffic(self, seconds: float) -> dict[str, TrafficRun]:
        s = self.settings
        common = ["--duration", f"{seconds:g}", "--connections", str(s.connections)]
        common += ["--rate", f"{s.rate:g}", "--retries", "1000000"]
        common += ["--timeout", f"{CLIENT_TIMEOUT:g}"]
        runs = {"tcp": self.lab.start_traffic(common)}
        if s.udp:
            runs["udp"] = self.lab.start_traffic(["--udp", *common])
        probe = ["--rate", f"{s.probe_rate:g}", "--duration", f"{seconds:g}"]
        runs["probe"] = self.lab.start_traffic(probe, command="probe")
        return runs

    @staticmethod
    def _stop_traffic(runs: dict[str, TrafficRun]) -> dict[str, dict[str, Any]]:
        for run in runs.values():
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
        return {name: run.result(timeout=60) for name, run in runs.items()}

    # -- killing

    def _candidates(self) -> list[str]:
        """Instances of the kinds asked for whose process runs now."""
        state = self.lab.load()
        return [
            name
            for name, proc in state.processes.items()
            if plan.chaos_kind(name) in self.settings.kinds and system.role_pid(proc) is not None
        ]

    def _kill_one(self, started: float) -> KillRecord | None:
        picked = plan.chaos_pick(self.rand, self._candidates(), self.settings.kinds)
        if picked is None:
            self.stopped = "nothing left to kill"
            return None
        kind, name = picked
        before = self.lab.kernel_states() if self.settings.check_kernel else {}
        at = time.time()
        try:
            pid = self.lab.kill(name)
        except LabError as exc:
            self.say(f"{at - started:7.1f} s  {name}: {exc}")
            return None
        record = KillRecord(at=at, kind=kind, name=name, pid=pid)
        self.kills.append(record)
        state = self.lab.load()
        proc = state.processes[name]
        deadline = time.monotonic() + self.settings.recover_timeout
        while time.monotonic() < deadline:
            now_pid = system.role_pid(proc)
            if now_pid is not None and now_pid != pid and self.lab.ready(name):
                record.back = round(time.time() - at, 3)
                break
            time.sleep(0.1)
        try:
            left = max(1.0, deadline - time.monotonic())
            self.lab.wait_whole(left)
            record.whole = round(time.time() - at, 3)
        except LabError:
            record.problems = self.lab.problems()
        if record.whole is not None and before:
            # what differs for good is stale; what comes back within KERNEL_SETTLE is not
            record.stale, _ = self.lab.kernel_changes(before, KERNEL_SETTLE)
            if not record.stale:
                record.settled = round(time.time() - at, 3)
        self.say(self._kill_text(record, started))
        return record

    @staticmethod
    def _kill_text(record: KillRecord, started: float) -> str:
        text = f"{record.at - started:7.1f} s  {record.name:<10} killed (pid {record.pid})"
        text += f": back in {record.back:.2f} s" if record.back is not None else ": not back"
        if record.whole is None:
            text += f", lab not whole: {'; '.join(record.problems[:4])}"
        else:
            text += f", lab whole in {record.whole:.2f} s"
            if record.settled is not None and record.settled - record.whole > 0.5:
                text += f", kernels as before in {record.settled:.2f} s"
        if record.stale:
            text += f"; {len(record.stale)} stale kernel entries"
        return text

    # -- the run

    def run(self) -> dict[str, Any]:
        s = self.settings
        self.lab.wait_whole(s.recover_timeout)
        # the traffic runs past the last kill's recovery; stopped by SIGTERM once it is over
        runs = self._start_traffic(s.duration + WARMUP + s.recover_timeout + 30)
        # the watching (readiness, tables, kernels, many times a second) must not starve what
        # it watches: a BIRD silent for 300 ms loses its BFD sessions
        with contextlib.suppress(OSError):
            os.nice(10)
        started = time.time()
        self.say(
            f"chaos for {s.duration:g} s, a kill every {s.interval:g} s or more, seed "
            f"{self.seed}, kinds {','.join(s.kinds)}"
        )
        try:
            time.sleep(WARMUP)
            next_kill = time.time()
            while time.time() < started + WARMUP + s.duration:
                time.sleep(max(0.0, next_kill - time.time()))
                record = self._kill_one(started)
                if self.stopped:
                    break
                if record is not None and record.whole is None:
                    self.stopped = f"the lab was not whole {s.recover_timeout:g} s after a kill"
                    break
                # after a kill that could not be made (its process had just gone): a second
                next_kill = record.at + s.interval if record is not None else time.time() + 1
            # the last losses are seen within the client's timeout
            time.sleep(CLIENT_TIMEOUT + 1.0)
        finally:
            reports = self._stop_traffic(runs)
        return self._report(reports, time.time() - started)

    def _report(self, reports: dict[str, dict[str, Any]], elapsed: float) -> dict[str, Any]:
        s = self.settings
        lost: list[ChaosLoss] = []
        failed: list[ChaosLoss] = []
        for name in ("tcp", "udp"):
            if name in reports:
                lost_here, failed_here = client_losses(reports[name])
                lost += lost_here
                failed += failed_here
        failed += probe_failures(reports["probe"])
        kills = [k.plan() for k in self.kills]
        lost_per_kill, lost_unexplained = plan.attribute(kills, lost)
        failed_per_kill, failed_unexplained = plan.attribute(kills, failed)
        figures = plan.chaos_figures(kills, lost_per_kill, failed_per_kill, s.kinds)
        missed = plan.chaos_verdict(figures)
        stale = [line for k in self.kills for line in k.stale]
        if stale:
            missed.append(f"{len(stale)} stale kernel entries after restarts")
        if lost_unexplained:
            # a connect that failed with no kill to blame is reported, not judged (a SYN lost
            # on a busy host fails a probe with a 1 s timeout); a connection lost is judged
            missed.append(
                f"no kill to blame (before the first, or while the lab was whole): "
                f"{len(lost_unexplained)} connection(s) lost"
            )
        probe = reports["probe"]
        traffic = {
            name: {
                "connections": sum(r["hosts"].values()),
                "hosts": r["hosts"],
                "lost": r["lost_connections"],
                "lost_per_host": r["lost_per_host"],
                "failed_connects": r["failed_connects"],
                "sent": r["sent"],
                "received": r["received"],
            }
            for name, r in reports.items()
            if name != "probe"
        }
        traffic["probe"] = {
            "attempts": probe["attempts"],
            "ok": probe["ok"],
            "failed": probe["failed"],
            "errors": probe.get("errors", {}),
        }
        return {
            "seed": self.seed,
            "settings": asdict(s),
            "elapsed": round(elapsed, 1),
            "stopped": self.stopped,
            "kills": [
                {
                    **asdict(k),
                    "lost": [asdict(x) for x in lost_per_kill.get(i, [])],
                    "failed": len(failed_per_kill.get(i, [])),
                    "failed_after": [round(x.at - k.at, 3) for x in failed_per_kill.get(i, [])],
                    "failure_span": round(plan.failure_span(failed_per_kill.get(i, [])), 3),
                }
                for i, k in enumerate(self.kills)
            ],
            "kinds": [asdict(f) for f in figures],
            "goals": {k: plan.CHAOS_GOALS[k] for k in s.kinds if k in plan.CHAOS_GOALS},
            "unexplained": {
                "lost": [asdict(x) for x in lost_unexplained],
                "failed": [asdict(x) for x in failed_unexplained],
            },
            "traffic": traffic,
            "missed": missed,
            "ok": not missed,
        }


def run_chaos(
    lab: Lab, settings: ChaosSettings, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run a chaos (see the module); its report."""
    return Chaos(lab, settings, say).run()


def kill_lines(report: dict[str, Any], started: float | None = None) -> Sequence[str]:
    """Per kill that lost connections or failed connects: when, what, and what it cost."""
    lines = []
    first = started if started is not None else min((k["at"] for k in report["kills"]), default=0)
    for k in report["kills"]:
        if not k["lost"] and not k["failed"]:
            continue
        hosts: dict[str, int] = {}
        for loss in k["lost"]:
            hosts[loss["host"] or "?"] = hosts.get(loss["host"] or "?", 0) + 1
        where = ", ".join(f"{h} x{n}" for h, n in sorted(hosts.items()))
        lines.append(
            f"{k['at'] - first:7.1f} s  {k['name']:<10} {len(k['lost'])} lost"
            + (f" ({where})" if where else "")
            + f", {k['failed']} connects failed"
            + (f" within {k['failure_span']:.2f} s" if k["failed"] > 1 else "")
        )
    return lines
