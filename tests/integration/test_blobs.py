"""Ports of BuildKit's TestLazyGetByBlob, TestSnapshotExtract, TestExtractOnMutable and
TestSetBlob, and lazy pulls with their failures, against real containerd daemons."""

from __future__ import annotations

import contextlib
import gc as collector
import hashlib
import io
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from pyctrd_cache import (
    CacheError,
    DescHandler,
    Descriptor,
    InvalidError,
    Manager,
    NeedsRemoteProvidersError,
    NotFoundError,
    ProgressEvent,
    PrunePolicy,
    refs,
)
from pyctrd_cache.client import Client
from tests.checks import blob_count, check_disk_usage, gc, owned_leases, snapshot_names
from tests.fix_containerd import Managers
from tests.layers import TAR, TAR_GZIP, BytesProvider, digest_of, layer

UNCOMPRESSED = "containerd.io/uncompressed"


def sha(data: str) -> str:
    return digest_of(data.encode())


class Writer:
    """Writes blobs that a lease of the test holds until `drop` (containerd collects
    unleased content at once), as a puller would before the records take them over."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.lease = client.leases.create(f"test-{uuid.uuid4().hex}").id

    def __call__(self, blob: bytes, desc: Descriptor) -> None:
        leased = self.client.with_lease(self.lease).content
        leased.write(f"w-{desc.digest}", blob, expected=desc.digest, size=desc.size)

    def drop(self) -> None:
        with contextlib.suppress(NotFoundError):
            self.client.leases.delete(self.lease)


@pytest.fixture
def write(client: Client) -> Iterator[Writer]:
    writer = Writer(client)
    yield writer
    writer.drop()


def test_lazy_get_by_blob(managers: Managers) -> None:
    cm = managers.open()
    # moby/buildkit#2226: lazy blobs with one diff id and different digests (compression)
    blob, desc = layer({"foo": b"bar"}, TAR_GZIP)
    blob2, desc2 = layer({"foo": b"bar"}, TAR)
    assert desc.digest != desc2.digest
    assert desc.annotations[UNCOMPRESSED] == desc2.annotations[UNCOMPRESSED]
    provider = BytesProvider(blob, blob2)
    ref = cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(provider)})
    ref2 = cm.get_by_blob(desc2, desc_handlers={desc2.digest: DescHandler(provider)})
    assert ref.is_lazy()
    assert ref2.is_lazy()
    assert ref.info().chain_id == ref2.info().chain_id
    assert ref.info().blob_chain_id != ref2.info().blob_chain_id
    assert ref2.info().snapshot_id == ref.info().snapshot_id
    assert provider.opened == {}
    ref.release()
    ref2.release()


def test_snapshot_extract(managers: Managers, client: Client, write: Writer) -> None:
    cm = managers.open()
    b, desc = layer({"foo": b"bar"})
    write(b, desc)
    snap = cm.get_by_blob(desc)
    assert snap.info().blob_only

    b2, desc2 = layer({"foo": b"bar123"})
    write(b2, desc2)
    snap2 = cm.get_by_blob(desc2, snap)
    write.drop()
    assert snap2.size() == len(b2)
    assert snap2.info().blob_only
    assert snapshot_names(client) == []
    assert blob_count(client) == 2

    snap2.extract()
    assert not snap.info().blob_only
    assert not snap2.info().blob_only
    assert len(snapshot_names(client)) == 2

    assert cm.prune() == []
    check_disk_usage(cm, 2, 0)
    assert len(snapshot_names(client)) == 2
    assert blob_count(client) == 2

    record_id = snap.id
    snap.release()
    assert cm.prune() == []
    check_disk_usage(cm, 2, 0)
    assert len(snapshot_names(client)) == 2

    snap = cm.get(record_id)
    check_disk_usage(cm, 2, 0)
    snap2.release()
    check_disk_usage(cm, 1, 1)

    assert len(cm.prune()) == 1
    check_disk_usage(cm, 1, 0)
    assert len(snapshot_names(client)) == 1
    assert blob_count(client) == 1

    snap.release()
    cm.prune()
    check_disk_usage(cm, 0, 0)
    assert snapshot_names(client) == []
    assert blob_count(client) == 0


def test_extract_on_mutable(managers: Managers, client: Client, write: Writer) -> None:
    cm = managers.open()
    snap = cm.new().commit()
    b, desc = layer({"foo": b"bar"})
    write(b, desc)
    b2, desc2 = layer({"foo2": b"1"})
    write(b2, desc2)

    with pytest.raises(InvalidError, match="no chain ids"):
        cm.get_by_blob(desc2, snap)

    snap.set_blob(desc)
    snap2 = cm.get_by_blob(desc2, snap)
    write.drop()
    snap.release()
    assert snap2.info().blob_only
    assert snap2.size() == len(b2)
    assert len(snapshot_names(client)) == 1
    assert blob_count(client) == 2

    snap2.extract()
    assert not snap2.info().blob_only
    assert cm.prune() == []
    check_disk_usage(cm, 2, 0)
    assert len(snapshot_names(client)) == 2

    snap2.release()
    check_disk_usage(cm, 0, 2)
    assert len(cm.prune()) == 2
    check_disk_usage(cm, 0, 0)
    assert snapshot_names(client) == []
    assert blob_count(client) == 0


def test_set_blob(managers: Managers, write: Writer) -> None:
    cm = managers.open()
    snap = cm.new().commit()
    info = snap.info()
    assert (info.diff_id, info.blob, info.chain_id, info.blob_chain_id) == (None,) * 4
    assert not info.blob_only

    b, desc = layer({"foo": b"bar"})
    write(b, desc)
    with pytest.raises(InvalidError):
        snap.set_blob(Descriptor("", sha("foobar"), 0, {UNCOMPRESSED: sha("foobar2")}))
    with pytest.raises(NotFoundError):
        snap.set_blob(Descriptor(TAR_GZIP, sha("foobar"), 0, {UNCOMPRESSED: sha("foobar2")}))

    snap.set_blob(desc)
    info = snap.info()
    assert info.diff_id == desc.annotations[UNCOMPRESSED]
    assert info.blob == desc.digest
    assert info.media_type == desc.media_type
    assert info.chain_id == info.diff_id
    assert info.blob_chain_id == digest_of(f"{desc.digest} {info.diff_id}".encode())
    assert info.snapshot_id == snap.id
    assert not info.blob_only
    # a second blob changes nothing
    other_blob, other = layer({"other": b"x"})
    write(other_blob, other)
    snap.set_blob(other)
    assert snap.info().blob == desc.digest

    snap2 = cm.new(snap).commit()
    b2, desc2 = layer({"foo2": b"bar2"})
    write(b2, desc2)
    snap2.set_blob(desc2)
    info2 = snap2.info()
    assert info2.diff_id == desc2.annotations[UNCOMPRESSED]
    assert info2.blob == desc2.digest
    assert info2.chain_id == digest_of(f"{info.chain_id} {info2.diff_id}".encode())
    inner2 = digest_of(f"{desc2.digest} {info2.diff_id}".encode())
    assert info2.blob_chain_id == digest_of(f"{info.blob_chain_id} {inner2}".encode())
    assert info2.snapshot_id == snap2.id
    assert not info2.blob_only

    b3, desc3 = layer({"foo3": b"bar3"})
    write(b3, desc3)
    snap3 = cm.get_by_blob(desc3, snap)
    info3 = snap3.info()
    assert info3.diff_id == desc3.annotations[UNCOMPRESSED]
    assert info3.blob == desc3.digest
    assert info3.chain_id == digest_of(f"{info.chain_id} {info3.diff_id}".encode())
    inner3 = digest_of(f"{desc3.digest} {info3.diff_id}".encode())
    assert info3.blob_chain_id == digest_of(f"{info.blob_chain_id} {inner3}".encode())
    assert info3.snapshot_id == info3.chain_id
    assert info3.blob_only

    # snap4 is the same as snap2
    snap4 = cm.get_by_blob(desc2, snap)
    assert snap4.id == snap2.id

    # snap5 has a different blob with the same diff id as snap2
    b5, desc5 = layer({"foo5": b"bar5"})
    desc5 = Descriptor(desc5.media_type, desc5.digest, desc5.size, {UNCOMPRESSED: info2.diff_id})
    write(b5, desc5)
    snap5 = cm.get_by_blob(desc5, snap)
    info5 = snap5.info()
    assert snap5.id != snap2.id
    assert info5.snapshot_id == info2.snapshot_id
    assert info5.diff_id == info2.diff_id
    assert info5.blob == desc5.digest
    assert info5.chain_id == info2.chain_id
    assert info5.blob_chain_id != info2.blob_chain_id
    inner5 = digest_of(f"{desc5.digest} {info2.diff_id}".encode())
    assert info5.blob_chain_id == digest_of(f"{info.blob_chain_id} {inner5}".encode())

    # snap6 is a child of snap3
    b6, desc6 = layer({"foo6": b"bar6"})
    write(b6, desc6)
    snap6 = cm.get_by_blob(desc6, snap3)
    info6 = snap6.info()
    assert info6.chain_id == digest_of(f"{info3.chain_id} {info6.diff_id}".encode())
    inner6 = digest_of(f"{info6.blob} {info6.diff_id}".encode())
    assert info6.blob_chain_id == digest_of(f"{info3.blob_chain_id} {inner6}".encode())
    assert info6.snapshot_id == info6.chain_id
    assert info6.blob_only

    missing = Descriptor(TAR_GZIP, sha("notexist"), 1, {UNCOMPRESSED: sha("notexist")})
    with pytest.raises(NeedsRemoteProvidersError) as err:
        cm.get_by_blob(missing, snap3)
    assert err.value.digests == [missing.digest]
    for ref in (snap, snap2, snap3, snap4, snap5, snap6):
        ref.release()


def test_lazy_chain_is_pulled_and_extracted_with_progress(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    b1, d1 = layer({"a/one": b"1"})
    b2, d2 = layer({"a/two": b"2"})
    provider = BytesProvider(b1, b2)
    events: list[ProgressEvent] = []
    lock = threading.Lock()

    def progress(event: ProgressEvent) -> None:
        with lock:
            events.append(event)

    dhs = {
        d1.digest: DescHandler(provider, progress=progress),
        d2.digest: DescHandler(provider, progress=progress),
    }
    base = cm.get_by_blob(d1, desc_handlers=dhs, image_ref="registry.test:5000/lib/base:1")
    top = cm.get_by_blob(d2, base, desc_handlers=dhs)
    assert top.is_lazy()
    assert blob_count(client) == 0
    with pytest.raises(NeedsRemoteProvidersError) as missing:
        cm.get(top.id)
    assert sorted(missing.value.digests) == sorted([d1.digest, d2.digest])

    work = cm.new(top)  # extracts the lazy chain first
    with work.mount() as root:
        assert (root / "a" / "one").read_bytes() == b"1"
        assert (root / "a" / "two").read_bytes() == b"2"
    work.release()
    assert not top.is_lazy()
    assert provider.opened == {d1.digest: 1, d2.digest: 1}
    kinds = {(e.digest, e.kind) for e in events}
    for d in (d1, d2):
        assert {(d.digest, "start"), (d.digest, "bytes"), (d.digest, "end")} <= kinds
        assert (d.digest, "status") in kinds
    assert any(e.message == f"extracting {d2.digest}" for e in events)
    assert base.description == "pulled from registry.test:5000/lib/base:1"

    # Already here: no more handlers needed.
    again = cm.get(top.id)
    again.release()
    base.release()
    top.release()
    cm.prune(PrunePolicy(all=True))
    assert blob_count(client) == 0
    assert snapshot_names(client) == []


def waiting_inside_extract(threads: list[threading.Thread]) -> bool:
    """Whether every thread is blocked (on a lock, condition or join) inside
    `ImmutableRef.extract`."""
    # CPython 3.11's sys._current_frames can deadlock when a garbage collection starts
    # inside it, as it allocates while holding the runtime's thread list lock (seen hung in
    # gc_collect_main under _PyThread_CurrentFrames beside grpc's threads).
    collector.disable()
    try:
        frames = sys._current_frames()
    finally:
        collector.enable()
    for thread in threads:
        frame = frames.get(thread.ident) if thread.ident is not None else None
        if frame is None or frame.f_code.co_filename != threading.__file__:
            return False
        calls = set()
        while frame is not None:
            calls.add((frame.f_code.co_filename, frame.f_code.co_name))
            frame = frame.f_back
        if (refs.ImmutableRef.extract.__code__.co_filename, "extract") not in calls:
            return False
    return True


def test_concurrent_extractions_share_one_pull(managers: Managers) -> None:
    cm = managers.open()
    blob, desc = layer({"big": b"x" * (4 << 20)})

    class Slow(BytesProvider):
        def open(self, d: Descriptor) -> io.BytesIO:
            stream = super().open(d)
            gate.wait()
            return stream  # type: ignore[return-value]

    gate = threading.Event()
    provider = Slow(blob)
    ref = cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(provider)})
    clones = [ref.clone() for _ in range(6)]
    threads = [threading.Thread(target=c.extract) for c in clones]
    for t in threads:
        t.start()
    # The gate opens once all six wait inside extract: one on the gate, the others on it
    # (or after 30 s, within the provider's 60 s stall timeout).
    deadline = time.monotonic() + 30
    while not (inside := waiting_inside_extract(threads)) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join()
    assert inside, "the extractions were never all waiting inside extract at once"
    assert provider.opened == {desc.digest: 1}
    assert not ref.info().blob_only
    for c in (ref, *clones):
        c.release()


class _Lying(BytesProvider):
    def __init__(self, blob: bytes, served: bytes) -> None:
        super().__init__(blob)
        self.served = served

    def open(self, desc: Descriptor) -> io.BytesIO:
        super().open(desc)
        return io.BytesIO(self.served)


class _Failing(BytesProvider):
    def open(self, desc: Descriptor) -> io.BytesIO:
        raise OSError("connection reset by peer")


def _assert_clean_after_prune(cm: Manager, client: Client) -> None:
    cm.prune(PrunePolicy(all=True))
    gc(client)
    assert blob_count(client) == 0
    assert client.content.list_statuses() == []
    assert snapshot_names(client) == []
    assert owned_leases(client, cm) == []


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda b: _Lying(b, b[:-7]), CacheError, "size"),
        (lambda b: _Lying(b, b[:-1] + bytes([b[-1] ^ 1])), CacheError, "digest"),
        (lambda b: _Lying(b, b + b"trailing"), InvalidError, "more than"),
        (lambda b: _Failing(b), CacheError, "connection reset"),
    ],
    ids=["short", "wrong-bytes", "too-long", "raises"],
)
def test_bad_providers_give_clear_errors_and_leave_nothing(
    managers: Managers,
    client: Client,
    make: Callable[[bytes], BytesProvider],
    error: type[CacheError],
    message: str,
) -> None:
    cm = managers.open()
    blob, desc = layer({"f": b"data" * 1000})
    ref = cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(make(blob))})
    with pytest.raises(error, match=message):
        ref.extract()
    assert ref.is_lazy()
    assert ref.info().blob_only
    assert client.content.list_statuses() == []
    ref.release()
    _assert_clean_after_prune(cm, client)


def test_layer_whose_diff_id_lies_is_not_marked_extracted(
    managers: Managers, client: Client, write: Writer
) -> None:
    cm = managers.open()
    blob, desc = layer({"f": b"true content"})
    liar = Descriptor(desc.media_type, desc.digest, desc.size, {UNCOMPRESSED: sha("other")})
    write(blob, liar)
    ref = cm.get_by_blob(liar)
    write.drop()
    with pytest.raises(InvalidError, match="not to its diff id"):
        ref.extract()
    assert ref.info().blob_only
    assert snapshot_names(client) == []
    ref.release()
    _assert_clean_after_prune(cm, client)


def test_bad_descriptors_are_refused(managers: Managers, write: Writer) -> None:
    cm = managers.open()
    _, desc = layer({"f": b"x"})
    with pytest.raises(InvalidError, match=r"missing containerd\.io/uncompressed"):
        cm.get_by_blob(Descriptor(desc.media_type, desc.digest, desc.size))
    with pytest.raises(InvalidError, match="malformed diff id"):
        cm.get_by_blob(Descriptor(desc.media_type, desc.digest, desc.size, {UNCOMPRESSED: "x"}))
    with pytest.raises(InvalidError, match="malformed digest"):
        cm.get_by_blob(Descriptor(desc.media_type, "md5:abc", 1, dict(desc.annotations)))
    with pytest.raises(InvalidError, match="unhandled layer media type"):
        cm.get_by_blob(Descriptor("application/x-foo", desc.digest, 1, dict(desc.annotations)))
    assert cm.disk_usage() == []


def test_apply_writes_layers_into_a_mutable(managers: Managers, client: Client) -> None:
    from tests.layers import TAR_ZSTD, compress, make_tar

    cm = managers.open()
    work = cm.new()
    tar = make_tar({"etc/a": b"a"})
    work.apply(tar)
    work.apply(compress(make_tar({"etc/b": b"b"}), TAR_GZIP))
    work.apply(io.BytesIO(compress(make_tar({"etc/c": b"c"}), TAR_ZSTD)))
    with work.mount() as root:
        assert sorted(p.name for p in (root / "etc").iterdir()) == ["a", "b", "c"]
    snap = work.commit()
    snap.finalize()
    gc(client)
    assert blob_count(client) == 0  # the applied blobs were held only while applying
    snap.release()
    _assert_clean_after_prune(cm, client)


def test_open_keeps_lazy_records(managers: Managers, client: Client) -> None:
    cm = managers.open()
    blob, desc = layer({"f": b"x"})
    ref = cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(BytesProvider(blob))})
    ref.release()
    cm.close()
    cm = managers.open()
    provider = BytesProvider(blob)
    with cm.get(ref.id, desc_handlers={desc.digest: DescHandler(provider)}) as again:
        assert again.is_lazy()
        with again.mount() as root:
            assert (root / "f").read_bytes() == b"x"
    assert hashlib.sha256(blob).hexdigest() in desc.digest
    _assert_clean_after_prune(cm, client)
