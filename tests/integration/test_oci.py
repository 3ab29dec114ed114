"""OCI image layouts and imports against real containerd daemons: a directory tree imported,
exported in gzip and zstd, checked by skopeo and umoci, pulled lazily into another namespace
and extracted; tars in every compression, tars that escape their root, and layouts that are
broken, with nothing left behind."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import socket
import stat
import subprocess
import tarfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import zstandard

from pyctrd_cache import (
    CacheError,
    CachePolicy,
    Compression,
    InvalidError,
    Manager,
    NotFoundError,
    ProgressEvent,
    PrunePolicy,
)
from pyctrd_cache.client import Client
from pyctrd_cache.oci import export_layout, import_path, machine_platform, pull_layout
from tests.checks import blob_count, gc, owned_leases, snapshot_names
from tests.fix_containerd import SNAPSHOTTER, Daemon, Managers, clean_namespace
from tests.layers import TAR, TAR_GZIP, TAR_ZSTD

UNCOMPRESSED = "containerd.io/uncompressed"
REF_NAME = "org.opencontainers.image.ref.name"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BASE_NS = 1_650_000_000 * 10**9

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts, chown and umoci need root")
pytestmark = needs_root


@pytest.fixture(autouse=True)
def _empty_at_end(managers: Managers, client: Client) -> Iterator[None]:
    """Ends every test the way the cache empties a namespace (a prune of everything, then
    containerd's collector), so that the namespace's clean-up finds nothing in flight."""
    yield
    for cm in managers.opened:
        with contextlib.suppress(CacheError):
            cm.prune(PrunePolicy(all=True))
    gc(client)


# A sample tree and how to compare trees.


def make_tree(parent: pathlib.Path) -> pathlib.Path:
    """Nested directories, modes 0755 and 0600, a relative and a dangling symlink, a hard
    link pair, a file of uid 1234 gid 5678, a FIFO, a character device, a socket (never
    imported), an empty directory, a 5 MiB file, and a distinct mtime (with nanoseconds) on
    everything."""
    src = parent / "src"
    (src / "etc" / "app" / "conf.d").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "bin").mkdir()
    run = src / "bin" / "run.sh"
    run.write_text("#!/bin/sh\necho hello\n")
    run.chmod(0o755)
    secret = src / "etc" / "app" / "secret"
    secret.write_text("s3cr3t\n")
    secret.chmod(0o600)
    (src / "etc" / "app" / "conf.d" / "10-base.conf").write_text("level = 1\n")
    (src / "bin" / "run").symlink_to("run.sh")
    (src / "etc" / "dangling").symlink_to("../nowhere/at/all")
    (src / "etc" / "hard-a").write_text("linked twice\n")
    os.link(src / "etc" / "hard-a", src / "bin" / "hard-b")
    owned = src / "owned"
    owned.write_text("someone else's\n")
    os.chown(owned, 1234, 5678)
    os.chown(src / "empty", 1234, 5678)
    (src / "big.bin").write_bytes(os.urandom(1 << 20) * 5)
    os.mkfifo(src / "fifo")
    os.mknod(src / "dev-null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    _make_socket(src / "bin", "sock")
    entries = sorted(
        (p for p in src.rglob("*") if p.name != "sock"),
        key=lambda p: -len(p.parts),  # children before their directories
    )
    for i, p in enumerate(entries):
        t = BASE_NS + i * 86_400 * 10**9 + 123_456_789 + i
        os.utime(p, ns=(t, t), follow_symlinks=False)
    return src


def _make_socket(directory: pathlib.Path, name: str) -> None:
    """Binds a Unix socket (its path relative to `directory`: socket paths are short)."""
    cwd = os.getcwd()
    s = socket.socket(socket.AF_UNIX)
    try:
        os.chdir(directory)
        s.bind(name)
    finally:
        os.chdir(cwd)
        s.close()


def tree_of(root: pathlib.Path, *, mtime_ns: bool = True) -> dict[str, tuple[Any, ...]]:
    """Every entry below `root` (sockets left out): type, mode, owner, content or symlink
    target, the mtime of regular files (to the second unless `mtime_ns`), and which other
    entries are the same inode."""
    inodes: dict[tuple[int, int], list[str]] = {}
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            mode = st.st_mode
            if stat.S_ISSOCK(mode):
                continue
            kind = stat.S_IFMT(mode)
            detail: Any = None
            mtime: int | None = None
            if stat.S_ISLNK(mode):
                detail = os.readlink(full)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
            elif stat.S_ISREG(mode):
                detail = hashlib.sha256(pathlib.Path(full).read_bytes()).hexdigest()
                mtime = st.st_mtime_ns if mtime_ns else st.st_mtime_ns // 10**9
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            out[rel] = (kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, detail, mtime)
    for group in inodes.values():
        for rel in group:
            out[rel] = (*out[rel], tuple(sorted(group)))
    return out


def assert_same_tree(got: pathlib.Path, want: pathlib.Path, *, mtime_ns: bool = True) -> None:
    a, b = tree_of(got, mtime_ns=mtime_ns), tree_of(want, mtime_ns=mtime_ns)
    assert sorted(a) == sorted(b)
    for rel in b:
        assert a[rel] == b[rel], rel


def read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text())


def blob_json(layout: pathlib.Path, digest: str) -> Any:
    return read_json(layout / "blobs" / "sha256" / digest.removeprefix("sha256:"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


@dataclass
class Exported:
    src: pathlib.Path
    layout: pathlib.Path
    gz: Any
    zst: Any


def import_and_export(cm: Manager, tmp_path: pathlib.Path) -> Exported:
    """The sample tree imported, and exported as tags `gz` (gzip) and `zst` (zstd)."""
    src = make_tree(tmp_path)
    layout = tmp_path / "layout"
    with import_path(cm, src, description="sample tree") as ref:
        gz = export_layout(ref, layout, tag="gz")
        zst = export_layout(
            ref, layout, compression=Compression.ZSTD, force_compression=True, tag="zst"
        )
    return Exported(src, layout, gz, zst)


def assert_namespace_empty(cm: Manager, client: Client) -> None:
    """After a prune of everything, no snapshot, blob or lease of the manager is left."""
    cm.prune(PrunePolicy(all=True))
    gc(client)
    assert snapshot_names(client) == []
    assert blob_count(client) == 0
    assert owned_leases(client, cm) == []


# Import a directory, export it, and check the layout with skopeo and umoci.


def test_import_directory_keeps_the_tree(managers: Managers, tmp_path: pathlib.Path) -> None:
    cm = managers.open()
    src = make_tree(tmp_path)
    events: list[ProgressEvent] = []
    ref = import_path(cm, src, description="sample tree", progress=events.append)
    with ref:
        info = ref.info()
        assert not info.mutable
        assert info.equal_mutable_id is None  # finalized
        assert info.description == "sample tree"
        assert not ref.is_lazy()
        with ref.mount() as root:
            assert_same_tree(root, src)
            assert not (root / "bin" / "sock").exists()
    assert next(e.kind for e in events) == "start"
    assert events[-1].kind == "end"
    assert events[-1].error is None
    assert events[-1].current > 5 << 20  # the tar stream that went through
    assert len(cm.disk_usage()) == 1  # the committed record; the mutable is gone


def test_export_layout_is_accepted_by_skopeo_and_umoci(
    managers: Managers, tmp_path: pathlib.Path
) -> None:
    cm = managers.open()
    out = import_and_export(cm, tmp_path)
    layout = out.layout

    assert read_json(layout / "oci-layout") == {"imageLayoutVersion": "1.0.0"}
    index = read_json(layout / "index.json")
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    tags = {m["annotations"][REF_NAME]: m for m in index["manifests"]}
    assert set(tags) == {"gz", "zst"}  # the second export kept the first
    assert tags["gz"]["digest"] == out.gz.digest
    assert tags["zst"]["digest"] == out.zst.digest
    assert out.gz.media_type == OCI_MANIFEST
    configs = []
    for name, want in (("gz", TAR_GZIP), ("zst", TAR_ZSTD)):
        manifest = blob_json(layout, tags[name]["digest"])
        assert manifest["schemaVersion"] == 2
        assert manifest["mediaType"] == OCI_MANIFEST
        [layer] = manifest["layers"]
        assert layer["mediaType"] == want
        assert UNCOMPRESSED not in layer.get("annotations", {})
        blob = layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        assert blob.stat().st_size == layer["size"]
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == layer["digest"]
        config = blob_json(layout, manifest["config"]["digest"])
        assert config["architecture"] == machine_platform()["architecture"]
        assert config["os"] == "linux"
        assert config["rootfs"]["type"] == "layers"
        assert len(config["history"]) == 1
        assert config["history"][0]["created_by"] == "sample tree"
        assert "created" in config
        configs.append(config)
    assert configs[0]["rootfs"] == configs[1]["rootfs"]  # one diff id, two compressions
    # No temporary files are left in the layout.
    assert not list(layout.rglob(".*"))

    for name in ("gz", "zst"):
        inspect = run("skopeo", "inspect", f"oci:{layout}:{name}")
        assert inspect.returncode == 0, inspect.stderr
        manifest = blob_json(layout, tags[name]["digest"])
        assert json.loads(inspect.stdout)["Layers"] == [manifest["layers"][0]["digest"]]
    other = tmp_path / "copy"
    copied = run("skopeo", "copy", f"oci:{layout}:zst", f"oci:{other}:zst")
    assert copied.returncode == 0, copied.stderr
    assert run("skopeo", "inspect", f"oci:{other}:zst").returncode == 0

    # umoci 0.4 unpacks only gzip and plain layers: the zstd image is unpacked after skopeo
    # recompressed it (which reads every zstd byte).
    converted = tmp_path / "converted"
    recompressed = run(
        "skopeo",
        "copy",
        "--dest-compress-format",
        "gzip",
        f"oci:{layout}:zst",
        f"oci:{converted}:zst",
    )
    assert recompressed.returncode == 0, recompressed.stderr
    for name, image in (("gz", f"{layout}:gz"), ("zst", f"{converted}:zst")):
        bundle = tmp_path / f"bundle-{name}"
        unpacked = run("umoci", "unpack", "--image", image, str(bundle))
        assert unpacked.returncode == 0, unpacked.stderr
        # containerd's diff writes mtimes to the second.
        assert_same_tree(bundle / "rootfs", out.src, mtime_ns=False)


def test_export_again_replaces_the_tag_and_is_reproducible(
    managers: Managers, tmp_path: pathlib.Path
) -> None:
    cm = managers.open()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("one")
    layout = tmp_path / "layout"
    with import_path(cm, src) as first:
        d1 = export_layout(first, layout, tag="v1")
        assert export_layout(first, layout, tag="v1") == d1  # same bytes, same digest
        export_layout(first, layout, tag="keep", compression=Compression.UNCOMPRESSED)
    (src / "a").write_text("two")
    events: list[ProgressEvent] = []
    with import_path(cm, src) as second:
        d2 = export_layout(second, layout, tag="v1", progress=events.append)
        with pytest.raises(InvalidError, match="tag"):
            export_layout(second, layout, tag="no spaces")
        not_layout = tmp_path / "not-a-layout"
        not_layout.mkdir()
        (not_layout / "file").write_text("x")
        with pytest.raises(InvalidError, match="not empty"):
            export_layout(second, not_layout)
    assert d2.digest != d1.digest
    index = read_json(layout / "index.json")
    names = sorted(m["annotations"][REF_NAME] for m in index["manifests"])
    assert names == ["keep", "v1"]
    [v1] = [m for m in index["manifests"] if m["annotations"][REF_NAME] == "v1"]
    assert v1["digest"] == d2.digest
    # The replaced manifest's blobs stay.
    assert (layout / "blobs" / "sha256" / d1.digest.removeprefix("sha256:")).exists()
    assert next(e.kind for e in events) == "start"
    assert events[-1].kind == "end"
    assert events[-1].current == events[-1].total > 0


def test_concurrent_exports_keep_every_tag(managers: Managers, tmp_path: pathlib.Path) -> None:
    cm = managers.open()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1 << 18))
    layout = tmp_path / "layout"
    with import_path(cm, src) as ref:
        export_layout(ref, layout, tag="first")
        errors: list[BaseException] = []

        def export(tag: str) -> None:
            try:
                export_layout(ref, layout, tag=tag)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=export, args=(f"t{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    index = read_json(layout / "index.json")
    names = sorted(m["annotations"][REF_NAME] for m in index["manifests"])
    assert names == ["first", "t0", "t1", "t2", "t3", "t4", "t5"]
    assert not list(layout.rglob(".*"))


# Pulling a layout into another namespace.


@pytest.fixture
def other(daemon: Daemon, tmp_path: pathlib.Path) -> Iterator[tuple[Manager, Client]]:
    """A manager and a client on a namespace of their own (empty content store)."""
    name = f"t{os.getpid()}-oci-{uuid.uuid4().hex[:8]}"
    with Client(daemon.address, namespace=name) as client:
        try:
            with Manager.open(
                daemon.address,
                namespace=name,
                snapshotter=SNAPSHOTTER,
                state_dir=tmp_path / "other-state",
            ) as cm:
                try:
                    yield cm, client
                finally:
                    with contextlib.suppress(CacheError):
                        cm.prune(PrunePolicy(all=True))
            gc(client)
        finally:
            clean_namespace(client)


def test_pull_layout_is_lazy_until_extracted(
    managers: Managers, other: tuple[Manager, Client], tmp_path: pathlib.Path
) -> None:
    out = import_and_export(managers.open(), tmp_path)
    cm, client = other

    events: list[ProgressEvent] = []
    ref = pull_layout(cm, out.layout, "zst", progress=events.append)
    with ref:
        assert ref.is_lazy()
        assert client.content.list() == []  # nothing pulled yet
        assert snapshot_names(client) == []
        assert events == []
        info = ref.info()
        assert info.media_type == TAR_ZSTD
        assert info.image_refs == (f"oci-layout:{out.layout}:zst",)
        ref.extract()
        assert not ref.is_lazy()
        assert [c.digest for c in client.content.list()] == [info.blob]
        with ref.mount() as root:
            assert_same_tree(root, out.src, mtime_ns=False)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start"
    assert "bytes" in kinds
    assert "end" in kinds
    assert any(e.kind == "status" and "extracting" in e.message for e in events)
    assert all(e.error is None for e in events)

    # The gzip image has the same diff id: its record shares the unpacked snapshot, and
    # its blob need not be pulled.
    with pull_layout(cm, out.layout, "gz", extract=True) as ref:
        assert ref.info().media_type == TAR_GZIP
        with ref.mount() as root:
            assert_same_tree(root, out.src, mtime_ns=False)
        assert [c.digest for c in client.content.list()] == [info.blob]

    # Two tags and no `latest`: the tag must be named.
    with pytest.raises(NotFoundError, match="'latest'"):
        pull_layout(cm, out.layout)
    # The same layout again reuses the records.
    before = {u.id for u in cm.disk_usage()}
    with pull_layout(cm, out.layout, "gz"):
        pass
    assert {u.id for u in cm.disk_usage()} == before
    assert_namespace_empty(cm, client)


def test_pull_layout_follows_an_image_index(
    managers: Managers, other: tuple[Manager, Client], tmp_path: pathlib.Path
) -> None:
    cm0 = managers.open()
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello")
    layout = tmp_path / "layout"
    with import_path(cm0, src) as ref:
        manifest = export_layout(ref, layout, tag="plain")
    here = machine_platform()
    elsewhere = {"os": "plan9", "architecture": "mips"}
    bogus = "sha256:" + "0" * 64  # never read: only this machine's entry is followed
    _add_index(layout, "multi", [(bogus, elsewhere), (manifest.digest, here)])
    _add_index(layout, "foreign", [(manifest.digest, elsewhere)])
    cm, client = other
    with pull_layout(cm, layout, "multi", extract=True) as pulled, pulled.mount() as root:
        assert (root / "hello").read_text() == "hello"
    with pytest.raises(NotFoundError, match="no manifest for"):
        pull_layout(cm, layout, "foreign")
    assert_namespace_empty(cm, client)


def test_export_of_a_lazy_pull(
    managers: Managers, other: tuple[Manager, Client], tmp_path: pathlib.Path
) -> None:
    """A record pulled lazily from one layout is exported to another: the blob is pulled
    through on the way, and the manifest carries none of the cache's own annotations."""
    cm0 = managers.open()
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(1 << 16))
    first = tmp_path / "first"
    with import_path(cm0, src) as ref:
        exported = export_layout(ref, first, tag="v1")
    [layer] = blob_json(first, exported.digest)["layers"]
    cm, client = other
    second = tmp_path / "second"
    with pull_layout(cm, first, "v1") as pulled:
        assert pulled.is_lazy()
        again = export_layout(pulled, second, tag="copy")
    [copied] = blob_json(second, again.digest)["layers"]
    assert copied == layer
    assert not any(
        k.startswith(("containerd.io/", "buildkit")) for k in copied.get("annotations", {})
    )
    assert [c.digest for c in client.content.list()] == [layer["digest"]]
    inspected = run("skopeo", "inspect", f"oci:{second}:copy")
    assert inspected.returncode == 0, inspected.stderr


