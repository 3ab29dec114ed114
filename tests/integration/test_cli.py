"""The `pyctrd-cache` command as a real subprocess against real daemons."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pathlib
import pty
import signal
import socket
import subprocess
import sys
import tarfile
import threading
from datetime import datetime, timedelta

import pytest

from pyctrd_cache import CachePolicy, InvalidError, Manager, ProgressEvent, RefInfo
from pyctrd_cache._progress import (
    PlainProgress,
    ProgressBar,
    human_size,
    progress_bar,
    short_digest,
)
from pyctrd_cache._units import parse_duration
from pyctrd_cache.cli import parse_size, split_layout
from pyctrd_cache.client import Client
from tests.checks import back_date
from tests.cli_runs import Cli, one_line_error, run
from tests.fix_containerd import SNAPSHOTTER, Daemon, Managers
from tests.layers import make_tar


def test_info_prints_version_and_snapshotters(daemon: Daemon, namespace: str) -> None:
    out = run("--address", daemon.address, "--namespace", namespace, "info", "--format", "json")
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)
    assert document["version"].startswith("{}.{}.{}".format(*daemon.version))
    assert "overlayfs" in document["snapshotters"]
    assert document["embedded"] is False


def test_wrong_socket_path_is_one_line(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "nothing.sock")
    one_line_error(run("--address", missing, "info"), "no containerd socket at", missing)


def test_missing_snapshotter_is_one_line(daemon: Daemon, namespace: str) -> None:
    out = run(
        "--address", daemon.address, "--namespace", namespace, "--snapshotter", "nosuch", "info"
    )
    one_line_error(out, "no snapshotter 'nosuch'", "overlayfs")


def test_invalid_namespace_is_one_line(daemon: Daemon) -> None:
    out = run("--address", daemon.address, "--namespace", "no/slashes", "info")
    one_line_error(out, "invalid containerd namespace 'no/slashes'")


def test_embedded_daemon_is_started_and_stopped(daemon: Daemon, tmp_path: pathlib.Path) -> None:
    binary = daemon.restartable().binary
    state = tmp_path / "state"
    out = run("--embedded", "--containerd-binary", binary, "--state-dir", str(state), "info")
    assert out.returncode == 0, out.stderr
    assert f"at {state}/containerd/containerd.sock" in out.stdout
    assert "starting a private containerd" in out.stderr
    # It was stopped when the command ended.
    probe = run("--address", str(state / "containerd" / "containerd.sock"), "info")
    assert probe.returncode == 1


def test_usage_error_exits_2() -> None:
    out = run("no-such-command")
    assert out.returncode == 2


# The cache commands. The tests make records through the library on the same metadata store
# (the state directory itself), closing the manager before the command runs: a store is locked
# while open.


@pytest.fixture
def cli(daemon: Daemon, namespace: str, tmp_path: pathlib.Path) -> Cli:
    return Cli(daemon, namespace, tmp_path / "state")


def open_cache(managers: Managers, cli: Cli) -> Manager:
    return managers.open(cli.state)


def committed(
    cm: Manager,
    files: dict[str, bytes],
    *,
    parent: str | None = None,
    description: str = "",
) -> str:
    """A finalized record holding `files`, released; its id."""
    parent_ref = cm.get(parent) if parent else None
    work = cm.new(parent_ref, cache_policy=CachePolicy.RETAIN, description=description)
    if parent_ref is not None:
        parent_ref.release()
    work.apply(make_tar(files))
    snap = work.commit()
    snap.finalize()
    snap.release()
    return snap.id


USAGE_KEYS = [
    "id",
    "mutable",
    "in_use",
    "size",
    "parents",
    "created_at",
    "last_used_at",
    "usage_count",
    "description",
    "record_type",
    "shared",
]


def parse_rfc3339(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.removesuffix("Z") + "+00:00")


def three_records(managers: Managers, cli: Cli) -> tuple[str, str, str]:
    """A base record, a child on it and a retained mutable record."""
    cm = open_cache(managers, cli)
    base = committed(cm, {"base/data": os.urandom(200_000)}, description="base")
    child = committed(cm, {"child": os.urandom(50_000)}, parent=base, description="child")
    work = cm.new(cache_policy=CachePolicy.RETAIN, description="scratch")
    work.release()
    cm.close()
    return base, child, work.id


def test_du_json_table_and_verbose(managers: Managers, cli: Cli) -> None:
    base, child, scratch = three_records(managers, cli)

    document = cli.json("du")
    assert list(document) == ["records", "total", "reclaimable", "shared", "metadata_size"]
    records = document["records"]
    assert [r["id"] for r in records] == [base, child, scratch]
    for r in records:
        assert list(r) == USAGE_KEYS
        assert r["in_use"] is False
        assert r["shared"] is False
        assert r["record_type"] == "regular"
        assert r["usage_count"] >= 1
        assert parse_rfc3339(r["last_used_at"]) >= parse_rfc3339(r["created_at"])
    created = [parse_rfc3339(r["created_at"]) for r in records]
    assert created == sorted(created)
    by_id = {r["id"]: r for r in records}
    assert by_id[base]["size"] >= 200_000
    assert 50_000 <= by_id[child]["size"] < 200_000
    assert by_id[child]["parents"] == [base]
    assert (by_id[scratch]["mutable"], by_id[base]["mutable"]) == (True, False)
    assert [r["description"] for r in records] == ["base", "child", "scratch"]
    total = sum(r["size"] for r in records)
    assert document["total"] == document["reclaimable"] == total
    assert document["shared"] == 0
    assert isinstance(document["metadata_size"], int)
    assert document["metadata_size"] > 0

    lines = cli.ok("du").splitlines()
    assert lines[0].split() == ["ID", "RECLAIMABLE", "SIZE", "LAST", "ACCESSED"]
    rows = [line.split(maxsplit=3) for line in lines[1:4]]
    assert [row[0] for row in rows] == [base, child, scratch + "*"]
    assert [row[1] for row in rows] == ["true"] * 3
    assert [row[2] for row in rows] == [human_size(r["size"]) for r in records]
    assert all(row[3].endswith(" ago") for row in rows)
    assert lines[4] == ""
    totals = dict(line.split(":", 1) for line in lines[5:])
    assert list(totals) == ["Shared", "Private", "Reclaimable", "Total", "Metadata store"]
    assert totals["Total"].strip() == human_size(total)
    assert totals["Private"].strip() == human_size(total)
    assert totals["Shared"].strip() == "0B"
    assert totals["Metadata store"].strip().endswith("B")

    verbose = cli.ok("du", "-v")
    blocks = verbose.split("\n\n")
    assert len(blocks) == 4
    child_block = {
        key: value.strip()
        for key, _, value in (line.partition(":") for line in blocks[1].splitlines())
    }
    assert child_block == {
        "ID": child,
        "Parents": base,
        "Created at": by_id[child]["created_at"],
        "Mutable": "false",
        "Reclaimable": "true",
        "Shared": "false",
        "Size": human_size(by_id[child]["size"]),
        "Description": "child",
        "Usage count": str(by_id[child]["usage_count"]),
        "Last used": child_block["Last used"],
        "Type": "regular",
    }
    assert child_block["Last used"].endswith(" ago")
    assert blocks[3].startswith("Shared:")


def test_du_filters(managers: Managers, cli: Cli) -> None:
    base, child, scratch = three_records(managers, cli)

    def ids(*filters: str) -> list[str]:
        args = [a for f in filters for a in ("--filter", f)]
        return [r["id"] for r in cli.json("du", *args)["records"]]

    assert ids("description==base") == [base]
    assert ids("mutable") == [scratch]
    assert ids(f"parents=={base}") == [child]
    # Clauses are ANDed, filters ORed.
    assert ids("immutable,description~=^c") == [child]
    assert ids("description==base", "mutable") == [base, scratch]
    assert ids("inuse") == []
    document = cli.json("du", "--filter", "description==base")
    assert document["total"] == document["records"][0]["size"]


def test_ls_lists_without_measuring(managers: Managers, cli: Cli) -> None:
    cm = open_cache(managers, cli)
    first = committed(cm, {"a": b"a" * 10_000}, description="two\nlines")
    second = committed(cm, {"b": b"b"})
    cm.close()

    lines = cli.ok("ls").splitlines()
    assert lines == [f"{first:<27}{'-':<11}unused  two\\nlines", f"{second:<27}{'-':<11}unused"]

    cm = open_cache(managers, cli)
    for record_id in (first, second):
        with cm.get(record_id, update_last_used=False) as ref:
            assert ref.info().size is None
    cm.close()

    sizes = {r["id"]: r["size"] for r in cli.json("du")["records"]}
    lines = cli.ok("ls").splitlines()
    assert [line.split()[:3] for line in lines] == [
        [first, human_size(sizes[first]), "unused"],
        [second, human_size(sizes[second]), "unused"],
    ]


def test_inspect_prints_ref_info(managers: Managers, cli: Cli) -> None:
    base, child, scratch = three_records(managers, cli)
    cm = open_cache(managers, cli)
    with cm.get(child, update_last_used=False) as ref:
        expected = ref.info()
    cm.close()

    document = json.loads(cli.ok("inspect", child))
    cli.check_daemon(document.pop("daemon"))
    assert list(document) == [f.name for f in dataclasses.fields(RefInfo)]
    assert document["id"] == child
    assert document["parent_id"] == base
    assert document["mutable"] is False
    assert document["description"] == "child"
    assert document["record_type"] == "regular"
    assert document["cache_policy"] == expected.cache_policy.value
    assert document["image_refs"] == []
    assert parse_rfc3339(document["created_at"]) == expected.created_at
    assert parse_rfc3339(document["last_used_at"]) == expected.last_used_at
    assert document["usage_count"] == expected.usage_count
    assert document["snapshot_id"] == expected.snapshot_id

    # A mutable record is shown as it is: not committed, not used.
    records_before = cli.json("du")["records"]
    document = json.loads(cli.ok("inspect", scratch))
    assert (document["id"], document["mutable"]) == (scratch, True)
    assert cli.json("du")["records"] == records_before
    assert json.loads(cli.ok("inspect", child))["usage_count"] == expected.usage_count


def _usage_error(out: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("pyctrd-cache")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(["inspect", "nosuch"], ["no record nosuch"], id="unknown-id"),
        pytest.param(
            ["inspect", "two\nlines"], ["invalid record id 'two\\nlines'"], id="multi-line"
        ),
        pytest.param(["export", "nosuch", "--oci-layout", "x"], ["no record nosuch"], id="export"),
        pytest.param(
            ["du", "--filter", "description=="],
            ["invalid filter 'description=='", "at position 13", "expected a value"],
            id="du-filter",
        ),
        pytest.param(
            ["prune", "--filter", "id==a", "--filter", "a b"],
            ["invalid filter 'a b' at position 2"],
            id="prune-filter",
        ),
        pytest.param(["pull", "/nonexistent/layout:v1"], ["no OCI layout at"], id="pull"),
        pytest.param(["import", "/nonexistent"], ["/nonexistent"], id="import"),
    ],
)
def test_failures_are_one_line(cli: Cli, args: list[str], fragments: list[str]) -> None:
    one_line_error(cli(*args), *fragments)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(["--keep-storage", "10XB"], ["--keep-storage", "'10XB'"], id="size-unit"),
        pytest.param(["--keep-storage", "-1"], ["--keep-storage"], id="size-negative"),
        pytest.param(["--keep-storage", "GB"], ["--keep-storage", "'GB'"], id="size-no-number"),
        pytest.param(["--keep-duration", "2y"], ["--keep-duration", "'2y'"], id="duration-unit"),
        pytest.param(["--keep-duration", "48"], ["--keep-duration", "'48'"], id="duration-bare"),
        pytest.param(["--keep-duration", "h"], ["--keep-duration"], id="duration-no-number"),
        pytest.param(["--format", "yaml"], ["--format"], id="format"),
    ],
)
def test_malformed_prune_options_are_usage_errors(
    cli: Cli, args: list[str], fragments: list[str]
) -> None:
    _usage_error(cli("prune", *args), *fragments)


def test_prune_lists_what_was_freed(managers: Managers, cli: Cli) -> None:
    base, child, scratch = three_records(managers, cli)
    sizes = {r["id"]: r["size"] for r in cli.json("du")["records"]}

    lines = cli.ok("prune").splitlines()
    assert lines[0].split() == ["ID", "RECLAIMABLE", "SIZE", "LAST", "ACCESSED"]
    rows = [line.split()[:3] for line in lines[1:-1]]
    # Children go before their parents.
    assert sorted(rows) == sorted(
        [
            [child, "true", human_size(sizes[child])],
            [scratch + "*", "true", human_size(sizes[scratch])],
            [base, "true", human_size(sizes[base])],
        ]
    )
    assert [row[0] for row in rows].index(child) < [row[0] for row in rows].index(base)
    assert lines[-1].split() == ["Total:", human_size(sum(sizes.values()))]
    assert cli.json("du")["records"] == []

    document = cli.json("prune")
    assert document == {"removed": [], "total": 0}
    assert cli.ok("prune").splitlines() == ["Total:          0B"]


def test_prune_json_and_filter(managers: Managers, cli: Cli) -> None:
    cm = open_cache(managers, cli)
    keep = committed(cm, {"k": b"k" * 5000}, description="keep")
    drop = committed(cm, {"d": b"d" * 5000}, description="drop")
    cm.close()
    size = {r["id"]: r["size"] for r in cli.json("du")["records"]}[drop]

    document = cli.json("prune", "--filter", "description==drop")
    assert list(document) == ["removed", "total"]
    assert [r["id"] for r in document["removed"]] == [drop]
    assert list(document["removed"][0]) == USAGE_KEYS
    assert document["removed"][0]["description"] == "drop"
    assert document["total"] == document["removed"][0]["size"] == size
    assert [r["id"] for r in cli.json("du")["records"]] == [keep]


def test_prune_keep_storage(managers: Managers, cli: Cli) -> None:
    cm = open_cache(managers, cli)
    ids = [committed(cm, {"data": os.urandom(150_000)}, description=str(i)) for i in range(3)]
    # The first record is the least recently used.
    for record_id in ids[1:]:
        cm.get(record_id).release()
    cm.close()
    sizes = {r["id"]: r["size"] for r in cli.json("du")["records"]}
    total = sum(sizes.values())

    assert cli.json("prune", "--keep-storage", f"{total}B")["removed"] == []
    document = cli.json("prune", "--keep-storage", str(total - 1))
    assert [r["id"] for r in document["removed"]] == [ids[0]]
    assert document["total"] == sizes[ids[0]]

    # 1 KiB fits nothing: every record goes.
    document = cli.json("prune", "--keep-storage", "1KiB")
    assert sorted(r["id"] for r in document["removed"]) == sorted(ids[1:])
    assert cli.json("du")["records"] == []


def test_prune_keep_duration(managers: Managers, cli: Cli) -> None:
    cm = open_cache(managers, cli)
    old = committed(cm, {"old": b"o"}, description="old")
    recent = committed(cm, {"recent": b"r"}, description="recent")
    cm.get(recent).release()
    cm.close()
    # Last used two hours ago: an hour's margin either side of the durations asked below.
    back_date(cli.state, old, timedelta(hours=2))

    assert cli.json("prune", "--keep-duration", "3h")["removed"] == []
    document = cli.json("prune", "--keep-duration", "1h")
    assert [r["id"] for r in document["removed"]] == [old]
    assert [r["id"] for r in cli.json("du")["records"]] == [recent]


# Import, export and pull.


def write_tree(root: pathlib.Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "config").write_text("answer = 42\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(300_000))
    (root / "bin" / "tool").chmod(0o755)
    (root / "link").symlink_to("etc/config")


def test_import_export_pull(managers: Managers, cli: Cli, tmp_path: pathlib.Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree)
    tarball = tmp_path / "layer.tar.gz"
    tarball.write_bytes(gzip.compress(make_tar({"etc/extra": b"more\n"})))

    base = cli.ok("import", str(tree), "--description", "tree", "--retain").strip()
    top = cli.ok("import", str(tarball), "--parent", base).strip()
    assert len({base, top}) == 2
    info = json.loads(cli.ok("inspect", base))
    assert (info["description"], info["cache_policy"]) == ("tree", CachePolicy.RETAIN.value)
    assert info["mutable"] is False
    assert json.loads(cli.ok("inspect", top))["parent_id"] == base

    layout = tmp_path / "layout"
    digest = cli.ok(
        "export", top, "--oci-layout", str(layout), "--tag", "v1", "--compression", "zstd"
    ).strip()
    assert digest.startswith("sha256:")
    skopeo = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:v1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert skopeo.returncode == 0, skopeo.stderr
    image = json.loads(skopeo.stdout)
    assert image["Digest"] == digest
    assert len(image["Layers"]) == 2
    # --force-compression makes variants of the blobs just made, in the same layout.
    forced = cli.ok(
        "export",
        top,
        "--oci-layout",
        str(layout),
        "--tag",
        "plain",
        "--compression",
        "uncompressed",
        "--force-compression",
    ).strip()
    assert forced != digest
    skopeo = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{layout}:plain"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert skopeo.returncode == 0, skopeo.stderr
    media_types = [layer["mediaType"] for layer in json.loads(skopeo.stdout)["layers"]]
    assert media_types == ["application/vnd.oci.image.layer.v1.tar"] * 2

    # Into a cache of its own: the layers become lazy records, the top one printed. The
    # layout's path has a ':' of its own, before the tag.
    (tmp_path / "a:b").mkdir()
    (tmp_path / "a:b" / "layout").symlink_to(layout)
    layout = tmp_path / "a:b" / "layout"
    other = Cli(cli.daemon, cli.namespace, tmp_path / "other")
    pulled = other.ok("pull", f"{layout}:v1").strip()
    listed = other.ok("ls").split()
    assert pulled in listed
    info = json.loads(other.ok("inspect", pulled))
    assert info["blob_only"] is True
    [parent] = set(listed) & {r["id"] for r in other.json("du")["records"]} - {pulled}
    assert info["parent_id"] == parent
    assert json.loads(other.ok("inspect", parent))["parent_id"] is None
    assert info["media_type"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert other.ok("pull", f"{layout}:v1", "--extract").strip() == pulled
    assert len(other.json("du")["records"]) == 2
    one_line_error(other("pull", f"{layout}:nosuchtag"), "nosuchtag")
    collect_everything(cli, other)


def collect_everything(*clis: Cli) -> None:
    """Prunes every record, and with them the diff service's views that `export` left to
    containerd's collector, so that the namespace can be emptied."""
    for each in clis:
        assert each.json("prune", "--all")["removed"] != []


