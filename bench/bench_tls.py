"""The cost of mutual TLS: NSP Register and IPAM Allocate rates with and without it, same run.

Two NSPs and two IPAMs run side by side in one throw-away namespace, on TCP (127.0.0.1): one of
each with mutual TLS and the authorization table (certificates from a throwaway CA), one in
plain text (``insecure``). The same request plan is sent to each, alternating plain and TLS
passes so that drift of the machine hits both alike. The clients are grpcio (gRPC's C core) in
spawned processes, each with its connections opened off the clock, so a rate is what the daemon
does per call over an established connection. A last part opens a new connection for every
call: the handshake's price (ECDSA P-256 certificates, TLS 1.3).

Certificate reload: an NSP with mutual TLS and its default reload interval gets a new
certificate in its directory (as cert-manager or SPIRE writes one), at random moments; the
time until a new handshake is presented the new certificate.

    python -m bench.bench_tls
    python -m bench.bench_tls reload          # the certificate reload only (about 30 s)
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import random
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import progress
from meridio import pki
from meridio.api.ipam.v1 import Child, IpFamily, Subnet
from meridio.api.nsp.v1 import Conduit, Stream, Target, TargetStatus, Trench
from meridio.settings import CommonSettings
from tests.netns.daemons import IPAM_PREFIXES, Daemon, bench_netns, run_async
from tests.netns.tlsclient import client_context, netns_socket

TARGETS = 1000
CHILDREN = 2000
PROCESSES = 2
TASKS_PER_PROCESS = 4
PASSES = 4
IPAM_PASSES = 2  # 2000 new children each: a node prefix (/24) holds 254
HANDSHAKES = 300
RELOADS = 6
SERVER_NAME = "meridio.test"  # a DNS SAN of the servers' certificates: grpcio checks host names
PORTS = {("nsp", True): 7778, ("nsp", False): 7788, ("ipam", True): 7777, ("ipam", False): 7787}
CONFIG = {
    "trench": {"name": "trench-a"},
    "conduits": {"items": [{"name": "conduit-a", "trench": "trench-a"}]},
    "streams": {
        "items": [{"name": "stream-a", "conduit": "conduit-a", "max-targets": 2 * TARGETS}]
    },
}
CLONE_NEWNET = 0x40000000


def target(i: int, status: TargetStatus = TargetStatus.ENABLED) -> bytes:
    conduit = Conduit(name="conduit-a", trench=Trench(name="trench-a"))
    return bytes(
        Target(
            ips=[f"198.18.{i // 250}.{i % 250 + 1}/16", f"fd00:20::{i + 1:x}/64"],
            context={"identifier": str(i + 1)},
            status=status,
            stream=Stream(name="stream-a", conduit=conduit),
        )
    )


def child(i: int, prefix: str) -> bytes:
    family = IpFamily.IPV4 if i % 2 == 0 else IpFamily.IPV6
    conduit = Conduit(name="conduit-a", trench=Trench(name="trench-a"))
    return bytes(
        Child(
            name=f"{prefix}-{i}",
            subnet=Subnet(conduit=conduit, node=f"node-{i // 2 % 10}", ip_family=family),
        )
    )


# -- load processes (spawned: grpcio does not survive a fork) -------------------------------------


def _enter(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{netns}", "rb") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")


def _credentials(creds: str | None) -> Any:
    import grpc

    if creds is None:
        return None
    d = Path(creds)
    return grpc.ssl_channel_credentials(
        (d / "ca.crt").read_bytes(), (d / "tls.key").read_bytes(), (d / "tls.crt").read_bytes()
    )


def _channel(target: str, creds: Any, options: list[tuple[str, Any]]) -> Any:
    import grpc

    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(
        target, creds, options=[*options, ("grpc.ssl_target_name_override", SERVER_NAME)]
    )


OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel


def _worker(
    netns: str,
    target: str,
    creds_dir: str | None,
    path: str,
    parts: list[list[bytes]],
    fresh: bool,
    barrier: Any,
    results: Any,
) -> None:
    _enter(netns)

    async def main() -> tuple[float, float, int]:
        creds = _credentials(creds_dir)
        if fresh:  # a new connection (and handshake) for every call
            barrier.wait(120)
            started = time.monotonic()

            async def one(request: bytes) -> None:
                ch = _channel(target, creds, OPTIONS)
                try:
                    await ch.unary_unary(path)(request, timeout=60)
                finally:
                    await ch.close()

            async def run(part: list[bytes]) -> None:
                for request in part:
                    await one(request)

            await asyncio.gather(*(run(p) for p in parts))
            return started, time.monotonic(), sum(len(p) for p in parts)
        channels = [_channel(target, creds, OPTIONS) for _ in parts]
        calls = [ch.unary_unary(path) for ch in channels]
        try:
            for call, part in zip(calls, parts, strict=True):
                await call(part[0], timeout=60)  # connects, off the clock
            barrier.wait(120)
            started = time.monotonic()

            async def run_on(call: Any, part: list[bytes]) -> None:
                for request in part[1:]:
                    await call(request, timeout=60)

            await asyncio.gather(*(run_on(c, p) for c, p in zip(calls, parts, strict=True)))
            return started, time.monotonic(), sum(len(p) - 1 for p in parts)
        finally:
            for ch in channels:
                await ch.close()

    try:
        results.put((*asyncio.run(main()), None))
    except BaseException as exc:
        results.put((0.0, 0.0, 0, f"{type(exc).__name__}: {exc}"))
        barrier.abort()


def rate(
    netns: str,
    port: int,
    creds: Path | None,
    path: str,
    plan: list[list[bytes]],
    *,
    fresh: bool = False,
) -> float:
    """Calls per second of ``plan`` (a list of requests per task) against 127.0.0.1:port."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    results = ctx.Queue()
    target = f"127.0.0.1:{port}"
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                netns,
                target,
                str(creds) if creds else None,
                path,
                plan[i::PROCESSES],
                fresh,
                barrier,
                results,
            ),
        )
        for i in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        try:
            barrier.wait(120)
        except Exception:
            got = [results.get(timeout=10) for _ in procs]
            raise RuntimeError(f"load process failed: {[g[3] for g in got if g[3]]}") from None
        got = [results.get(timeout=600) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    errors = [g[3] for g in got if g[3]]
    if errors:
        raise RuntimeError(f"load process failed: {errors[0]}")
    calls = sum(g[2] for g in got)
    return calls / (max(g[1] for g in got) - min(g[0] for g in got))


def split(requests: list[bytes], warmup: bytes | None) -> list[list[bytes]]:
    """Requests spread over the tasks; each task's list starts with ``warmup`` (connects)."""
    tasks = PROCESSES * TASKS_PER_PROCESS
    return [([warmup] if warmup else []) + requests[k::tasks] for k in range(tasks)]


# -- the run ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used so far (seconds)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(ns: Any, workdir: Path) -> None:
    ca = pki.make_ca()

    def issue(role: str, name: str, dns: tuple[str, ...] = ()) -> Path:
        cert, key = pki.make_svid(
            ca, f"spiffe://{ca.trust_domain}/meridio/{role}/{name}", dns_names=dns
        )
        out = workdir / "pki" / name
        pki.write_credentials(out, pki.cert_pem(cert), pki.key_pem(key), ca.pem)
        return out

    client = issue("proxy", "bench-client")
    config = workdir / "meridio-configuration.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    daemons: dict[tuple[str, bool], Daemon] = {}
    for role, tls in PORTS:
        args = [f"--listen=127.0.0.1:{PORTS[role, tls]}"]
        if tls:
            args.append(f"--tls-dir={issue(role, f'{role}-tls', (SERVER_NAME,))}")
        if role == "nsp":
            args += [f"--configuration-file={config}", "--entry-timeout=3600"]
        else:
            args += list(IPAM_PREFIXES)
        name = f"{role}-{'tls' if tls else 'plain'}"
        daemons[role, tls] = Daemon(ns, role, workdir / name, *args)
    for d in daemons.values():
        d.spawn()
    for d in daemons.values():
        run_async(d.ready(30))
    progress("two NSPs and two IPAMs ready (TLS and plain text)")

    results: dict[str, dict[bool, list[float]]] = {}
    cpu: dict[str, dict[bool, list[float]]] = {}
    flip = [False]

    def run(label: str, role: str, path: str, plan: list[list[bytes]], fresh: bool = False) -> None:
        # plain first, then TLS first next time: neither always gets the warmer machine
        order = (True, False) if flip[0] else (False, True)
        flip[0] = not flip[0]
        calls = sum(len(p) for p in plan) - (0 if fresh else len(plan))
        for tls in order:
            creds = client if tls else None
            pid = daemons[role, tls].pid
            before = cpu_seconds(pid)
            value = rate(ns.name, PORTS[role, tls], creds, path, plan, fresh=fresh)
            used = cpu_seconds(pid) - before
            results.setdefault(label, {}).setdefault(tls, []).append(value)
            cpu.setdefault(label, {}).setdefault(tls, []).append(used / calls)

    register = "/nsp.v1.TargetRegistry/Register"
    tasks = PROCESSES * TASKS_PER_PROCESS
    # each task's first call (off the clock) registers, then enables, an extra target of its own
    new = [
        [target(TARGETS + k, TargetStatus.DISABLED), *p]
        for k, p in enumerate(
            split([target(i, TargetStatus.DISABLED) for i in range(TARGETS)], None)
        )
    ]
    enable = [
        [target(TARGETS + k), *p]
        for k, p in enumerate(split([target(i) for i in range(TARGETS)], None))
    ]
    assert len(new) == len(enable) == tasks
    run("NSP Register, new targets (commit)", "nsp", register, new)
    run("NSP Register, enable (commit)", "nsp", register, enable)
    for _ in range(PASSES):
        run("NSP Register, refresh (keepalive)", "nsp", register, enable)
    progress("NSP passes done")
    allocate = "/ipam.v1.Ipam/Allocate"
    for n in range(IPAM_PASSES):
        plan = split([child(i, f"p{n}") for i in range(CHILDREN)], child(0, "warm"))
        run("IPAM Allocate, new children (commit)", "ipam", allocate, plan)
    again = split([child(i, "p0") for i in range(CHILDREN)], child(0, "warm"))
    run("IPAM Allocate, known children (idempotent)", "ipam", allocate, again)
    progress("IPAM passes done")
    handshakes = split([target(i) for i in range(HANDSHAKES)], None)
    run("NSP Register, a new connection per call", "nsp", register, handshakes, fresh=True)
    progress("new-connection passes done")
    alive = all(d.alive() for d in daemons.values())
    refused = sum(
        1 for d in daemons.values() for r in d.log_records() if "refused" in str(r.get("event"))
    )
    for d in daemons.values():
        run_async(d.stop())

    print(f"\n  {'calls per second':<52} {'plain':>9} {'mTLS':>9} {'mTLS/plain':>11}")
    for label, by in results.items():
        plain, tls = statistics.mean(by[False]), statistics.mean(by[True])
        print(f"  {label:<52} {plain:>9,.0f} {tls:>9,.0f} {tls / plain:>10.2f}x", flush=True)
    print(f"\n  {'daemon CPU per call (ms)':<52} {'plain':>9} {'mTLS':>9} {'mTLS/plain':>11}")
    for label, by in cpu.items():
        plain, tls = statistics.mean(by[False]), statistics.mean(by[True])
        print(
            f"  {label:<52} {plain * 1000:>9.3f} {tls * 1000:>9.3f} {tls / plain:>10.2f}x",
            flush=True,
        )
    print(
        f"\n  {PROCESSES}x{TASKS_PER_PROCESS} grpcio connections over TCP on loopback in one "
        f"namespace; {TARGETS} targets, {CHILDREN} children per pass; plain and TLS passes "
        f"alternate; the last line opens a connection per call ({HANDSHAKES} calls, "
        f"{PROCESSES}x{TASKS_PER_PROCESS} at a time). Daemons alive at the end: {alive}; "
        f"refusals logged: {refused}",
        flush=True,
    )


def served_certificate(netns: str, port: int, client: Path) -> bytes | None:
    """The certificate (DER) a new handshake with the daemon is presented; None on failure."""
    ctx = client_context(client / "tls.crt", client / "tls.key", client / "ca.crt")
    try:
        sock = netns_socket(netns, "127.0.0.1", port)
        sock.setblocking(True)
        sock.settimeout(5)
        with ctx.wrap_socket(sock, server_hostname=SERVER_NAME) as tls:
            return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def measure_reload(ns: Any, workdir: Path) -> list[float]:
    """Seconds from a new certificate in the NSP's directory to a handshake presenting it."""
    ca = pki.make_ca()
    spiffe = f"spiffe://{ca.trust_domain}/meridio"

    def issue(out: Path, spiffe_id: str) -> bytes:
        cert, key = pki.make_svid(ca, spiffe_id, dns_names=(SERVER_NAME,))
        pki.write_credentials(out, pki.cert_pem(cert), pki.key_pem(key), ca.pem)
        return ssl.PEM_cert_to_DER_cert(pki.cert_pem(cert).decode())

    client = workdir / "pki" / "reload-client"
    issue(client, f"{spiffe}/proxy/reload-client")
    server = workdir / "pki" / "reload-nsp"
    issue(server, f"{spiffe}/nsp/reload-nsp")
    config = workdir / "reload-configuration.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    port = PORTS["nsp", True]
    daemon = Daemon(
        ns,
        "nsp",
        workdir / "reload",
        f"--listen=127.0.0.1:{port}",
        f"--tls-dir={server}",
        f"--configuration-file={config}",
    )
    run_async(daemon.start(30))
    delays: list[float] = []
    try:
        for _ in range(RELOADS):
            # at a random moment of the daemon's poll period
            time.sleep(random.uniform(0, CommonSettings().tls_reload_interval))
            wanted = issue(server, f"{spiffe}/nsp/reload-nsp")
            started = time.monotonic()
            while served_certificate(ns.name, port, client) != wanted:
                if time.monotonic() - started > 60:
                    raise RuntimeError(f"the new certificate was not served:\n{daemon.log_text()}")
                time.sleep(0.01)
            delays.append(time.monotonic() - started)
    finally:
        run_async(daemon.stop())
    return delays


def print_reload(delays: list[float]) -> None:
    interval = CommonSettings().tls_reload_interval
    print(
        f"\n  certificate replaced -> served (reload interval {interval:g} s, {len(delays)} "
        f"times): p50 {statistics.median(delays):.2f} s, max {max(delays):.2f} s",
        flush=True,
    )


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mbench-tls-", dir="/tmp"))
    try:
        with bench_netns() as ns:
            if "reload" not in sys.argv[1:]:
                measure(ns, workdir)
            print_reload(measure_reload(ns, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