def _add_index(layout: pathlib.Path, tag: str, entries: list[tuple[str, dict[str, str]]]) -> None:
    """Adds an image index blob of `entries` (manifest digest, platform), tagged `tag`."""
    manifests = []
    for digest, platform in entries:
        path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
        size = path.stat().st_size if path.exists() else 1234
        manifests.append(
            {"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "platform": platform}
        )
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    digest = "sha256:" + hashlib.sha256(data.encode()).hexdigest()
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_text(data)
    index = read_json(layout / "index.json")
    index["manifests"].append(
        {
            "mediaType": OCI_INDEX,
            "digest": digest,
            "size": len(data),
            "annotations": {REF_NAME: tag},
        }
    )
    (layout / "index.json").write_text(json.dumps(index))


def test_pull_of_a_broken_layout_leaves_nothing(
    managers: Managers, client: Client, other: tuple[Manager, Client], tmp_path: pathlib.Path
) -> None:
    client0 = client
    cm0 = managers.open()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "file").write_text("base")
    layout = tmp_path / "layout"
    with import_path(cm0, src) as base:
        (src / "sub" / "file").write_text("top")
        with import_path(cm0, src, parent=base) as top:
            export_layout(top, layout, tag="two")
    manifest = blob_json(layout, read_json(layout / "index.json")["manifests"][0]["digest"])
    assert len(manifest["layers"]) == 2
    # containerd shares blobs between namespaces: a write of a blob the daemon already has
    # is not checked. These blobs must be gone from the daemon for a bad one to be seen.
    cm0.prune(PrunePolicy(all=True))
    gc(client0)
    cm, client = other

    with pytest.raises(NotFoundError, match=r"'nosuch'.*" + str(layout)):
        pull_layout(cm, layout, "nosuch")
    with pytest.raises(NotFoundError, match="no OCI layout"):
        pull_layout(cm, tmp_path / "missing")

    # A layer blob whose bytes are wrong (right size) fails at extraction; the records
    # that the pull made go again.
    top_blob = layout / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    good = top_blob.read_bytes()
    top_blob.write_bytes(bytes(len(good)))
    with pytest.raises(Exception, match=manifest["layers"][1]["digest"][7:19]):
        pull_layout(cm, layout, "two", extract=True)
    assert cm.disk_usage() == []
    top_blob.write_bytes(good)

    # A missing layer blob is found before any record is made.
    top_blob.unlink()
    with pytest.raises(NotFoundError, match=manifest["layers"][1]["digest"]):
        pull_layout(cm, layout, "two")
    assert cm.disk_usage() == []

    # A manifest media type that is not a manifest.
    index = read_json(layout / "index.json")
    index["manifests"][0]["mediaType"] = "application/vnd.example.unknown+json"
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidError, match="unknown"):
        pull_layout(cm, layout, "two")
    assert cm.disk_usage() == []
    assert_namespace_empty(cm, client)