def run_on_terminal(*args: str) -> tuple[int, str, str]:
    """Runs the command with stderr on a pseudo-terminal; exit status, stdout, stderr."""
    controller, terminal = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "pyctrd_cache.cli", *args],
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    ) as process:
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO once the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(controller)
        assert process.stdout is not None
        stdout = process.stdout.read()
        status = process.wait(60)
    return status, stdout, b"".join(chunks).decode()


def test_progress_on_a_terminal_only(cli: Cli, tmp_path: pathlib.Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree)
    common = ["--address", cli.daemon.address, "--namespace", cli.namespace]
    common += ["--state-dir", str(cli.state)]

    status, stdout, stderr = run_on_terminal(*common, "import", str(tree))
    assert status == 0, stderr
    record_id = stdout.strip()
    assert f"\rimporting {tree}  done " in stderr
    assert stderr.endswith("\n")

    layout = tmp_path / "layout"
    status, stdout, stderr = run_on_terminal(
        *common, "export", record_id, "--oci-layout", str(layout)
    )
    assert status == 0, stderr
    lines = stderr.replace("\r\n", "\n").split("\n")
    finished = [line.rsplit("\r", 1)[-1].rstrip() for line in lines if line]
    layer = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"oci:{layout}:latest"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )["Layers"][0]
    assert any(line.startswith(f"{layer[:19]}  done ") for line in finished), finished

    # Not a terminal: nothing but the result.
    out = cli("export", record_id, "--oci-layout", str(tmp_path / "again"))
    assert (out.returncode, out.stderr) == (0, "")
    collect_everything(cli)


