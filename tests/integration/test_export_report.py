"""Export and push say which compression each layer has, and note when it is not the one
asked for (issue 15)."""

from __future__ import annotations

import pathlib

from tests.cli_runs import Cli
from tests.fix_containerd import Daemon, Managers
from tests.layers import make_tar


def test_export_notes_reused_blobs_of_another_compression(
    daemon: Daemon, namespace: str, managers: Managers, tmp_path: pathlib.Path
) -> None:
    cli = Cli(daemon, namespace, managers.state_dir)
    tarball = tmp_path / "layer.tar"
    tarball.write_bytes(make_tar({"etc/file": b"data\n"}))
    record = cli.ok("import", str(tarball), "--retain").strip()
    layout = tmp_path / "layout"

    gzip = cli.json("export", record, "--oci-layout", str(layout), "--tag", "gz")
    assert [layer["compression"] for layer in gzip["layers"]] == ["gzip"]
    assert gzip["manifest"].startswith("sha256:")

    # Without force the gzip blob made above is reused for a zstd request: said once.
    out = cli(
        "export", record, "--oci-layout", str(layout), "--tag", "zst", "--compression", "zstd"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("sha256:")
    notes = out.stderr.splitlines()
    assert len(notes) == 1
    assert "1 of 1 layers are gzip, not zstd" in notes[0]
    document = cli.json(
        "export", record, "--oci-layout", str(layout), "--tag", "zst", "--compression", "zstd"
    )
    assert [layer["compression"] for layer in document["layers"]] == ["gzip"]
    assert document["layers"][0]["digest"] == gzip["layers"][0]["digest"]

    forced = cli(
        "export",
        record,
        "--oci-layout",
        str(layout),
        "--tag",
        "zst",
        "--compression",
        "zstd",
        "--force-compression",
        "--format",
        "json",
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr == ""