# Importing tars.


def sample_tar() -> bytes:
    """A tar with a directory, files, a symlink and a hard link, fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(
            name: str, kind: bytes, data: bytes = b"", link: str = "", mode: int = 0o644
        ) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = mode
            info.mtime = 1_600_000_000
            info.linkname = link
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("dir", tarfile.DIRTYPE, mode=0o750)
        add("dir/file", tarfile.REGTYPE, b"content\n", mode=0o640)
        add("dir/link", tarfile.SYMTYPE, link="file")
        add("dir/abs-link", tarfile.SYMTYPE, link="/etc/passwd")  # a symlink may point anywhere
        add("hard", tarfile.LNKTYPE, link="dir/file")
    return buf.getvalue()


def test_import_tar_in_every_compression(managers: Managers, tmp_path: pathlib.Path) -> None:
    cm = managers.open()
    tar = sample_tar()
    blobs = {
        "plain": tar,
        "gzip": gzip.compress(tar),
        "zstd": zstandard.ZstdCompressor().compress(tar),
    }
    for name, blob in blobs.items():
        path = tmp_path / f"layer.{name}"
        path.write_bytes(blob)
        events: list[ProgressEvent] = []
        ref = import_path(cm, path, cache_policy=CachePolicy.RETAIN, progress=events.append)
        with ref:
            assert ref.cache_policy is CachePolicy.RETAIN
            with ref.mount() as root:
                assert (root / "dir" / "file").read_text() == "content\n"
                assert stat.S_IMODE((root / "dir").stat().st_mode) == 0o750
                assert os.readlink(root / "dir" / "link") == "file"
                assert os.readlink(root / "dir" / "abs-link") == "/etc/passwd"
                assert (root / "hard").stat().st_ino == (root / "dir" / "file").stat().st_ino
            # The blob made for the record unpacks to the same tree.
            remote = ref.get_remote(compression=Compression.UNCOMPRESSED)
            assert remote.descriptors[0].media_type == TAR
        assert events[-1].kind == "end"
        assert events[-1].current == events[-1].total == len(blob)
    assert len(cm.disk_usage()) == 3


def _tar_with(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ok = tarfile.TarInfo("fine")
        tar.addfile(ok, None)
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        tar.addfile(info, None)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        pytest.param(_tar_with("/abs/file"), "'/abs/file'", id="absolute"),
        pytest.param(_tar_with("../x"), "'../x'", id="dotdot"),
        pytest.param(_tar_with("a/../../x"), "'a/../../x'", id="inner-dotdot"),
        pytest.param(
            gzip.compress(_tar_with("evil", tarfile.LNKTYPE, "../../etc/passwd")),
            "'../../etc/passwd'",
            id="hardlink-gzip",
        ),
        pytest.param(
            zstandard.ZstdCompressor().compress(_tar_with("/etc/shadow")),
            "'/etc/shadow'",
            id="absolute-zstd",
        ),
        pytest.param(gzip.compress(b"not a tar at all" * 100), "not a valid tar", id="garbage"),
        pytest.param(b"BZh91AY&SY" + bytes(100), "gzip and zstd", id="bzip2"),
    ],
)
def test_import_refuses_bad_tars(
    managers: Managers, client: Client, tmp_path: pathlib.Path, blob: bytes, fragment: str
) -> None:
    cm = managers.open()
    path = tmp_path / "layer.tar"
    path.write_bytes(blob)
    with pytest.raises(InvalidError, match=fragment.replace(".", r"\.")):
        import_path(cm, path)
    assert cm.disk_usage() == []
    assert_namespace_empty(cm, client)


def test_import_failures_leave_nothing(
    managers: Managers, client: Client, tmp_path: pathlib.Path
) -> None:
    cm = managers.open()
    with pytest.raises(NotFoundError, match=str(tmp_path / "missing")):
        import_path(cm, tmp_path / "missing")

    # A failure in the middle of the stream (here the progress callback) removes the
    # mutable record and everything containerd held for it.
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(4 << 20))

    def fail(event: ProgressEvent) -> None:
        if event.kind == "bytes" and event.current > 1 << 20:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        import_path(cm, src, cache_policy=CachePolicy.RETAIN, progress=fail)
    assert _import_threads() == []
    assert client.content.list_statuses() == []
    assert cm.disk_usage() == []
    assert_namespace_empty(cm, client)


def _import_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "pyctrd-cache-import"]


SYSFS_FILE = pathlib.Path("/sys/kernel/uevent_seqnum")


@pytest.mark.skipif(not SYSFS_FILE.exists(), reason="no sysfs")
def test_import_of_a_file_shorter_than_its_size_fails_with_the_tar_writers_error(
    managers: Managers, client: Client, tmp_path: pathlib.Path
) -> None:
    # A sysfs file says 4096 bytes and reads fewer: the tar writer fails mid-stream, and its
    # error, not the diff service's on the short stream, is the one raised.
    cm = managers.open()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(1 << 20))
    short = src / "short"
    short.touch()
    subprocess.run(["mount", "--bind", str(SYSFS_FILE), str(short)], check=True)
    try:
        assert short.stat().st_size > len(short.read_bytes())
        with pytest.raises(InvalidError, match=re.escape(f"cannot read {src}: unexpected end")):
            import_path(cm, src)
    finally:
        subprocess.run(["umount", str(short)], check=True)
    assert _import_threads() == []
    assert cm.disk_usage() == []
    assert_namespace_empty(cm, client)


def test_import_directory_on_a_parent(managers: Managers, tmp_path: pathlib.Path) -> None:
    cm = managers.open()
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "keep").write_text("base")
    top_dir = tmp_path / "top"
    top_dir.mkdir()
    (top_dir / "added").write_text("top")
    with import_path(cm, base_dir) as base, import_path(cm, top_dir, parent=base) as top:
        assert top.info().parent_id == base.id
        with top.mount() as root:
            assert sorted(p.name for p in root.iterdir()) == ["added", "keep"]
        layout = tmp_path / "layout"
        manifest = export_layout(top, layout)
        document = blob_json(layout, manifest.digest)
        assert len(document["layers"]) == 2
        config = blob_json(layout, document["config"]["digest"])
        assert len(config["rootfs"]["diff_ids"]) == len(config["history"]) == 2
    unpacked = run("umoci", "unpack", "--image", f"{layout}:latest", str(tmp_path / "bundle"))
    assert unpacked.returncode == 0, unpacked.stderr
    rootfs = tmp_path / "bundle" / "rootfs"
    assert sorted(p.name for p in rootfs.iterdir()) == ["added", "keep"]


def test_pull_of_a_single_untagged_manifest(managers: Managers, tmp_path: pathlib.Path) -> None:
    cm = managers.open()
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("x")
    layout = tmp_path / "layout"
    with import_path(cm, src) as ref:
        export_layout(ref, layout, tag="only")
        blob = ref.info().blob
    with pull_layout(cm, layout) as pulled:  # the only manifest, whatever its tag
        assert pulled.info().blob == blob
        assert f"oci-layout:{layout}:only" in pulled.info().image_refs
