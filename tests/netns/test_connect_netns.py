"""Least authority at the connect API: a veth end goes only into the caller's own namespace.

A real LB serves its connect endpoint on a unix socket (the caller is known by SO_PEERCRED).
A client in a namespace of its own asks for veth connections naming its own namespace (served:
the link appears there), another process's namespace, the host's (``/proc/1/ns/net``), the
endpoint's own (``/proc/self/ns/net``), arbitrary files and a ``/run/netns`` name that is not
on the allow-list (each PERMISSION_DENIED, nothing made, the refusal logged), and a
``/run/netns`` name on the allow-list (served). Over TCP the same rule is checked by
tests/netns/test_conduit.py (targets and proxies connect over TCP there).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.netns.daemons import run_async
from tests.netns.lbtopo import CONDUIT, TRENCH, lb_daemon, start_nsp
from tests.waiting import wait_until

pytestmark = pytest.mark.netns

SERVICE = f"{CONDUIT}.{TRENCH}"

CALLS = r"""
import asyncio, json, os, sys
import grpclib
from grpclib.client import Channel
from meridio.api.meridio.connect.v1 import ConnectRequest, ConnectStub, Mechanism, Veth

sock, service, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

async def main():
    ch = Channel(path=sock)
    stub = ConnectStub(ch, timeout=10)
    out = {}
    for i, (name, path) in enumerate(cases.items()):
        path = path.replace("{pid}", str(os.getpid()))
        request = ConnectRequest(
            network_service=service, connection_id=f"c-{name}", client_name="probe",
            mechanisms=[Mechanism(type="veth", interface_name=f"p-{name}"[:15],
                                  veth=Veth(netns_path=path))],
            client_addresses=[f"198.18.9.{4 * i + 2}/30"],
            endpoint_addresses=[f"198.18.9.{4 * i + 1}/30"],
        )
        try:
            await stub.request(request)
            out[name] = ["OK", ""]
        except grpclib.GRPCError as exc:
            out[name] = [exc.status.name, exc.message]
    ch.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def links(ns: Any) -> set[str]:
    out = ns.run("ip", "-j", "link", "show").stdout
    return {link["ifname"] for link in json.loads(out)}


def test_connect_accepts_only_the_callers_namespace(
    netns_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("cnetns")
    lb_ns, client_ns = netns_factory("lb"), netns_factory("cl")
    other_ns, allowed_ns = netns_factory("ot"), netns_factory("al")
    sleeper = other_ns.popen("sleep", "600")  # another process, in another namespace
    other_pid = sleeper.pid
    # `ip netns exec` execs the command: its pid is the sleeper's; wait until it has entered
    wait_until(
        lambda: (
            Path(f"/proc/{other_pid}/ns/net").stat().st_ino
            == Path(f"/run/netns/{other_ns.name}").stat().st_ino
        ),
        what="the sleeper in its namespace",
    )
    nsp = start_nsp(lb_ns, workdir / "nsp")
    sock = workdir / "connect.sock"
    lb = lb_daemon(
        lb_ns,
        workdir / "lb",
        nsp,
        "kernel",
        f"--connect-listen=unix://{sock}",
        "--connect-advertise=198.18.9.254:7779",  # announced in NSP (never dialled here)
        "--connect-mechanisms=veth",
        f"--connect-netns-allow={allowed_ns.name}",
    )
    try:
        run_async(lb.start(timeout=30))
        wait_until(sock.exists, what="the connect endpoint up")
        cases = {
            "own": "/proc/{pid}/ns/net",
            "other": f"/proc/{other_pid}/ns/net",
            "host": "/proc/1/ns/net",
            "self": "/proc/self/ns/net",
            "file": "/etc/passwd",
            "dotdot": f"/run/netns/../netns/{client_ns.name}",
            "unlisted": f"/run/netns/{other_ns.name}",
            "allowed": f"/run/netns/{allowed_ns.name}",
        }
        result = client_ns.run(
            sys.executable, "-c", CALLS, str(sock), SERVICE, json.dumps(cases), check=False
        )
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["own"] == ["OK", ""]
        assert out["allowed"] == ["OK", ""]
        for name in ("other", "host", "self", "file", "dotdot", "unlisted"):
            assert out[name][0] == "PERMISSION_DENIED", (name, out[name])
        assert "is not the caller's: the calling process" in out["other"][1]
        # the LB, bounded to its capabilities, may not even open pid 1's namespace
        assert any(
            m in out["host"][1] for m in ("is not the caller's", "cannot open the client's netns")
        ), out["host"]
        assert "is not the caller's: the calling process" in out["unlisted"][1]
        for name in ("self", "file", "dotdot"):
            assert "is not a reference this endpoint accepts" in out[name][1], out[name]
        # the served ones have their links, the refused ones none
        assert "p-own" in links(client_ns)
        assert "p-allowed" in links(allowed_ns)
        assert not {n for n in links(other_ns) if n.startswith("p-")}
        assert not {n for n in links(client_ns) if n.startswith("p-") and n != "p-own"}
        refused = [
            r
            for r in lb.log_records()
            if r.get("event") == "connect refused: netns not the caller's"
        ]
        assert {r["netns"] for r in refused} == {
            cases[n] for n in ("other", "host", "self", "file", "dotdot", "unlisted")
        }
        assert all(r["caller"].startswith("pid ") for r in refused)
    finally:
        for daemon in (lb, nsp):
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
        sleeper.kill()
        sleeper.wait(5)
