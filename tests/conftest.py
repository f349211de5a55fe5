"""Shared fixtures: a trio-asyncio loop, throw-away network namespaces, daemons inside them."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio_asyncio

# Every namespace a test makes starts with this prefix, so a crashed run can be cleaned up.
NETNS_PREFIX = "mtest-"
VENV_BIN = Path(sys.executable).parent


def have_root() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if have_root():
        return
    skip = pytest.mark.skip(reason="needs root and iproute2 to create network namespaces")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


def _kill_netns_processes(name: str) -> None:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def delete_netns(name: str) -> None:
    _kill_netns_processes(name)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session", autouse=True)
def _remove_stale_namespaces() -> Iterator[None]:
    """Remove namespaces left behind by an earlier test process that was killed.

    Names carry the creating process id (``mtest-<pid>-...``), so a concurrent test run's
    namespaces are left alone.
    """
    if have_root():
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            name = line.split()[0] if line.split() else ""
            match = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-.*", name)
            if match and not _pid_alive(int(match.group(1))):
                delete_netns(name)
    yield


@pytest.fixture
async def aio_loop() -> AsyncIterator[object]:
    async with trio_asyncio.open_loop() as loop:
        yield loop


class Netns:
    """A network namespace made for one test, with loopback up; removed afterwards."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[bytes]] = []

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd], capture_output=True, text=True, check=check
        )

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kwargs)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        delete_netns(self.name)


def make_netns(tag: str = "") -> Netns:
    name = f"{NETNS_PREFIX}{os.getpid()}-{tag}{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    ns = Netns(name)
    ns.run("ip", "link", "set", "lo", "up")
    return ns


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = make_netns()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def netns_factory() -> Iterator[object]:
    made: list[Netns] = []

    def factory(tag: str = "") -> Netns:
        ns = make_netns(tag)
        made.append(ns)
        return ns

    try:
        yield factory
    finally:
        for ns in made:
            ns.close()
