from __future__ import annotations

from meridio.runtime.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, Health


def test_aggregates_follow_their_sub_checks() -> None:
    health = Health()
    nsp = health.register("NSPCli", ["Readiness", "Liveness"])
    boot = health.register("Boot", ["Startup"])
    health.start()
    assert health.status("Readiness") == NOT_SERVING
    nsp.set(True)
    assert health.status("Readiness") == SERVING
    assert health.status("Liveness") == SERVING
    assert health.status("Startup") == NOT_SERVING
    boot.set(True)
    assert health.status("Startup") == SERVING
    assert health.status("NSPCli") == SERVING
    assert health.status("nonsense") == SERVICE_UNKNOWN


def test_shutdown_turns_readiness_off_only() -> None:
    health = Health()
    health.register("X").set(True)
    health.start()
    version = health.version
    health.begin_shutdown()
    assert health.version > version
    assert health.status("Readiness") == NOT_SERVING
    assert health.status("Liveness") == SERVING
    assert health.status("") == NOT_SERVING


def test_startup_and_readiness_wait_for_the_role_to_start() -> None:
    # no sub-check registered yet: "every one of none" is serving, which must not read as ready
    health = Health()
    assert health.status("Readiness") == NOT_SERVING
    assert health.status("Startup") == NOT_SERVING
    assert health.status("Liveness") == SERVING  # a starting process is alive
    health.register("X").set(True)
    assert health.status("Readiness") == NOT_SERVING
    health.start()
    assert health.status("Readiness") == SERVING and health.status("Startup") == SERVING
