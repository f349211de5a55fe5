"""The committed betterproto code must be exactly what `make proto` generates."""

from __future__ import annotations

import filecmp
from pathlib import Path

from meridio.tools.protogen import generate

API = Path(__file__).resolve().parents[2] / "src" / "meridio" / "api"


def _diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [f"only in committed: {n}" for n in cmp.left_only]
    out += [f"only in generated: {n}" for n in cmp.right_only]
    out += [f"differs: {n}" for n in cmp.diff_files]
    for name, sub in cmp.subdirs.items():
        out += [f"{name}/{line}" for line in _diff(Path(sub.left), Path(sub.right))]
    return out


def test_committed_code_matches_protos(tmp_path: Path) -> None:
    generate(tmp_path / "api")
    assert _diff(API, tmp_path / "api") == [], "run `make proto` and commit the result"


def test_wire_compatibility_of_key_fields() -> None:
    from meridio.api.ipam.v1 import Child, IpFamily, Subnet
    from meridio.api.nsp.v1 import Conduit, Stream, Target, TargetStatus, Trench

    target = Target(
        ips=["172.16.1.3/24"],
        context={"identifier": "7"},
        status=TargetStatus.DISABLED,
        stream=Stream(name="s", conduit=Conduit(name="c", trench=Trench(name="t"))),
    )
    data = bytes(target)
    # field 1 (ips) is length-delimited: tag 0x0a; status (3) varint: tag 0x18; stream (5): 0x2a
    assert data[0] == 0x0A
    assert b"\x18\x01" in data
    assert b"\x2a" in data
    child = Child(name="n", subnet=Subnet(node="w1", ip_family=IpFamily.IPV6))
    assert bytes(child) == b"\n\x01n\x12\x06\x12\x02w1\x18\x01"
