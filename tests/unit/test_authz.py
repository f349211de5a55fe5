"""The pure authorization core: SPIFFE IDs, roles, the table and its decisions."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meridio.core import authz
from meridio.core.authz import (
    ADMIN,
    IDENTITIES,
    ROLES,
    TABLE,
    Identity,
    InvalidSpiffeId,
    RefusalLog,
    SpiffeId,
    decide,
    identify,
    parse_role_patterns,
    parse_spiffe_id,
)

README = Path(__file__).resolve().parents[2] / "README.md"
TD = "meridio.local"


def who(role: str | None) -> Identity:
    return Identity(SpiffeId(TD, f"/meridio/{role}/x"), role)


# --- SPIFFE IDs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "domain", "path"),
    [
        ("spiffe://meridio.local/meridio/nsp/nsp-0", "meridio.local", "/meridio/nsp/nsp-0"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://td/ns/default/sa/meridio_lb-a.b", "td", "/ns/default/sa/meridio_lb-a.b"),
    ],
)
def test_valid_spiffe_ids(text: str, domain: str, path: str) -> None:
    sid = parse_spiffe_id(text)
    assert (sid.trust_domain, sid.path) == (domain, path)
    assert str(sid) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("http://meridio.local/x", "does not start with spiffe://"),
        ("SPIFFE://meridio.local/x", "does not start with spiffe://"),
        ("spiffe:///x", "no trust domain"),
        ("spiffe://Meridio.local/x", "lowercase"),
        ("spiffe://meridio.local:8080/x", "no port"),
        ("spiffe://user@meridio.local/x", "lowercase"),
        ("spiffe://meridio.local/", "trailing"),
        ("spiffe://meridio.local//x", "empty path segment"),
        ("spiffe://meridio.local/x/../y", "'..'"),
        ("spiffe://meridio.local/./y", "'.'"),
        ("spiffe://meridio.local/x?y=1", "may hold only"),
        ("spiffe://meridio.local/x#f", "may hold only"),
        ("spiffe://meridio.local/%41", "may hold only"),
        ("spiffe://meridio.local/" + "a" * 2048, "longer than 2048"),
    ],
)
def test_invalid_spiffe_ids(text: str, why: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=why.replace("?", r"\?")):
        parse_spiffe_id(text)


@given(st.text(max_size=80))
def test_parse_never_raises_anything_else(text: str) -> None:
    try:
        sid = parse_spiffe_id(text)
    except InvalidSpiffeId:
        return
    assert parse_spiffe_id(str(sid)) == sid


SEGMENT = st.text(alphabet="abcXYZ019.-_", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)


@given(st.text(alphabet="abz09.-_", min_size=1, max_size=20), st.lists(SEGMENT, max_size=5))
def test_valid_ids_round_trip(domain: str, segments: list[str]) -> None:
    text = "spiffe://" + domain + "".join("/" + s for s in segments)
    sid = parse_spiffe_id(text)
    assert str(sid) == text and sid.segments == tuple(segments)


# --- roles -----------------------------------------------------------------------------------


def test_roles_from_the_path_and_patterns() -> None:
    patterns = parse_role_patterns("/ns/*/sa/meridio-nsp=nsp, /ns/ops/sa/*=admin")
    cases = {
        "/meridio/proxy/node-1": "proxy",
        "/meridio/lb": "lb",
        "/meridio/target/t/extra": "target",
        "/meridio/admin/me": ADMIN,
        "/meridio/boss/me": None,
        "/ns/red/sa/meridio-nsp": "nsp",
        "/ns/red/sa/meridio-nsp/x": None,
        "/ns/ops/sa/anyone": ADMIN,
        "/workload/proxy": None,
        "": None,
    }
    for path, role in cases.items():
        assert identify([f"spiffe://{TD}{path}"], TD, patterns).role == role, path


def test_identity_needs_one_spiffe_uri_of_our_domain() -> None:
    assert identify([], TD).problem == "no SPIFFE ID in the URI SAN"
    assert identify(["https://x"], TD).problem == "no SPIFFE ID in the URI SAN"
    two = [f"spiffe://{TD}/meridio/nsp/a", f"spiffe://{TD}/meridio/lb/b"]
    assert identify(two, TD).problem == "more than one SPIFFE ID"
    assert "invalid SPIFFE ID" in identify(["spiffe://BAD/x"], TD).problem
    other = identify(["spiffe://elsewhere/meridio/nsp/a"], TD)
    assert other.role is None and "is not 'meridio.local'" in other.problem
    assert identify(["https://x", f"spiffe://{TD}/meridio/nsp/a"], TD).role == "nsp"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("/x=boss", "ROLE one of"),
        ("/x", "PATH=ROLE"),
        ("x=nsp", "must start with '/'"),
        ("/=nsp", "must start with '/'"),
        ("/a/../b=nsp", "bad path segment"),
        ("/a b=nsp", "bad path segment"),
    ],
)
def test_bad_role_patterns(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_role_patterns(text)


def test_role_id() -> None:
    assert str(authz.role_id(TD, "proxy", "node-1")) == f"spiffe://{TD}/meridio/proxy/node-1"
    with pytest.raises(ValueError, match="unknown role"):
        authz.role_id(TD, "root", "x")
    with pytest.raises(InvalidSpiffeId):
        authz.role_id(TD, "proxy", "a/b")


# --- the table -------------------------------------------------------------------------------

REGISTER = "/nsp.v1.TargetRegistry/Register"


@pytest.mark.parametrize(
    ("server", "method", "allowed"),
    [
        ("nsp", REGISTER, {"proxy", "target", "lb"}),
        ("nsp", "/nsp.v1.TargetRegistry/Watch", {"lb", "proxy", "target", ADMIN}),
        ("nsp", "/nsp.v1.ConfigurationManager/WatchVip", set(IDENTITIES)),
        ("ipam", "/ipam.v1.Ipam/Allocate", {"proxy"}),
        ("ipam", "/ipam.v1.Ipam/Release", {"proxy"}),
        ("ipam", "/meridio.admin.v1.IpamInspect/List", {ADMIN}),
        ("lb", "/meridio.connect.v1.Connect/Request", {"proxy"}),
        ("proxy", "/meridio.connect.v1.Connect/Request", {"target"}),
        ("lb", "/meridio.admin.v1.LbInspect/Show", {ADMIN}),
        ("target", "/ambassador.v1.Tap/Open", set()),
        ("target", "/grpc.health.v1.Health/Check", set(IDENTITIES)),
        # a method served by another role than the server's: nobody
        ("ipam", REGISTER, set()),
        ("nsp", "/nsp.v1.Nope/Nope", set()),
    ],
)
def test_decisions(server: str, method: str, allowed: set[str]) -> None:
    for role in IDENTITIES:
        decision = decide(server, method, who(role))
        assert decision.allowed == (role in allowed), (role, decision)
        if not decision.allowed:
            assert decision.reason
    assert not decide(server, method, Identity(None, None, "no certificate")).allowed


def test_every_served_method_is_in_the_table() -> None:
    """Every method of every service the roles serve has a row (else: refused to all)."""
    from meridio.api.ambassador import v1 as tap
    from meridio.api.grpc.health import v1 as health
    from meridio.api.ipam import v1 as ipam
    from meridio.api.meridio.admin import v1 as admin
    from meridio.api.meridio.connect import v1 as connect
    from meridio.api.meridio.ipam import v1 as ipambatch
    from meridio.api.meridio.nsp import v1 as nspbatch
    from meridio.api.nsp import v1 as nsp

    bases = [
        tap.TapBase,
        health.HealthBase,
        ipam.IpamBase,
        admin.IpamInspectBase,
        ipambatch.IpamBatchBase,
        nspbatch.TargetRegistryBatchBase,
        admin.LbInspectBase,
        connect.ConnectBase,
        nsp.TargetRegistryBase,
        nsp.ConfigurationManagerBase,
    ]
    in_table = {f"/{r.service}/{m}" for r in TABLE for m in r.methods}
    for base in bases:
        methods = set(base.__mapping__(object.__new__(base)))
        assert methods <= in_table, methods - in_table
        for method in methods:
            assert authz.servers_of(method)


def test_message_rules_for_registrations() -> None:
    default = SimpleNamespace(type=authz.TARGET_DEFAULT)
    frontend = SimpleNamespace(type=authz.TARGET_FRONTEND)
    for method in (REGISTER, "/nsp.v1.TargetRegistry/Unregister"):
        assert authz.has_message_rule(method)
        assert authz.check_message(method, "proxy", default) is None
        assert authz.check_message(method, "target", default) is None
        assert authz.check_message(method, "lb", frontend) is None
        assert "may not send type FRONTEND" in (
            authz.check_message(method, "proxy", frontend) or ""
        )
        assert "type DEFAULT" in (authz.check_message(method, "lb", default) or "")
        assert authz.check_message(method, "proxy", SimpleNamespace(type=7)) is not None
    assert not authz.has_message_rule("/nsp.v1.TargetRegistry/Watch")


def test_a_batch_of_registrations_is_checked_update_by_update() -> None:
    method = "/meridio.nsp.v1.TargetRegistryBatch/Update"

    def batch(*types: int) -> SimpleNamespace:
        return SimpleNamespace(
            updates=[SimpleNamespace(target=SimpleNamespace(type=t)) for t in types]
        )

    assert authz.has_message_rule(method)
    assert authz.check_message(method, "proxy", batch()) is None
    assert authz.check_message(method, "proxy", batch(0, 0, 0)) is None
    assert "may not send type FRONTEND" in (
        authz.check_message(method, "proxy", batch(0, 1, 0)) or ""
    )
    assert decide("nsp", method, who("proxy")).allowed
    assert not decide("nsp", method, who("lb")).allowed
    assert not decide("nsp", method, who("target")).allowed


def test_servers_of() -> None:
    assert authz.servers_of("/meridio.connect.v1.Connect/Close") == {"lb", "proxy"}
    assert authz.servers_of("/grpc.health.v1.Health/Watch") == set(ROLES)
    assert authz.servers_of("/x.Y/Z") == frozenset()


def test_readme_shows_the_table() -> None:
    assert authz.markdown_table() in README.read_text(encoding="utf-8")


# --- refusal logging -------------------------------------------------------------------------


def test_refusal_log_once_per_key_per_window() -> None:
    log = RefusalLog(window=60)
    assert log.note("a", 0.0) == 0
    assert log.note("a", 1.0) is None
    assert log.note("a", 2.0) is None
    assert log.note("b", 2.0) == 0
    assert log.note("a", 61.0) == 2  # logged again, with the two not logged
    assert log.note("a", 62.0) is None


def test_refusal_log_is_bounded() -> None:
    log = RefusalLog(window=60, max_keys=10)
    for i in range(100):
        assert log.note(i, float(i)) == 0
        assert len(log._last) <= 10
