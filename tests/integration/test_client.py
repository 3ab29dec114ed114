"""The thin client against real containerd daemons (nothing here is faked)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import zstandard

from pyctrd_cache.client import Client, LeaseResource, Mount, SnapshotKind
from pyctrd_cache.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)
from tests.fix_containerd import SNAPSHOTTER, Daemon
from tests.layers import TAR, TAR_GZIP, TAR_ZSTD, compress, descriptor, digest_of, make_tar

MiB = 1 << 20


def test_version_and_plugins(daemon: Daemon, client: Client) -> None:
    version = client.check(snapshotter=SNAPSHOTTER)
    assert version.version.startswith("{}.{}.{}".format(*daemon.version))
    plugins = client.introspection.snapshotters()
    by_id = {p.id: p for p in plugins}
    assert by_id[SNAPSHOTTER].ok
    assert by_id["native"].ok
    assert "root" in by_id[SNAPSHOTTER].exports
    assert client.introspection.server().uuid


def test_check_reports_missing_snapshotter_and_socket(
    client: Client, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(NotFoundError, match=r"no snapshotter 'nosuch'.*overlayfs"):
        client.check(snapshotter="nosuch")
    with (
        Client(str(tmp_path / "none.sock")) as other,
        pytest.raises(UnavailableError, match=r"no containerd socket at"),
    ):
        other.check()


def test_invalid_namespace_is_refused_before_any_call(daemon: Daemon) -> None:
    with pytest.raises(InvalidError, match=r"invalid containerd namespace 'bad/name'"):
        Client(daemon.address, namespace="bad/name")


def _lease(client: Client) -> Client:
    lease = client.leases.create(f"test-{uuid.uuid4().hex}", flat=True)
    return client.with_lease(lease.id)


def test_snapshots_life_cycle(client: Client) -> None:
    started = datetime.now(UTC)
    leased = _lease(client)
    sn = leased.snapshots(SNAPSHOTTER)

    mounts = sn.prepare("base-active", labels={"a": "1"})
    assert len(mounts) == 1
    assert mounts[0].type == "bind"
    assert "rw" in mounts[0].options
    assert sn.mounts("base-active") == mounts
    assert sn.stat("base-active").kind is SnapshotKind.ACTIVE
    assert sn.stat("base-active").labels == {"a": "1"}

    sn.commit("base", "base-active", labels={"b": "2"})
    info = sn.stat("base")
    assert info.kind is SnapshotKind.COMMITTED
    assert info.labels == {"b": "2"}
    assert info.created_at is not None
    assert started <= info.created_at <= datetime.now(UTC)
    with pytest.raises(NotFoundError) as missing:
        sn.stat("base-active")
    assert missing.value.rpc == "Snapshots.Stat"
    assert missing.value.message

    updated = sn.update_labels("base", {"c": "3"})
    assert updated.labels == {"b": "2", "c": "3"}
    updated = sn.update_labels("base", {}, fields=["b"])
    assert updated.labels == {"c": "3"}

    view = sn.view("base-view", "base")
    assert "ro" in view[0].options
    assert sn.stat("base-view").kind is SnapshotKind.VIEW
    with pytest.raises(FailedPreconditionError):
        sn.commit("nope", "base-view")

    child = sn.prepare("child", "base")
    assert child[0].type == "overlay"
    assert sn.stat("child").parent == "base"
    with pytest.raises(AlreadyExistsError):
        sn.prepare("child", "base")
    with pytest.raises(FailedPreconditionError, match=r"child"):
        sn.remove("base")
    with pytest.raises(NotFoundError):
        sn.prepare("orphan", "no-such-parent")

    names = {i.name for i in sn.list()}
    assert names == {"base", "base-view", "child"}
    assert [i.name for i in sn.list("kind==view")] == ["base-view"]
    assert sn.usage("base").inodes >= 1

    for key in ("child", "base-view", "base"):
        sn.remove(key)
    assert sn.list() == []


class _PatternStream:
    """A readable stream of `size` pseudo-random bytes that never exists whole in memory."""

    def __init__(self, size: int, seed: bytes = b"seed") -> None:
        self.size = size
        self.position = 0
        self._block = hashlib.sha512(seed).digest() * (64 * 1024 // 64)  # 64 KiB

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.position
        n = left if n < 0 else min(n, left)
        out = bytearray()
        while len(out) < n:
            offset = (self.position + len(out)) % len(self._block)
            out += self._block[offset : offset + n - len(out)]
        self.position += n
        return bytes(out)

    def seekable(self) -> bool:
        return False

    def digest(self) -> str:
        h = hashlib.sha256()
        copy = _PatternStream(self.size)
        copy._block = self._block
        while chunk := copy.read(MiB):
            h.update(chunk)
        return "sha256:" + h.hexdigest()


def test_content_large_blob_streams_with_bounded_memory(client: Client) -> None:
    size = 64 * MiB
    stream = _PatternStream(size)
    expected = stream.digest()
    leased = _lease(client)

    tracemalloc.start()
    try:
        assert leased.content.write("big", stream, expected=expected, size=size)  # type: ignore[arg-type]
        info = leased.content.info(expected)
        h = hashlib.sha256()
        read = 0
        for chunk in leased.content.read(expected):
            assert len(chunk) <= MiB
            h.update(chunk)
            read += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.digest == expected
    assert info.size == size
    assert read == size
    assert "sha256:" + h.hexdigest() == expected
    assert peak < 16 * MiB, f"peak traced memory {peak} bytes for a {size}-byte blob"

    with leased.content.open(expected) as f:
        assert f.read(10) == _PatternStream(size).read(10)
    assert b"".join(leased.content.read(expected, offset=size - 5)) == _tail(size, 5)

    labelled = leased.content.update_labels(expected, {"x": "1", "y": "2"})
    assert labelled.labels == {"x": "1", "y": "2"}
    assert leased.content.update_labels(expected, {}, fields=["x"]).labels == {"y": "2"}
    assert [i.digest for i in leased.content.list("labels.y==2")] == [expected]
    assert [i.digest for i in leased.content.walk("labels.y==2")] == [expected]

    leased.content.delete(expected)
    with pytest.raises(NotFoundError):
        leased.content.info(expected)


def _tail(size: int, n: int) -> bytes:
    s = _PatternStream(size)
    s.read(size - n)
    return s.read(n)


def test_content_write_resumes_an_interrupted_ingest(client: Client) -> None:
    data = os.urandom(3 * MiB + 17)
    expected = digest_of(data)
    leased = _lease(client)

    with leased.content.writer("resume-me", expected=expected, total=len(data)) as w:
        assert w.offset == 0
        w.write(data[: len(data) // 2])
    status = leased.content.status("resume-me")
    assert status.offset == len(data) // 2
    assert [s.ref for s in leased.content.list_statuses()] == ["resume-me"]

    with leased.content.writer("resume-me", expected=expected, total=len(data)) as w:
        assert w.offset == len(data) // 2
        w.write(data[w.offset :])
        assert w.commit(size=len(data), expected=expected) == expected
    assert leased.content.info(expected).size == len(data)
    assert leased.content.list_statuses() == []

    # Writing it again is answered as "already there".
    labels = {"x": "y"}
    assert not leased.content.write(
        "resume-me", data, expected=expected, size=len(data), labels=labels
    )
    assert leased.content.info(expected).labels == labels


def test_content_write_rejects_wrong_bytes_and_leaves_nothing(client: Client) -> None:
    data = b"the real bytes"
    leased = _lease(client)
    with pytest.raises(FailedPreconditionError, match=r"Content\.Write"):
        leased.content.write("liar", b"other bytes!!!", expected=digest_of(data), size=len(data))
    assert leased.content.list_statuses() == []
    with pytest.raises(NotFoundError):
        leased.content.info(digest_of(data))
    with pytest.raises(InvalidError):
        leased.content.info("sha256:not-a-digest")


def test_lease_holds_content_and_snapshot_until_deleted(client: Client) -> None:
    lease = client.leases.create("holder", labels={"owner": "test"})
    assert lease.labels == {"owner": "test"}
    leased = client.with_lease("holder")
    blob = b"leased blob"
    leased.content.write("r1", blob, expected=digest_of(blob), size=len(blob))
    leased.snapshots(SNAPSHOTTER).prepare("held")
    resources = set(client.leases.list_resources("holder"))
    assert LeaseResource.content(digest_of(blob)) in resources
    assert LeaseResource.snapshot(SNAPSHOTTER, "held") in resources
    assert [x.id for x in client.leases.list("labels.owner==test")] == ["holder"]
    with pytest.raises(AlreadyExistsError):
        client.leases.create("holder")

    client.leases.delete("holder", sync=True)
    with pytest.raises(NotFoundError):
        client.content.info(digest_of(blob))
    with pytest.raises(NotFoundError):
        client.snapshots(SNAPSHOTTER).stat("held")
    with pytest.raises(NotFoundError):
        client.leases.delete("holder")


def test_lease_resources_can_be_added_and_removed(client: Client) -> None:
    blob = b"added later"
    writer = _lease(client)
    writer.content.write("r", blob, expected=digest_of(blob), size=len(blob))
    client.leases.create("second")
    client.leases.add_resource("second", LeaseResource.content(digest_of(blob)))
    assert client.leases.list_resources("second") == [LeaseResource.content(digest_of(blob))]
    client.leases.delete_resource("second", LeaseResource.content(digest_of(blob)))
    assert client.leases.list_resources("second") == []
    with pytest.raises(NotFoundError):
        client.leases.add_resource("missing", LeaseResource.content(digest_of(blob)))


def _upper(mounts: list[Mount]) -> pathlib.Path:
    """The directory a single bind or overlay mount writes to."""
    (m,) = mounts
    if m.type == "bind":
        return pathlib.Path(m.source)
    (upper,) = [o.removeprefix("upperdir=") for o in m.options if o.startswith("upperdir=")]
    return pathlib.Path(upper)


@pytest.mark.parametrize("media_type", [TAR, TAR_GZIP, TAR_ZSTD])
def test_diff_applies_plain_gzip_and_zstd_layers(client: Client, media_type: str) -> None:
    tar = make_tar({"etc/hello.txt": b"hello\n", "bin/tool": b"#!/bin/sh\n"})
    blob = compress(tar, media_type)
    desc = descriptor(blob, media_type)
    leased = _lease(client)
    leased.content.write("layer", blob, expected=desc.digest, size=desc.size)
    mounts = leased.snapshots(SNAPSHOTTER).prepare("apply-target")

    applied = leased.diff.apply(desc, mounts)

    assert applied.digest == digest_of(tar)
    assert applied.media_type == TAR
    assert applied.size == len(tar)
    assert (_upper(mounts) / "etc/hello.txt").read_bytes() == b"hello\n"


def test_diff_apply_of_corrupt_blob_is_a_clear_error(client: Client) -> None:
    blob = gzip.compress(make_tar({"a": b"a" * 1000}))[:-20]
    desc = descriptor(blob, TAR_GZIP)
    leased = _lease(client)
    leased.content.write("corrupt", blob, expected=desc.digest, size=desc.size)
    mounts = leased.snapshots(SNAPSHOTTER).prepare("corrupt-target")
    with pytest.raises(Exception, match=r"Diff\.Apply") as err:
        leased.diff.apply(desc, mounts)
    assert type(err.value).__module__ == "pyctrd_cache.errors"
    missing = descriptor(b"never written", TAR)
    with pytest.raises(NotFoundError, match=r"Diff\.Apply"):
        leased.diff.apply(missing, mounts)


def test_diff_produces_layers(daemon: Daemon, client: Client) -> None:
    leased = _lease(client)
    sn = leased.snapshots(SNAPSHOTTER)
    base_tar = make_tar({"base.txt": b"base\n"})
    base = descriptor(base_tar, TAR)
    leased.content.write("base", base_tar, expected=base.digest, size=base.size)
    leased.diff.apply(base, sn.prepare("base-active"))
    sn.commit("base", "base-active")
    upper = sn.prepare("top", "base")
    (_upper(upper) / "new.txt").write_bytes(b"new file\n")
    lower = sn.view("base-view", "base")

    plain = leased.diff.diff(lower, upper, media_type=TAR)
    assert plain.media_type == TAR
    plain_bytes = b"".join(leased.content.read(plain.digest))
    assert digest_of(plain_bytes) == plain.digest
    assert b"new file" in plain_bytes

    gz = leased.diff.diff(lower, upper, media_type=TAR_GZIP, labels={"made-by": "test"})
    assert gz.media_type == TAR_GZIP
    labels = leased.content.info(gz.digest).labels
    assert labels["made-by"] == "test"
    uncompressed = gzip.decompress(b"".join(leased.content.read(gz.digest)))
    assert labels["containerd.io/uncompressed"] == digest_of(uncompressed)

    if daemon.version >= (2, 0, 1):
        zst = leased.diff.diff(lower, upper, media_type=TAR_ZSTD)
        data = (
            zstandard.ZstdDecompressor()
            .decompressobj()
            .decompress(b"".join(leased.content.read(zst.digest)))
        )
        assert leased.content.info(zst.digest).labels["containerd.io/uncompressed"] == digest_of(
            data
        )
    else:
        with pytest.raises(UnimplementedError, match=r"Diff\.Diff"):
            leased.diff.diff(lower, upper, media_type=TAR_ZSTD)


def test_namespaces(client: Client) -> None:
    blob = b"x"
    _lease(client).content.write("x", blob, expected=digest_of(blob), size=1)
    assert client.namespace in {n.name for n in client.namespaces.list()}
    with pytest.raises(AlreadyExistsError):
        client.namespaces.create(client.namespace)
    with pytest.raises(FailedPreconditionError):
        client.namespaces.delete(client.namespace)


@pytest.fixture
def restarting(daemon: Daemon, namespace: str) -> Iterator[Daemon]:
    """The daemon, started again after the test (before its namespace is cleaned)."""
    daemon.restartable()
    yield daemon
    assert daemon.embedded is not None
    daemon.embedded.start()


def test_idempotent_calls_survive_a_daemon_restart(restarting: Daemon, client: Client) -> None:
    embedded = restarting.embedded
    assert embedded is not None
    blob = b"survives restarts"
    leased = _lease(client)
    leased.content.write("r", blob, expected=digest_of(blob), size=len(blob))

    embedded.stop()
    with pytest.raises(UnavailableError, match=r"Snapshots\.Prepare"):
        leased.snapshots(SNAPSHOTTER).prepare("while-down")

    starter = threading.Timer(1.0, embedded.start)
    starter.start()
    try:
        began = time.monotonic()
        info = client.content.info(digest_of(blob))
        assert time.monotonic() - began >= 0.5
    finally:
        starter.join()
    assert info.size == len(blob)
    assert b"".join(client.content.read(digest_of(blob))) == blob


def test_retry_budget_runs_out_with_unavailable(restarting: Daemon, client: Client) -> None:
    embedded = restarting.embedded
    assert embedded is not None
    embedded.kill()
    quick = Client(restarting.address, namespace=client.namespace, retry_budget=0.5)
    with quick, pytest.raises(UnavailableError, match=r"gave up after 0\.5s"):
        quick.leases.list()


def _snapshot_dir(mounts: list[Mount]) -> pathlib.Path:
    """The overlayfs snapshotter's directory of a new snapshot, from its mounts."""
    (mount,) = mounts
    if mount.type == "bind":
        return pathlib.Path(mount.source).parent
    (upper,) = [o.removeprefix("upperdir=") for o in mount.options if o.startswith("upperdir=")]
    return pathlib.Path(upper).parent


@pytest.mark.parametrize("create", ["prepare", "view"])
def test_create_meets_a_directory_left_by_a_killed_daemon(
    daemon: Daemon, client: Client, create: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The state a SIGKILL leaves between the snapshotter's rename and its store's commit: a
    # directory under the next snapshot id, which the rolled-back sequence hands out again.
    daemon.restartable()
    sn = _lease(client).snapshots(SNAPSHOTTER)
    first = _snapshot_dir(sn.prepare("first"))
    stray = first.with_name(str(int(first.name) + 1))
    (stray / "fs").mkdir(parents=True)
    (stray / "fs" / "left-behind").write_text("from before the kill")
    if create == "view":
        sn.commit("base", "first")

    caplog.set_level("WARNING", logger="pyctrd_cache.client.snapshots")
    if create == "prepare":
        assert _snapshot_dir(sn.prepare("second")) == stray
    else:
        sn.view("second", "base")  # mounts the parent's directory; its own is the stray id
    assert (stray / "fs").is_dir()
    assert not (stray / "fs" / "left-behind").exists()
    assert sn.stat("second").name == "second"
    assert "met a directory left by a killed containerd" in caplog.text