def test_interrupt_exits_130(tmp_path: pathlib.Path) -> None:
    # A socket that accepts and never answers: the command waits on it until interrupted,
    # and the accepted connection shows it got that far.
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen()
        sock.settimeout(60)
        with subprocess.Popen(
            [sys.executable, "-m", "pyctrd_cache.cli", "--address", str(path), "du"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            connection, _ = sock.accept()
            with connection:
                process.send_signal(signal.SIGINT)
                stdout, stderr = process.communicate(timeout=30)
    assert (process.returncode, stdout) == (130, ""), stderr


# Parsing and the progress bar, without a daemon.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100", 100),
        ("100b", 100),
        # Binary units whatever the spelling, as docker and buildx read sizes.
        ("10GB", 10 << 30),
        ("10gb", 10 << 30),
        ("10GiB", 10 << 30),
        ("1.5g", 3 << 29),
        ("512MiB", 512 << 20),
        ("512mi", 512 << 20),
        ("2 KiB", 2048),
        ("1kB", 1024),
        ("0.5TiB", 1 << 39),
        ("1.5", 1),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "10XB", "-1", "1iB", "1e3", "1.2.3", "10 G B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48h", timedelta(hours=48)),
        ("30m", timedelta(minutes=30)),
        ("90s", timedelta(seconds=90)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2d", timedelta(days=2)),
        ("1w2d", timedelta(days=9)),
        ("1.5h", timedelta(minutes=90)),
        ("500ms", timedelta(milliseconds=500)),
        ("0", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "48", "h", "1H", "2y", "1h 30m", "-1h", "1h-", "ms", "9" * 20 + "w"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("layout", ("layout", None)),
        ("layout:v1", ("layout", "v1")),
        ("/srv/a:b/layout", ("/srv/a:b/layout", None)),
        ("/srv/a:b/layout:v1", ("/srv/a:b/layout", "v1")),
        ("layout:", ("layout", None)),
        (":v1", (":v1", None)),
    ],
)
def test_split_layout(text: str, expected: tuple[str, str | None]) -> None:
    assert split_layout(text) == expected


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (999, "999B"),
        (1000, "1kB"),
        (12_345_678, "12.35MB"),
        (999_999, "1000kB"),
        (10**12, "1TB"),
    ],
)
def test_human_size_is_buildctl_s(size: int, text: str) -> None:
    assert human_size(size) == text


