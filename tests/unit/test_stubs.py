"""The committed `containerd_api` package is exactly what scripts/gen_protos.py writes."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _files(top: pathlib.Path) -> set[str]:
    return {
        p.relative_to(top).as_posix()
        for p in top.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_stubs_equal_a_fresh_regeneration(tmp_path: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
    )
    fresh = tmp_path / "containerd_api"
    committed = ROOT / "containerd_api"
    assert _files(fresh) == _files(committed)
    differing = [
        f for f in sorted(_files(fresh)) if not filecmp.cmp(fresh / f, committed / f, shallow=False)
    ]
    assert differing == [], "run scripts/gen_protos.py and commit the result"


def test_wire_names_and_numbers_follow_containerd() -> None:
    from containerd_api.services.diff.v1 import diff_pb2
    from containerd_api.services.leases.v1 import leases_pb2
    from containerd_api.services.snapshots.v1 import snapshots_pb2
    from containerd_api.types import descriptor_pb2

    assert snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"].full_name == (
        "containerd.services.snapshots.v1.Snapshots"
    )
    assert diff_pb2.DiffResponse.DESCRIPTOR.fields_by_name["diff"].number == 3
    assert leases_pb2.CreateRequest.DESCRIPTOR.fields_by_name["labels"].number == 3
    assert descriptor_pb2.Descriptor.DESCRIPTOR.fields_by_name["annotations"].number == 5
