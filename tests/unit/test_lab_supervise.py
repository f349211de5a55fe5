"""The lab's supervisor (``python -m meridio.lab.supervise``) around a small shell program: it
starts it again when it dies, counts the restarts, passes signals on, stops with it on SIGTERM,
leaves it dead with ``--no-restart`` or while the hold file exists, and takes it along when it
is killed itself. No root needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meridio.lab.supervise import SuperviseStatus, read_status
from tests.waiting import wait_until

# a child that notes the signals it gets, and ends on SIGTERM with status 0 (Python, not sh: a
# shell runs a trap only between commands, and under load one was seen never to run)
CHILD = """
import signal, sys, time
def note(word):
    with open(sys.argv[1], "a") as notes:
        notes.write(word + "\\n")
def term(*_):
    note("term")
    sys.exit(0)
signal.signal(signal.SIGHUP, lambda *_: note("hup"))
signal.signal(signal.SIGTERM, term)
note("started")
while True:
    time.sleep(1)
"""


class Supervised:
    def __init__(self, tmp_path: Path, *options: str) -> None:
        self.status_path = tmp_path / "supervise.json"
        self.notes = tmp_path / "notes"
        self.log = tmp_path / "log"
        argv = [sys.executable, "-m", "meridio.lab.supervise", "--status", str(self.status_path)]
        argv += ["--name", "child", *options, "--", sys.executable, "-c", CHILD, str(self.notes)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out)

    def status(self) -> SuperviseStatus:
        status = read_status(self.status_path)
        assert status is not None, self.log.read_text()
        return status

    def until(self, what: str, condition: Callable[[SuperviseStatus], bool]) -> SuperviseStatus:
        def met() -> SuperviseStatus | None:
            status = read_status(self.status_path)
            return status if status is not None and condition(status) else None

        try:
            return wait_until(met, what=what, interval=0.02)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()}") from None

    def running(self) -> SuperviseStatus:
        return self.until("the child runs", lambda s: s.state == "running" and s.pid is not None)

    def notes_seen(self) -> list[str]:
        try:
            return self.notes.read_text().split()
        except FileNotFoundError:
            return []


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    made: list[Supervised] = []

    def make(*options: str) -> Supervised:
        made.append(Supervised(tmp_path, *options))
        return made[-1]

    yield make
    for one in made:
        if one.proc.poll() is None:
            one.proc.kill()
            one.proc.wait(5)
        status = read_status(one.status_path)
        if status is not None and status.pid is not None:
            gone(status.pid)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone(pid: int) -> None:
    wait_until(lambda: not alive(pid), what=f"{pid} gone", interval=0.02)


def test_a_child_that_dies_is_started_again_and_counted(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised()
    first = sup.running()
    assert first.restarts == 0 and first.starts == 1 and first.supervisor == sup.proc.pid
    assert first.start_time is not None
    os.kill(first.pid or 0, signal.SIGKILL)
    second = sup.until("started again", lambda s: s.pid not in (None, first.pid))
    assert second.restarts == 1 and second.state == "running"
    assert second.last_exit is not None and second.last_exit.signal == "SIGKILL"
    # dying young again: the pause doubles
    os.kill(second.pid or 0, signal.SIGKILL)
    waiting = sup.until("waiting", lambda s: s.state == "waiting" or s.restarts == 2)
    third = sup.until("started again", lambda s: s.restarts == 2 and s.state == "running")
    assert [e.signal for e in third.exits] == ["SIGKILL", "SIGKILL"]
    if waiting.state == "waiting":
        assert waiting.next_start is not None
    lines = sup.log.read_text()
    assert '"restart_in": 0.2' in lines and '"restart_in": 0.4' in lines
    assert lines.count('{"event": "started", ') == 3


def test_sigterm_is_passed_on_and_nothing_is_started_again(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised()
    child = sup.running().pid or 0
    # The child notes "started" once its traps are set; a SIGHUP before that would end it.
    wait_until(lambda: "started" in sup.notes_seen(), what="the child's traps set")
    os.kill(sup.proc.pid, signal.SIGHUP)  # passed on as it is
    wait_until(lambda: "hup" in sup.notes_seen(), what="SIGHUP passed on to the child")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(10) == 0
    status = sup.status()
    assert status.state == "stopped" and status.restarts == 0 and status.pid is None
    assert status.last_exit is not None and status.last_exit.code == 0
    assert sup.notes_seen().count("term") == 1
    gone(child)


def test_with_no_restart_the_supervisor_ends_with_its_child(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised("--no-restart")
    os.kill(sup.running().pid or 0, signal.SIGKILL)
    assert sup.proc.wait(10) == 0
    status = sup.status()
    assert status.state == "exited" and status.restarts == 0 and not status.restart
    assert status.last_exit is not None and status.last_exit.signal == "SIGKILL"


def test_nothing_is_started_again_while_the_hold_file_exists(
    supervised: Callable[..., Supervised], tmp_path: Path
) -> None:
    hold = tmp_path / "down"
    sup = supervised("--hold", str(hold))
    child = sup.running().pid or 0
    hold.touch()
    os.kill(child, signal.SIGKILL)
    assert sup.proc.wait(10) == 0
    assert sup.status().state == "stopped" and sup.status().restarts == 0


def test_a_killed_supervisor_takes_its_child_along(supervised: Callable[..., Supervised]) -> None:
    sup = supervised()
    child = sup.running().pid or 0
    sup.proc.kill()
    sup.proc.wait(5)
    gone(child)


def test_the_supervisor_needs_a_program(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meridio.lab.supervise", "--status", str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "no program" in done.stderr
