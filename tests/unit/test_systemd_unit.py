"""config/systemd: the unit passes ``systemd-analyze verify`` and its env files are real settings.

PID 1 here is not systemd, so the unit cannot be started; ``systemd-analyze verify`` loads it
offline (with its drop-ins) and fails on errors, and prints a warning for anything it ignores,
which counts as a failure here too. ``ExecStart=`` must name an executable, so the check runs on
a copy pointing at this environment's meridiod instead of /opt/meridio/bin/meridiod.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meridio.roles.base import load_role
from meridio.settings import RESERVED_ENV, load_settings, setting_names

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "config" / "systemd"
UNIT = SYSTEMD / "meridiod@.service"
INSTALLED_MERIDIOD = "/opt/meridio/bin/meridiod"
MERIDIOD = Path(sys.executable).parent / "meridiod"
ROLES = ("ipam", "nsp", "lb", "proxy", "target")
EXAMPLE_CONFIGURATION = REPO / "config" / "examples" / "meridio-configuration.yaml"
# systemd-analyze security's exposure (0 = locked down, 100 = unprotected); 23 when written.
MAX_EXPOSURE = 30


def unit_lines(path: Path = UNIT) -> list[tuple[str, str]]:
    """(key, value) of every assignment, in order (systemd allows a key more than once)."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def unit_value(key: str, path: Path = UNIT) -> str:
    values = [v for k, v in unit_lines(path) if k == key]
    assert values, f"{key}= is not set"
    return values[-1]


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The unit, its instances (symlinks, as systemd instantiates them) and their drop-ins."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    text = UNIT.read_text()
    assert INSTALLED_MERIDIOD in text
    (tmp_path / UNIT.name).write_text(text.replace(INSTALLED_MERIDIOD, str(MERIDIOD)))
    for role in ROLES:
        (tmp_path / f"meridiod@{role}.service").symlink_to(UNIT.name)
    for dropins in SYSTEMD.glob("meridiod@*.service.d"):
        shutil.copytree(dropins, tmp_path / dropins.name)
    return tmp_path


@pytest.mark.parametrize("role", ROLES)
def test_systemd_analyze_verify(unit_dir: Path, role: str) -> None:
    unit = unit_dir / f"meridiod@{role}.service"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if str(unit_dir) in line or role in line]
    assert not ours, "systemd-analyze warned:\n" + "\n".join(ours)
    security = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--threshold={MAX_EXPOSURE}",
            "--no-pager",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout[-3000:] + security.stderr


def test_the_unit_is_what_the_daemon_expects() -> None:
    assert unit_value("Type") == "notify"
    assert unit_value("NotifyAccess") == "main"
    assert unit_value("ExecStart") == INSTALLED_MERIDIOD
    assert unit_value("Environment") == "MERIDIOD_ROLE=%i"
    assert unit_value("EnvironmentFile") == "/etc/meridio/%i.env"
    assert unit_value("Restart") == "on-failure"
    assert unit_value("ExecReload") == "/bin/kill -HUP $MAINPID"  # SIGHUP reloads
    # The run-dir default (/run/meridio/<role>) and the databases' (/var/lib/meridio/<role>.db).
    assert unit_value("RuntimeDirectory") == "meridio/%i"
    assert unit_value("StateDirectory") == "meridio"
    for role in ("ipam", "nsp"):
        database = load_role(role).Settings().database  # type: ignore[attr-defined]
        assert Path(database).parent == Path("/var/lib/meridio")
    watchdog = int(unit_value("WatchdogSec"))
    assert 10 <= watchdog <= 300
    # SIGTERM drains for drain-timeout before the exit: systemd must wait longer than that.
    assert float(unit_value("TimeoutStopSec")) > load_role("lb").Settings().drain_timeout + 10
    capabilities = set(unit_value("CapabilityBoundingSet").split())
    assert capabilities == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    for role in ("ipam", "nsp"):
        dropin = SYSTEMD / f"meridiod@{role}.service.d" / "capabilities.conf"
        assert unit_value("CapabilityBoundingSet", dropin) == ""
    # The LB's BIRD: BGP on a port below 1024 (the assignment adds to the unit's set).
    bird = SYSTEMD / "meridiod@lb.service.d" / "bird.conf"
    assert unit_value("CapabilityBoundingSet", bird) == "CAP_NET_BIND_SERVICE"
    # BIRD, a child of the LB, must not outlive it: control-group or mixed kill what is left.
    assert unit_value("KillMode") in ("control-group", "mixed")


@pytest.mark.parametrize("role", ROLES)
def test_env_files_hold_settings_of_their_role(role: str, tmp_path: Path) -> None:
    path = SYSTEMD / f"{role}.env"
    environ = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            assert name.startswith("MERIDIOD_"), f"{path.name}: {line}"
            assert name not in RESERVED_ENV, f"{path.name}: the instance name is the role"
            environ[name] = value
    assert environ
    try:
        role_cls = load_role(role)
    except LookupError:
        pytest.skip(f"role {role!r} is not installed yet: {path.name} is provisional")
    known = setting_names(role_cls.Settings)
    for name in environ:
        key = name.removeprefix("MERIDIOD_").lower().replace("_", "-")
        assert key in known, f"{path.name}: {name} is not a setting of the {role} role"
    if "MERIDIOD_CONFIGURATION_FILE" in environ:
        environ["MERIDIOD_CONFIGURATION_FILE"] = str(EXAMPLE_CONFIGURATION)
    role_cls.check_settings(load_settings(role_cls.Settings, environ=environ))
