"""The proxy's and the target's kernel passes retry what the kernel may refuse for a while and
let anything else (a bug) out, to crash the daemon for its supervisor to restart it.

The roles are built for real; only what their loop talks to (the connect client, the kernel)
is replaced, and the loop runs on trio's mock clock.
"""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from pyroute2.netlink.exceptions import NetlinkError

from meridio.roles.proxy import ProxyRole, ProxySettings
from meridio.roles.target import TargetRole, TargetSettings
from meridio.runtime.logs import get_logger
from meridio.runtime.netlink import NoSuchLink
from meridio.runtime.notify import Signal

# Three failures the loops must survive, then a programming error they must not.
FAILURES: list[BaseException] = [
    NetlinkError(errno.EBUSY, "busy"),
    NoSuchLink("no link named conduit0"),
    OSError(errno.ENOBUFS, "no buffer space"),
    TypeError("a bug"),
]


def runtime(tmp_path: Path) -> Any:
    return SimpleNamespace(log=get_logger("test"), instance="node-a", run_dir=str(tmp_path))


class FakeClient:
    def __init__(self) -> None:
        self.changes = Signal()
        self.connections: dict[str, Any] = {}

    def set_desired(self, specs: dict[str, Any]) -> None:
        pass

    def established(self) -> list[Any]:
        return []


def failing(calls: list[int]) -> Any:
    async def fail(*args: Any, **kwargs: Any) -> bool:
        calls.append(1)
        raise FAILURES[min(len(calls), len(FAILURES)) - 1]

    return fail


async def test_target_retries_kernel_errors_and_crashes_on_a_bug(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    role = TargetRole(TargetSettings(connection_id="c"), runtime(tmp_path))
    role.client = FakeClient()  # type: ignore[assignment]
    calls: list[int] = []
    role._reconcile = failing(calls)  # type: ignore[method-assign]
    role._sync_session = lambda nursery: None  # type: ignore[method-assign]
    role._persist = lambda: None  # type: ignore[method-assign]
    role._publish = lambda: None  # type: ignore[method-assign]
    start = trio.current_time()
    # (a loop that retried the bug would go on until the mock clock's deadline)
    with pytest.raises(TypeError, match="a bug"), trio.fail_after(10):
        await role._loop(None)  # type: ignore[arg-type]
    assert len(calls) == len(FAILURES)
    assert role.passes.version == len(FAILURES) - 1  # the passes that failed went on
    assert trio.current_time() - start == pytest.approx(3.0)  # retried a second apart


async def test_proxy_egress_retries_kernel_errors_and_crashes_on_a_bug(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    role = ProxyRole(ProxySettings(trench="t", conduit="c"), runtime(tmp_path))
    role.client = FakeClient()  # type: ignore[assignment]
    role.vips = ["20.0.0.1/32"]
    calls: list[int] = []
    role.egress = SimpleNamespace(update=failing(calls))  # type: ignore[assignment]
    start = trio.current_time()
    with pytest.raises(TypeError, match="a bug"), trio.fail_after(10):
        await role._egress_loop()
    assert len(calls) == len(FAILURES)
    assert trio.current_time() - start == pytest.approx(3.0)  # retried a second apart
