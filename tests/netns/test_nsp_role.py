"""``meridiod --role=nsp``: target registry and configuration manager on a real daemon."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import betterproto
import pytest
import yaml
from grpclib.const import Status

from meridio.api.meridio.nsp.v1 import TargetRegistryBatchStub, Update, UpdateRequest
from meridio.api.nsp.v1 import (
    Attractor,
    Conduit,
    ConfigurationManagerStub,
    Flow,
    Gateway,
    Stream,
    Target,
    TargetRegistryStub,
    TargetResponse,
    TargetStatus,
    TargetType,
    Trench,
    Vip,
)
from tests.netns.daemons import (
    SERVING,
    Daemon,
    aio_test,
    channel,
    grpc_error,
    health_status,
    watching,
)
from tests.waiting import HANG, wait_until_async

pytestmark = pytest.mark.netns

EXAMPLE = Path(__file__).resolve().parents[2] / "config/examples/meridio-configuration.yaml"

# The data mapping written inline (shape (c)): two conduits, three streams.
CONFIG: dict[str, Any] = {
    "trench": {"name": "trench-a"},
    "conduits": {
        "items": [
            {"name": "conduit-a", "trench": "trench-a"},
            {"name": "conduit-b", "trench": "trench-a"},
        ]
    },
    "streams": {
        "items": [
            {"name": "stream-a", "conduit": "conduit-a", "max-targets": 4},
            {"name": "stream-b", "conduit": "conduit-a"},
            {"name": "stream-c", "conduit": "conduit-b", "max-targets": 2},
        ]
    },
    "vips": {"items": [{"name": "vip-1", "address": "203.0.113.1", "trench": "trench-a"}]},
    "flows": {
        "items": [
            {
                "name": "flow-a",
                "stream": "stream-a",
                "vips": ["vip-1"],
                "protocols": ["tcp"],
                "destination-port-ranges": ["80"],
            }
        ]
    },
}


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Replace the file atomically (as a ConfigMap mount does), so a poll never sees half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)


def stream(name: str = "", conduit: str = "", trench: str = "") -> Stream:
    return Stream(name=name, conduit=Conduit(name=conduit, trench=Trench(name=trench)))


def target(
    ip: str,
    stream_name: str = "stream-a",
    conduit: str = "conduit-a",
    *,
    identifier: str = "1",
    status: TargetStatus = TargetStatus.ENABLED,
    type_: TargetType = TargetType.DEFAULT,
) -> Target:
    ips = [ip, f"fd00:20::{ip.rsplit('.', 1)[-1].split('/')[0]}/64"]
    return Target(
        ips=ips,
        context={"identifier": identifier},
        status=status,
        type=type_,
        stream=stream(stream_name, conduit, "trench-a"),
    )


def summary(response: TargetResponse) -> list[tuple[str, str, str]]:
    """(first IP, status name, stream name) of every target in a Watch message."""
    return [(t.ips[0], TargetStatus(t.status).name, t.stream.name) for t in response.targets]


ANY = Target(status=TargetStatus.ANY)


class Nsp:
    def __init__(self, daemon: Daemon, ch: Any) -> None:
        self.daemon = daemon
        self.registry = TargetRegistryStub(ch, timeout=5)
        self.batch = TargetRegistryBatchStub(ch, timeout=5)
        self.config = ConfigurationManagerStub(ch)

    async def enable(self, t: Target) -> None:
        """Register twice: a new target is stored DISABLED, the second call enables it."""
        await self.registry.register(t)
        await self.registry.register(t)

    async def snapshot(self, filter: Target = ANY) -> list[tuple[str, str, str]]:
        async with watching(lambda: self.registry.watch(filter)) as w:
            return summary(await w.next())


@asynccontextmanager
async def nsp(
    netns: Any, tmp_path: Path, *args: str, config: dict[str, Any] | None = CONFIG
) -> AsyncIterator[Nsp]:
    extra = list(args)
    if config is not None:
        path = tmp_path / "meridio-configuration.yaml"
        if not path.exists():
            write_config(path, config)
        extra.append(f"--configuration-file={path}")
    daemon = await Daemon(netns, "nsp", tmp_path / "nsp", *extra).start()
    async with channel(daemon.socket) as ch:
        yield Nsp(daemon, ch)


# -- target registry ---------------------------------------------------------------------------


@aio_test
async def test_register_stores_disabled_then_enables_then_unregister_removes(
    netns: Any, tmp_path: Path
) -> None:
    async with nsp(netns, tmp_path) as n:
        t = target("198.18.1.1/24")
        async with (
            watching(lambda: n.registry.watch(ANY)) as any_status,
            watching(lambda: n.registry.watch(Target())) as enabled_only,
        ):
            assert summary(await any_status.next()) == []
            assert summary(await enabled_only.next()) == []

            await n.registry.register(t)  # asks for ENABLED, stored DISABLED
            assert summary(await any_status.next()) == [("198.18.1.1/24", "DISABLED", "stream-a")]
            await enabled_only.assert_quiet(0.3)

            await n.registry.register(t)
            enabled = [("198.18.1.1/24", "ENABLED", "stream-a")]
            assert summary(await enabled_only.next()) == enabled
            reply = await any_status.next()
            assert summary(reply) == enabled
            stored = reply.targets[0]
            assert stored.context == {"identifier": "1"}
            assert stored.stream.conduit.trench.name == "trench-a"
            assert stored.type == TargetType.DEFAULT

            await n.registry.unregister(t)
            assert summary(await any_status.next()) == []
            assert summary(await enabled_only.next()) == []
            await n.registry.unregister(t)  # unknown: silent, and no change to report
            await any_status.assert_quiet(0.3)


@aio_test
async def test_watch_sends_the_full_snapshot_first_and_after_every_change(
    netns: Any, tmp_path: Path
) -> None:
    async with nsp(netns, tmp_path) as n:
        a = target("198.18.1.1/24", identifier="1")
        b = target("198.18.1.2/24", identifier="2")
        c = target("198.18.1.3/24", identifier="3")
        await n.enable(a)
        await n.enable(b)
        async with watching(lambda: n.registry.watch(Target())) as w:
            first = await w.next()
            assert [ip for ip, _, _ in summary(first)] == ["198.18.1.1/24", "198.18.1.2/24"]
            # A keepalive (same registration) is not a change.
            await n.registry.register(a)
            await w.assert_quiet(0.3)
            await n.enable(c)
            full = await w.next()
            assert [ip for ip, _, _ in summary(full)] == [
                "198.18.1.1/24",
                "198.18.1.2/24",
                "198.18.1.3/24",
            ]
            # Disabling one drops it from the ENABLED view: the full list again, not a delta.
            await n.registry.register(
                target("198.18.1.2/24", identifier="2", status=TargetStatus.DISABLED)
            )
            assert [ip for ip, _, _ in summary(await w.next())] == [
                "198.18.1.1/24",
                "198.18.1.3/24",
            ]
            # A context change is a change too.
            await n.registry.register(target("198.18.1.3/24", identifier="4"))
            changed = await w.next()
            assert [t.context["identifier"] for t in changed.targets] == ["1", "4"]
        # A new watcher starts from the current state.
        assert await n.snapshot(Target()) == [
            ("198.18.1.1/24", "ENABLED", "stream-a"),
            ("198.18.1.3/24", "ENABLED", "stream-a"),
        ]


@aio_test
async def test_watch_filters_by_type_status_and_stream_hierarchy(
    netns: Any, tmp_path: Path
) -> None:
    async with nsp(netns, tmp_path) as n:
        await n.enable(target("198.18.1.1/24", "stream-a"))
        await n.enable(target("198.18.1.2/24", "stream-b"))
        await n.enable(target("198.18.1.3/24", "stream-c", "conduit-b"))
        await n.registry.register(target("198.18.1.4/24", "stream-b", identifier="2"))  # DISABLED
        frontend = Target(
            ips=["198.18.2.1/24"],
            type=TargetType.FRONTEND,
            stream=Stream(conduit=Conduit(trench=Trench(name="trench-a"))),
        )
        await n.enable(frontend)

        def ips(rows: list[tuple[str, str, str]]) -> set[str]:
            return {ip.removeprefix("198.18.").removesuffix("/24") for ip, _, _ in rows}

        cases = {
            "everything enabled": (Target(), {"1.1", "1.2", "1.3"}),
            "any status": (ANY, {"1.1", "1.2", "1.3", "1.4"}),
            "disabled only": (Target(status=TargetStatus.DISABLED), {"1.4"}),
            "full path": (Target(stream=stream("stream-a", "conduit-a", "trench-a")), {"1.1"}),
            "conduit only": (Target(stream=stream(conduit="conduit-a")), {"1.1", "1.2"}),
            "conduit, any": (
                Target(status=TargetStatus.ANY, stream=stream(conduit="conduit-a")),
                {"1.1", "1.2", "1.4"},
            ),
            "stream name only": (Target(stream=stream("stream-c")), {"1.3"}),
            "trench only": (Target(stream=stream(trench="trench-a")), {"1.1", "1.2", "1.3"}),
            "other trench": (Target(stream=stream(trench="trench-x")), set()),
            "wrong conduit": (Target(stream=stream("stream-a", "conduit-b")), set()),
            "frontends": (Target(type=TargetType.FRONTEND), {"2.1"}),
            "frontends in trench": (
                Target(type=TargetType.FRONTEND, stream=stream(trench="trench-a")),
                {"2.1"},
            ),
        }
        for what, (filter, expected) in cases.items():
            assert ips(await n.snapshot(filter)) == expected, what


@aio_test
async def test_registrations_expire_without_keepalive(netns: Any, tmp_path: Path) -> None:
    async with nsp(netns, tmp_path, "--entry-timeout=1") as n:
        kept = target("198.18.1.1/24", identifier="1")
        dropped = target("198.18.1.2/24", identifier="2")
        async with watching(lambda: n.registry.watch(ANY)) as w:
            assert summary(await w.next()) == []
            registering = time.monotonic()
            await n.registry.register(kept)
            await n.registry.register(dropped)
            await w.until(lambda m: len(m.targets) == 2)

            async def refresh_kept_until_only_it_is_left() -> None:
                # a keepalive every 0.25 s (a paced sender, well inside entry-timeout)
                while True:
                    await n.registry.register(kept)
                    try:
                        message = await w.next(0.25)
                    except AssertionError:
                        continue
                    if [ip for ip, _, _ in summary(message)] == ["198.18.1.1/24"]:
                        return

            async with asyncio.timeout(HANG):
                await refresh_kept_until_only_it_is_left()
            # the unrefreshed one went, and not before its entry-timeout (a lower bound: the
            # clock started before it was registered, a slow machine only adds to it)
            assert time.monotonic() - registering >= 1.0
            assert [ip for ip, _, _ in await n.snapshot()] == ["198.18.1.1/24"]
            # Once its keepalives stop, the other one goes too.
            message = await w.next()
            assert summary(message) == []


@aio_test
async def test_invalid_registrations_are_refused_and_nothing_is_stored(
    netns: Any, tmp_path: Path
) -> None:
    async with nsp(netns, tmp_path) as n:
        too_many = target("198.18.1.1/24")
        too_many.ips = [f"198.18.3.{i}/24" for i in range(1, 18)]
        no_identifier = target("198.18.1.1/24")
        no_identifier.context = {}
        bad = {
            "bad IP": (target("198.18.1.300/24"), "198.18.1.300"),
            "not an IP": (Target(ips=["nope"], context={"identifier": "1"}), "nope"),
            "identifier above max-targets": (
                target("198.18.1.1/24", "stream-c", "conduit-b", identifier="3"),
                "1..2",
            ),
            "identifier 0": (target("198.18.1.1/24", identifier="0"), "identifier"),
            "identifier not a number": (target("198.18.1.1/24", identifier="x"), "identifier"),
            "unknown stream": (target("198.18.1.1/24", "stream-x"), "stream-x"),
            "stream in the wrong conduit": (target("198.18.1.1/24", "stream-c"), "stream-c"),
            "too many IPs": (too_many, "too many IPs"),
            "no IPs": (Target(context={"identifier": "1"}, stream=stream("a", "b", "c")), "IP"),
            "no identifier": (no_identifier, "identifier"),
            "status ANY": (target("198.18.1.1/24", status=TargetStatus.ANY), "ANY"),
        }
        async with watching(lambda: n.registry.watch(ANY)) as w:
            assert summary(await w.next()) == []
            for what, (request, word) in bad.items():
                err = await grpc_error(n.registry.register(request))
                assert err.status == Status.INVALID_ARGUMENT, what
                assert word in (err.message or ""), (what, err.message)
            await w.assert_quiet(0.3)
            assert await n.snapshot() == []
            # The boundary is accepted: identifier max-targets on the stream with max-targets 2.
            await n.registry.register(
                target("198.18.1.1/24", "stream-c", "conduit-b", identifier="2")
            )
            assert summary(await w.next()) == [("198.18.1.1/24", "DISABLED", "stream-c")]


@aio_test
async def test_a_batch_applies_each_update_in_order_as_register_and_unregister_would(
    netns: Any, tmp_path: Path
) -> None:
    async with nsp(netns, tmp_path) as n:
        a, b, c = (target(f"198.18.1.{i}/24", identifier=str(i)) for i in (1, 2, 3))
        await n.enable(c)
        updates = [
            Update(target=a),  # new: stored DISABLED ...
            Update(target=a),  # ... then enabled, in the same call
            Update(target=b),  # new: DISABLED
            Update(target=target("198.18.1.300/24")),  # invalid: refused alone
            Update(target=c, unregister=True),
            Update(target=target("198.18.1.9/24"), unregister=True),  # unknown: silent
        ]
        async with watching(lambda: n.registry.watch(ANY)) as w:
            assert len((await w.next()).targets) == 1
            reply = await n.batch.update(UpdateRequest(updates=updates))
            invalid = Status.INVALID_ARGUMENT.value
            assert [r.status for r in reply.results] == [0, 0, 0, invalid, 0, 0]
            assert "198.18.1.300" in reply.results[3].message
            expected = [
                ("198.18.1.1/24", "ENABLED", "stream-a"),
                ("198.18.1.2/24", "DISABLED", "stream-a"),
            ]
            assert summary(await w.next()) == expected
            # saved before the answer: a kill -9 keeps it
            n.daemon.kill()
            await w.end()
        await n.daemon.restart()
        assert await n.snapshot() == expected
        too_many = UpdateRequest(updates=[Update(target=a)] * 4097)
        err = await grpc_error(n.batch.update(too_many))
        assert err.status == Status.INVALID_ARGUMENT


@aio_test
async def test_registrations_survive_kill_9_and_watchers_get_the_snapshot_again(
    netns: Any, tmp_path: Path
) -> None:
    async with nsp(netns, tmp_path) as n:
        await n.enable(target("198.18.1.1/24", identifier="1"))
        await n.enable(target("198.18.1.3/24", "stream-c", "conduit-b", identifier="2"))
        await n.registry.register(target("198.18.1.2/24", "stream-b", identifier="7"))
        expected = await n.snapshot()
        assert len(expected) == 3
        async with watching(lambda: n.registry.watch(Target())) as w:
            assert len((await w.next()).targets) == 2
            n.daemon.kill()
            await w.end()  # the stream fails when the daemon dies
        await n.daemon.restart()
        # The same channel reconnects; a new Watch gets the persisted state as its snapshot.
        async with watching(lambda: n.registry.watch(ANY)) as w:
            reply = await w.next()
            assert summary(reply) == expected
            assert reply.targets[0].context == {"identifier": "1"}
        # They are live entries: a keepalive is not a change, an unregister is.
        async with watching(lambda: n.registry.watch(Target())) as w:
            assert len((await w.next()).targets) == 2
            await n.registry.register(target("198.18.1.1/24", identifier="1"))
            await w.assert_quiet(0.3)
            await n.registry.unregister(target("198.18.1.1/24", identifier="1"))
            assert summary(await w.next()) == [("198.18.1.3/24", "ENABLED", "stream-c")]


# -- configuration manager ---------------------------------------------------------------------


@aio_test
async def test_configuration_watches_deliver_the_configured_items_with_filters(
    netns: Any, tmp_path: Path
) -> None:
    config_file = tmp_path / "meridio-configuration.yaml"
    shutil.copy(EXAMPLE, config_file)
    async with nsp(netns, tmp_path, f"--configuration-file={config_file}", config=None) as n:
        cm = n.config

        async def first(open_stream: Any) -> Any:
            async with watching(open_stream) as w:
                return await w.next()

        trench = await first(lambda: cm.watch_trench(Trench()))
        assert trench.trench.name == "trench-a"
        no_trench = await first(lambda: cm.watch_trench(Trench(name="trench-x")))
        assert not betterproto.serialized_on_wire(no_trench.trench)

        conduits = await first(lambda: cm.watch_conduit(Conduit()))
        assert [c.name for c in conduits.conduits] == ["load-balancer"]
        assert conduits.conduits[0].trench.name == "trench-a"
        other = await first(lambda: cm.watch_conduit(Conduit(trench=Trench(name="trench-x"))))
        assert other.conduits == []

        streams = await first(lambda: cm.watch_stream(Stream()))
        assert [(s.name, s.max_targets) for s in streams.streams] == [
            ("stream-a", 100),
            ("stream-b", 100),
        ]
        assert streams.streams[0].conduit.name == "load-balancer"
        assert streams.streams[0].conduit.trench.name == "trench-a"
        only_b = await first(lambda: cm.watch_stream(Stream(name="stream-b")))
        assert [s.name for s in only_b.streams] == ["stream-b"]
        in_conduit = await first(lambda: cm.watch_stream(stream(conduit="load-balancer")))
        assert len(in_conduit.streams) == 2
        assert (await first(lambda: cm.watch_stream(stream(conduit="nope")))).streams == []

        flows = await first(lambda: cm.watch_flow(Flow(stream=Stream(name="stream-a"))))
        assert sorted(f.name for f in flows.flows) == ["flow-a-tcp", "flow-a-udp"]
        tcp = next(f for f in flows.flows if f.name == "flow-a-tcp")
        assert tcp.protocols == ["tcp"]
        assert tcp.destination_port_ranges == ["5000-5100"]
        assert sorted(v.address for v in tcp.vips) == ["2001:db8::1/128", "203.0.113.1/32"]
        assert tcp.stream.conduit.name == "load-balancer"
        all_flows = await first(lambda: cm.watch_flow(Flow()))
        assert len(all_flows.flows) == 3

        vip = await first(lambda: cm.watch_vip(Vip(name="vip-a-v6")))
        assert [(v.name, v.address) for v in vip.vips] == [("vip-a-v6", "2001:db8::1/128")]
        assert len((await first(lambda: cm.watch_vip(Vip()))).vips) == 4

        attractors = await first(lambda: cm.watch_attractor(Attractor()))
        (attractor,) = attractors.attractors
        assert attractor.name == "attractor-a"
        assert len(attractor.vips) == 4
        assert sorted(g.name for g in attractor.gateways) == [
            "gateway-static-v4",
            "gateway-v4",
            "gateway-v6",
        ]

        static = await first(lambda: cm.watch_gateway(Gateway(name="gateway-static-v4")))
        (gw,) = static.gateways
        assert (gw.protocol, gw.address, gw.ip_family, gw.bfd) == (
            "static",
            "192.0.2.2",
            "ipv4",
            True,
        )
        assert (gw.bfd_spec.min_tx, gw.bfd_spec.min_rx, gw.bfd_spec.multiplier) == (300, 300, 5)
        bgp = await first(lambda: cm.watch_gateway(Gateway(name="gateway-v4")))
        assert (bgp.gateways[0].remote_asn, bgp.gateways[0].local_asn) == (4248829953, 8103)
        assert len((await first(lambda: cm.watch_gateway(Gateway()))).gateways) == 3


def _with_stream(config: dict[str, Any], name: str, max_targets: int = 3) -> dict[str, Any]:
    new = yaml.safe_load(yaml.safe_dump(config))
    new["streams"]["items"].append(
        {"name": name, "conduit": "conduit-b", "max-targets": max_targets}
    )
    return new


@aio_test
async def test_configuration_file_edits_are_picked_up(netns: Any, tmp_path: Path) -> None:
    async with nsp(netns, tmp_path, "--config-poll-interval=0.2") as n:
        config_file = tmp_path / "meridio-configuration.yaml"
        new_target = target("198.18.5.1/24", "stream-new", "conduit-b")
        err = await grpc_error(n.registry.register(new_target))
        assert err.status == Status.INVALID_ARGUMENT
        async with (
            watching(lambda: n.config.watch_stream(Stream())) as streams,
            watching(lambda: n.config.watch_stream(stream(conduit="conduit-a"))) as conduit_a,
            watching(lambda: n.config.watch_vip(Vip())) as vips,
        ):
            assert len((await streams.next()).streams) == 3
            assert len((await conduit_a.next()).streams) == 2
            assert len((await vips.next()).vips) == 1
            # picked up by the next poll (how soon: bench_nsp, "configuration edit")
            write_config(config_file, _with_stream(CONFIG, "stream-new"))
            update = await streams.next()
            assert [s.name for s in update.streams] == [
                "stream-a",
                "stream-b",
                "stream-c",
                "stream-new",
            ]
            assert update.streams[3].max_targets == 3
            # Watchers whose filtered view did not change hear nothing.
            await conduit_a.assert_quiet(0.3)
            await vips.assert_quiet(0.1)
        # Registrations are validated against the new configuration.
        await n.registry.register(new_target)
        assert await n.snapshot() == [("198.18.5.1/24", "DISABLED", "stream-new")]


@aio_test
async def test_sighup_reloads_the_configuration(netns: Any, tmp_path: Path) -> None:
    # Polling is effectively off: only SIGHUP can make the daemon notice the edit.
    async with nsp(netns, tmp_path, "--config-poll-interval=3600") as n:
        config_file = tmp_path / "meridio-configuration.yaml"
        async with watching(lambda: n.config.watch_stream(Stream())) as streams:
            assert len((await streams.next()).streams) == 3
            write_config(config_file, _with_stream(CONFIG, "stream-hup"))
            await streams.assert_quiet(0.5)
            n.daemon.signal(signal.SIGHUP)
            update = await streams.next()
            assert "stream-hup" in [s.name for s in update.streams]
        assert n.daemon.alive()


@aio_test
async def test_a_bad_configuration_file_is_refused_and_the_old_one_kept(
    netns: Any, tmp_path: Path
) -> None:
    async with nsp(netns, tmp_path, "--config-poll-interval=0.2") as n:
        config_file = tmp_path / "meridio-configuration.yaml"
        async with watching(lambda: n.config.watch_stream(Stream())) as streams:
            assert len((await streams.next()).streams) == 3
            bad = _with_stream(CONFIG, "stream-bad", max_targets=0)
            write_config(config_file, bad)

            def refused_bad() -> list[dict[str, Any]]:
                return [
                    r
                    for r in n.daemon.log_records()
                    if "refused" in str(r.get("event")) and "stream-bad" in str(r)
                ]

            (record, *_) = await wait_until_async(refused_bad, what="the bad file refused")
            assert record["level"] == "error"
            message = str(record.get("error"))
            assert "streams" in message and '"stream-bad"' in message
            assert "max-targets" in message
            await streams.assert_quiet(0.5)
            assert n.daemon.alive()
            assert await health_status(n.daemon.health_socket) == SERVING
            # The running configuration is still served, to new watchers too.
            async with watching(lambda: n.config.watch_stream(Stream())) as fresh:
                assert [s.name for s in (await fresh.next()).streams] == [
                    "stream-a",
                    "stream-b",
                    "stream-c",
                ]
            # A SIGHUP does not make the bad file acceptable either: refused again, and the
            # watchers hear nothing.
            refusals = len(refused_bad())
            n.daemon.signal(signal.SIGHUP)
            await wait_until_async(lambda: len(refused_bad()) > refusals, what="refused again")
            await streams.assert_quiet(0.2)
            # Fixing the file is picked up again.
            write_config(config_file, _with_stream(CONFIG, "stream-good"))
            update = await streams.next()
            assert "stream-good" in [s.name for s in update.streams]


def test_a_bad_configuration_at_start_exits_2_naming_key_and_item(
    netns: Any, tmp_path: Path
) -> None:
    config_file = tmp_path / "bad.yaml"
    write_config(config_file, _with_stream(CONFIG, "stream-zero", max_targets=0))
    daemon = Daemon(netns, "nsp", tmp_path / "nsp", f"--configuration-file={config_file}")
    assert daemon.spawn().wait(30) == 2
    lines = daemon.log_text().splitlines()
    assert len(lines) == 1
    assert "streams" in lines[0] and '"stream-zero"' in lines[0]
    assert not daemon.health_socket.exists()


# -- surviving what production does (issue 15) -------------------------------------------------


def _events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    return [r for r in daemon.log_records() if r.get("event") == event]


@aio_test
async def test_a_restart_after_more_than_entry_timeout_keeps_every_registration(
    netns: Any, tmp_path: Path
) -> None:
    """kill -9, back after more than entry-timeout: every registration is still there and
    gets a full timeout from the restart; those nobody refreshes expire, and it is logged."""
    async with nsp(netns, tmp_path, "--entry-timeout=2") as n:
        live = target("198.18.1.1/24", identifier="1")
        gone = [target(f"198.18.1.{i}/24", identifier=str(i)) for i in (2, 3)]
        for t in (live, *gone):
            await n.enable(t)
        expected = await n.snapshot()
        assert len(expected) == 3
        n.daemon.kill()
        await asyncio.sleep(2.5)  # longer than entry-timeout: every last refresh is too old
        await n.daemon.restart()
        async with watching(lambda: n.registry.watch(ANY)) as w:
            assert summary(await w.next()) == expected  # nothing dropped
            first, restored = _events(n.daemon, "registrations restored")  # one per start
            assert first["count"] == 0
            assert restored["count"] == 3 and restored["grace_seconds"] == 2
            # The owner of one target is alive and refreshes it (every 0.3 s); the others stay
            # silent.
            async with asyncio.timeout(HANG):
                while True:
                    await n.registry.register(live)
                    try:
                        message = await w.next(0.3)
                    except AssertionError:
                        continue
                    assert [ip for ip, _, _ in summary(message)] == ["198.18.1.1/24"]
                    break
        (expired,) = _events(n.daemon, "registrations expired")
        assert expired["count"] == 2 and expired["restored"] == 2


@aio_test
async def test_unregister_validates_like_register_and_ips_are_normalised(
    netns: Any, tmp_path: Path
) -> None:
    async with nsp(netns, tmp_path) as n:
        odd = target("198.18.1.1/032", identifier="1")
        await n.registry.register(odd)
        assert [ip for ip, _, _ in await n.snapshot()] == ["198.18.1.1/32"]
        bad = {
            "bad IP": Target(ips=["198.18.1.300/24"], stream=stream("stream-a", "conduit-a", "t")),
            "path separator": target("198.18.1.1/032", "stream-a", "../c\n0"),
            "blank trench": Target(ips=["198.18.1.1/32"], stream=stream("stream-a", "c", "   ")),
            "no IPs": Target(stream=stream("stream-a", "conduit-a", "trench-a")),
        }
        for what, request in bad.items():
            for call in (n.registry.register, n.registry.unregister):
                err = await grpc_error(call(request))
                assert err.status == Status.INVALID_ARGUMENT, (what, err)
        assert [ip for ip, _, _ in await n.snapshot()] == ["198.18.1.1/32"]
        # Unregistering works for the normalised target, and for a stream since removed.
        await n.registry.unregister(odd)
        assert await n.snapshot() == []
        await n.registry.unregister(target("198.18.1.5/24", "stream-gone"))


def _write_in_place(path: Path, text: str) -> None:
    """As ``cat > file`` does: truncate, then write (a poller may see either state)."""
    with path.open("w") as f:
        f.write(text)


@aio_test
async def test_an_empty_or_cut_short_file_is_never_applied(netns: Any, tmp_path: Path) -> None:
    async with nsp(netns, tmp_path, "--config-poll-interval=0.1") as n:
        config_file = tmp_path / "meridio-configuration.yaml"
        async with (
            watching(lambda: n.config.watch_vip(Vip())) as vips,
            watching(lambda: n.config.watch_stream(Stream())) as streams,
        ):
            assert len((await vips.next()).vips) == 1
            assert len((await streams.next()).streams) == 3
            _write_in_place(config_file, "")
            record = await n.daemon.wait_log(lambda r: "empty" in str(r.get("event")))
            assert record["level"] == "warning"
            _write_in_place(config_file, "trench:\n  name: trench-a\nconduits:\n")
            record = await n.daemon.wait_log(lambda r: "has no value" in str(r.get("error")))
            assert record["level"] == "error"
            await vips.assert_quiet(0.3)
            await streams.assert_quiet(0.1)
            assert n.daemon.alive()
            # A valid file is applied again.
            write_config(config_file, _with_stream(CONFIG, "stream-new"))
            update = await streams.next()
            assert "stream-new" in [s.name for s in update.streams]


@aio_test
async def test_a_file_is_applied_only_once_unchanged_for_one_poll(
    netns: Any, tmp_path: Path
) -> None:
    async with nsp(netns, tmp_path, "--config-poll-interval=0.5") as n:
        config_file = tmp_path / "meridio-configuration.yaml"
        async with watching(lambda: n.config.watch_stream(Stream())) as streams:
            assert len((await streams.next()).streams) == 3
            # Half of an edit: a valid configuration on its own (one stream fewer).
            partial = yaml.safe_load(yaml.safe_dump(CONFIG))
            partial["streams"]["items"] = partial["streams"]["items"][:2]
            changing = len(
                _events(
                    n.daemon, "configuration file changed: applied if unchanged at the next read"
                )
            )
            write_config(config_file, partial)
            # The daemon has read it once; the edit then completes before its next read.
            await n.daemon.wait_log(
                lambda _: (
                    len(
                        _events(
                            n.daemon,
                            "configuration file changed: applied if unchanged at the next read",
                        )
                    )
                    > changing
                )
            )
            write_config(config_file, _with_stream(CONFIG, "stream-new"))
            update = await streams.next()
            assert [s.name for s in update.streams] == [
                "stream-a",
                "stream-b",
                "stream-c",
                "stream-new",
            ]
            await streams.assert_quiet(0.6)  # and the half one never shows up


@aio_test
async def test_removing_every_vip_is_applied_with_a_warning(netns: Any, tmp_path: Path) -> None:
    async with nsp(netns, tmp_path, "--config-poll-interval=0.1") as n:
        config_file = tmp_path / "meridio-configuration.yaml"
        async with watching(lambda: n.config.watch_vip(Vip())) as vips:
            assert len((await vips.next()).vips) == 1
            no_vips = {k: v for k, v in CONFIG.items() if k not in ("vips", "flows")}
            write_config(config_file, no_vips)
            assert (await vips.next()).vips == []
            (record,) = _events(n.daemon, "configuration removes every VIP")
            assert record["level"] == "warning" and record["before"] == 1


@aio_test
async def test_a_configmap_directory_updated_by_link_swap(netns: Any, tmp_path: Path) -> None:
    mount = tmp_path / "configmap"
    mount.mkdir()

    def publish(version: str, config: dict[str, Any]) -> None:
        data = mount / f"..{version}"
        data.mkdir()
        for key, value in config.items():
            (data / key).write_text(yaml.safe_dump(value))
        tmp = mount / "..data_tmp"
        tmp.symlink_to(data.name)
        tmp.replace(mount / "..data")
        for key in config:
            if not (mount / key).is_symlink():
                (mount / key).symlink_to(f"..data/{key}")

    publish("v1", CONFIG)
    async with (
        nsp(
            netns,
            tmp_path,
            f"--configuration-file={mount}",
            "--config-poll-interval=0.1",
            config=None,
        ) as n,
        watching(lambda: n.config.watch_stream(Stream())) as streams,
    ):
        assert len((await streams.next()).streams) == 3
        publish("v2", _with_stream(CONFIG, "stream-new"))
        update = await streams.next()
        assert [s.name for s in update.streams][-1] == "stream-new"
