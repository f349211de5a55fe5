"""NetfilterQueue (the ``lb`` extra) and rich (the ``cli`` extra) are optional: the roles that do
not use them load without them, the LB and meridioctl say what to install.

Each case runs in a fresh interpreter where the module is made unimportable
(``sys.modules[name] = None``), as on an install without the extra.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from meridio.roles.base import BUILTIN_ROLES


def without(modules: tuple[str, ...], code: str, *args: str) -> subprocess.CompletedProcess[str]:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_roles_other_than_the_lb_load_without_either_extra() -> None:
    others = sorted(set(BUILTIN_ROLES) - {"lb"})
    out = without(
        ("netfilterqueue", "rich"),
        f"""
        from meridio.roles.base import load_role
        for name in {others!r}:
            load_role(name)
        print("loaded")
        """,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded"


def test_the_lb_without_netfilterqueue_says_what_to_install() -> None:
    out = without(
        ("netfilterqueue",),
        """
        from meridio.daemon import main
        main()
        """,
        "--role=lb",
        "--trench=t",
    )
    assert out.returncode == 2
    assert "role 'lb' needs NetfilterQueue" in out.stderr
    assert "pip install 'meridio[lb]'" in out.stderr


def test_meridioctl_tables_without_rich_are_plain_columns() -> None:
    out = without(
        ("rich",),
        """
        from meridio.ctl import render
        rows = [{"service": "", "status": "SERVING"}, {"service": "Liveness", "status": None}]
        render(rows, ["service", "status"], "table", "health of x")
        """,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "health of x",
        "service   status",
        "          SERVING",
        "Liveness",
    ]


@pytest.mark.parametrize(
    ("command", "args"), [("lab", ["up"]), ("traffic", ["--help"]), ("demo", [])]
)
def test_meridioctl_commands_that_need_rich_say_what_to_install(
    command: str, args: list[str]
) -> None:
    out = without(
        ("rich",),
        """
        from meridio.ctl import main
        main()
        """,
        command,
        *args,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"'meridioctl {command}' needs rich" in out.stderr
    assert "pip install 'meridio[cli]'" in out.stderr