def test_progress_bar_gives_each_blob_one_finished_line() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream)
    digests = [f"sha256:{i:064x}" for i in range(8)]

    def transfer(digest: str) -> None:
        bar(ProgressEvent("start", digest, 0, 4 << 20))
        for n in range(1, 5):
            bar(ProgressEvent("bytes", digest, n << 20, 4 << 20))
        bar(ProgressEvent("end", digest, 4 << 20, 4 << 20))

    threads = [threading.Thread(target=transfer, args=(d,)) for d in digests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar(ProgressEvent("status", digests[0], message=f"extracting {digests[0]}"))
    bar.close()
    text = stream.getvalue()
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")[:-1]]
    assert sorted(line.strip() for line in lines[:-1]) == sorted(
        f"{short_digest(d)}  done 4.194MB" for d in digests
    )
    assert lines[-1] == f"{short_digest(digests[0])}  extracting"
    assert text.endswith("\n")
    assert short_digest(digests[0]) == "sha256:000000000000"


def test_progress_modes() -> None:
    """auto: the live bar on a terminal, one line per event elsewhere; quiet: nothing."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with progress_bar(io.StringIO()) as progress:
        assert isinstance(progress, PlainProgress)
    with progress_bar(Terminal()) as progress:
        assert isinstance(progress, ProgressBar)
    with progress_bar(Terminal(), "plain") as progress:
        assert isinstance(progress, PlainProgress)
    with progress_bar(io.StringIO(), "tty") as progress:
        assert isinstance(progress, ProgressBar)
    with progress_bar(Terminal(), "quiet") as progress:
        assert progress is None


def test_plain_progress_writes_whole_lines_with_sizes_and_rates() -> None:
    out = io.StringIO()
    progress = PlainProgress(out, interval=0.0)
    digest = "sha256:" + "ab" * 32
    progress(ProgressEvent("start", digest, total=2_000_000))
    progress(ProgressEvent("bytes", digest, current=1_000_000, total=2_000_000))
    progress(ProgressEvent("status", digest, message=f"extracting {digest}"))
    progress(ProgressEvent("end", digest, current=2_000_000, total=2_000_000))
    progress(ProgressEvent("start", "sha256:" + "cd" * 32))
    progress(ProgressEvent("end", "sha256:" + "cd" * 32, error=InvalidError("broken")))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "sha256:abababababab  started (2MB)"
    assert lines[1].startswith("sha256:abababababab  1MB / 2MB  ")
    assert lines[1].endswith("/s")
    assert lines[2] == "sha256:abababababab  extracting"
    assert lines[3].startswith("sha256:abababababab  done 2MB in ")
    assert lines[5].startswith("sha256:cdcdcdcdcdcd  failed after ")
    assert lines[5].endswith("broken")


def _tar_with(name: str, *, link_to: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        if link_to is not None:
            info.type = tarfile.LNKTYPE
            info.linkname = link_to
            tar.addfile(info)
        else:
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "link_to"),
    [("/etc/evil", None), ("../evil", None), ("ok/../../evil", None), ("link", "../../etc/passwd")],
    ids=["absolute", "dotdot", "nested-dotdot", "hardlink-out"],
)
def test_hostile_tar_is_refused_and_leaves_nothing(
    cli: Cli, client: Client, tmp_path: pathlib.Path, name: str, link_to: str | None
) -> None:
    path = tmp_path / "hostile.tar"
    path.write_bytes(_tar_with(name, link_to=link_to))
    one_line_error(cli("import", str(path)), repr(name))
    assert cli.json("du")["records"] == []
    assert client.snapshots(SNAPSHOTTER).list() == []
    assert client.content.list_statuses() == []


def test_layout_with_a_missing_blob_is_refused_and_leaves_nothing(
    managers: Managers, cli: Cli, client: Client, tmp_path: pathlib.Path
) -> None:
    cm = open_cache(managers, cli)
    record = committed(cm, {"f": b"data"})
    cm.close()
    layout = tmp_path / "layout"
    cli.ok("export", record, "--oci-layout", str(layout), "--tag", "v1")
    cli.ok("prune", "--all")
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    missing = manifest["layers"][0]["digest"]
    (layout / "blobs" / "sha256" / missing.split(":")[1]).unlink()
    one_line_error(cli("pull", f"{layout}:v1"), missing)
    assert cli.json("du")["records"] == []
    assert client.content.list() == []
