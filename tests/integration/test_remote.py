"""BuildKit's TestGetRemote, conversions between every compression, and the life of
compression variants, against real containerd daemons."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections import Counter

import pytest

from pyctrd_cache import (
    Compression,
    DescHandler,
    Descriptor,
    ImmutableRef,
    InvalidError,
    NoBlobsError,
    PrunePolicy,
)
from pyctrd_cache.client import Client, Mount, SnapshotsService
from tests.checks import blob_count, gc, owned_leases, snapshot_names
from tests.fix_containerd import Managers
from tests.layers import (
    TAR,
    TAR_GZIP,
    TAR_ZSTD,
    BytesProvider,
    decompress,
    digest_of,
    layer,
)

UNCOMPRESSED = "containerd.io/uncompressed"
MEDIA_TYPES = {
    Compression.UNCOMPRESSED: TAR,
    Compression.GZIP: TAR_GZIP,
    Compression.ZSTD: TAR_ZSTD,
}


def read_blob(client: Client, digest: str) -> bytes:
    return b"".join(client.content.read(digest))


def kind_of(blob: bytes) -> Compression:
    if blob[:2] == b"\x1f\x8b":
        return Compression.GZIP
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return Compression.ZSTD
    return Compression.UNCOMPRESSED


def tar_names(tar: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return sorted(m.name for m in t.getmembers())


def test_get_remote(managers: Managers, client: Client) -> None:
    """Three levels of two children each on a lazy root; `get_remote` on every ref, for
    every compression, forced, all at once. Then the content store holds exactly one blob per
    layer and compression, and every uncompressed label tells the truth."""
    cm = managers.open()
    provider = BytesProvider()
    dhs = {}
    roots = []
    for i in range(2):
        blob, desc = layer({"foo": str(i).encode()})
        provider.add(blob)
        dhs[desc.digest] = DescHandler(provider)
        roots.append(desc)
    lazy = cm.get_by_blob(roots[0], desc_handlers=dhs)
    refs: list[ImmutableRef] = [lazy]
    every = [lazy]
    for level in range(3):
        children = []
        for j, parent in enumerate(refs):
            for k in range(2):
                work = cm.new(parent, desc_handlers=dhs)
                name = f"{level}-{j}-{k}"
                with work.mount(readonly=False) as root:
                    (root / name).write_text(name)
                    os.utime(root / name, (0, 0))
                children.append(work.commit())
        refs = children
        every += children
    lazy2 = cm.get_by_blob(roots[1], desc_handlers=dhs)
    refs.append(lazy2)
    every.append(lazy2)
    assert blob_count(client) == 1  # the lazy root, pulled by the first extraction

    errors: list[BaseException] = []
    remotes = []
    lock = threading.Lock()

    def remote(ref: ImmutableRef, compression: Compression) -> None:
        try:
            r = ref.get_remote(compression=compression, force_compression=True)
            with lock:
                remotes.append((ref, compression, r))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=remote, args=(ref, c)) for ref in refs for c in MEDIA_TYPES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    layers: dict[str, set[Compression]] = {}
    for ref, compression, r in remotes:
        chain = []
        walk: ImmutableRef | None = ref.clone()
        while walk is not None:
            chain.append(walk.info())
            up = walk.parent()
            walk.release()
            walk = up
        chain.reverse()
        assert len(r.descriptors) == len(chain)
        for info, desc in zip(chain, r.descriptors, strict=True):
            assert desc.media_type == MEDIA_TYPES[compression]
            assert desc.annotations[UNCOMPRESSED] == info.diff_id
            blob = read_blob(client, desc.digest)
            assert kind_of(blob) is compression
            assert digest_of(decompress(blob)) == info.diff_id
            assert info.diff_id is not None
            layers.setdefault(info.diff_id, set()).add(compression)

    assert len(layers) == 16  # the lazy root, 14 layers written here, the second lazy root
    assert all(c == set(MEDIA_TYPES) for c in layers.values())
    seen: Counter[tuple[str, Compression]] = Counter()
    for stored in client.content.list():
        blob = read_blob(client, stored.digest)
        tar = decompress(blob)
        diff_id = digest_of(tar)
        assert diff_id in layers, f"unexpected blob {stored.digest}"
        seen[(diff_id, kind_of(blob))] += 1
        if UNCOMPRESSED in stored.labels:
            assert stored.labels[UNCOMPRESSED] == diff_id
        if kind_of(blob) is Compression.UNCOMPRESSED:
            names = tar_names(tar)
            assert names in (["foo"], *([n] for n in _written_names()))
    assert set(seen) == {(d, c) for d in layers for c in MEDIA_TYPES}
    assert set(seen.values()) == {1}, "one blob per layer and compression"

    for ref in every:
        ref.release()
    cm.prune(PrunePolicy(all=True))
    assert blob_count(client) == 0
    assert snapshot_names(client) == []
    assert owned_leases(client, cm) == []


def _written_names() -> list[str]:
    names = []
    count = 1
    for level in range(3):
        for j in range(count):
            for k in range(2):
                names.append(f"{level}-{j}-{k}")
        count *= 2
    return names


@pytest.mark.parametrize("source", list(MEDIA_TYPES), ids=lambda c: c.value)
def test_conversion_round_trips(managers: Managers, client: Client, source: Compression) -> None:
    """From `source` into every other compression and back: the same uncompressed digest."""
    cm = managers.open()
    files = {f"dir/file{i}": os.urandom(50_000) for i in range(20)}
    blob, desc = layer(files, MEDIA_TYPES[source])
    provider = BytesProvider(blob)
    ref = cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(provider)})
    diff_id = desc.annotations[UNCOMPRESSED]
    for target in MEDIA_TYPES:
        remote = ref.get_remote(compression=target, force_compression=True)
        there = remote.descriptors[0]
        assert there.media_type == MEDIA_TYPES[target]
        with remote.provider.open(there) as f:  # a lazy blob of the right kind stays lazy
            converted = f.read()
        assert digest_of(decompress(converted)) == diff_id
        # A record made from the converted blob converts back to the source compression.
        provider.add(converted)
        other = cm.get_by_blob(there, desc_handlers={there.digest: DescHandler(provider)})
        back = other.get_remote(compression=source, force_compression=True).descriptors[0]
        assert back.media_type == MEDIA_TYPES[source]
        assert digest_of(decompress(read_blob(client, back.digest))) == diff_id
        other.release()
    ref.release()
    cm.prune(PrunePolicy(all=True))
    assert blob_count(client) == 0


def test_zstd_remote_on_every_daemon(managers: Managers, client: Client) -> None:
    """containerd before 1.7.29 and 2.0.1 cannot diff to zstd: there the diff service writes
    the layer uncompressed and the cache compresses it, so the record's own blob is zstd on
    every daemon, labelled with its checked diff id, and no other blob (neither a gzip one
    nor the uncompressed intermediate) survives a collection."""
    cm = managers.open()
    work = cm.new()
    with work.mount(readonly=False) as root:
        (root / "z").write_bytes(os.urandom(10_000))
    snap = work.commit()
    remote = snap.get_remote(compression=Compression.ZSTD)
    (desc,) = remote.descriptors
    assert desc.media_type == TAR_ZSTD
    blob = read_blob(client, desc.digest)
    assert kind_of(blob) is Compression.ZSTD
    info = snap.info()
    assert (info.blob, info.media_type) == (desc.digest, TAR_ZSTD)
    assert digest_of(decompress(blob)) == info.diff_id
    assert client.content.info(desc.digest).labels[UNCOMPRESSED] == info.diff_id
    with remote.provider.open(desc) as f:
        assert f.read() == blob
    gc(client)
    assert [i.digest for i in client.content.list()] == [desc.digest]
    snap.release()


def test_remote_without_blobs_and_create_false(managers: Managers) -> None:
    cm = managers.open()
    snap = cm.new().commit()
    with pytest.raises(NoBlobsError):
        snap.get_remote(create_if_needed=False)
    remote = snap.get_remote(compression=Compression.UNCOMPRESSED)
    assert remote.descriptors[0].digest == snap.info().diff_id
    assert "buildkit/createdat" in remote.descriptors[0].annotations
    snap.release()


def test_lazy_remote_is_served_by_its_provider(managers: Managers, client: Client) -> None:
    cm = managers.open()
    blob, desc = layer({"lazy": b"1"})
    provider = BytesProvider(blob)
    ref = cm.get_by_blob(
        desc,
        desc_handlers={desc.digest: DescHandler(provider)},
        image_ref="registry.test:5000/team/app:v1",
    )
    remote = ref.get_remote(compression=Compression.GZIP)
    (d,) = remote.descriptors
    assert d.digest == desc.digest
    assert d.annotations["containerd.io/distribution.source.registry.test"] == "team/app"
    assert ref.is_lazy()  # nothing pulled to describe it
    assert blob_count(client) == 0
    with remote.provider.open(d) as f:
        assert f.read() == blob
    assert not ref.is_lazy()
    assert provider.opened == {desc.digest: 1}
    ref.release()


def test_unlazy_pulls_a_lazy_chain_with_one_open_each(managers: Managers, client: Client) -> None:
    cm = managers.open()
    provider = BytesProvider()
    handlers: dict[str, DescHandler] = {}
    ref: ImmutableRef | None = None
    for files in ({"base": b"1"}, {"top": b"2"}):
        blob, desc = layer(files)
        provider.add(blob)
        handlers[desc.digest] = DescHandler(provider)
        parent = ref
        ref = cm.get_by_blob(desc, parent, desc_handlers=handlers)
        if parent is not None:
            parent.release()
    assert ref is not None
    remote = ref.get_remote(compression=Compression.GZIP)
    digests = [d.digest for d in remote.descriptors]
    assert ref.is_lazy()
    assert blob_count(client) == 0
    remote.unlazy()
    assert not ref.is_lazy()
    assert provider.opened == dict.fromkeys(digests, 1)
    assert sorted(i.digest for i in client.content.list()) == sorted(digests)
    # Local now: a second unlazy opens nothing.
    remote.unlazy()
    assert provider.opened == dict.fromkeys(digests, 1)
    ref.release()


def test_get_remote_views_each_snapshot_once(
    managers: Managers, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record's view is the upper side of its own diff and the lower side of its child's:
    a chain of n records needs n views, not 2n - 1, and none is left."""
    cm = managers.open()
    refs: list[ImmutableRef] = []
    for i in range(4):
        work = cm.new(refs[-1] if refs else None)
        with work.mount(readonly=False) as root:
            (root / f"f{i}").write_bytes(os.urandom(64 << 10))
        refs.append(work.commit())
    viewed: list[str] = []
    view = SnapshotsService.view

    def counted(self: SnapshotsService, key: str, parent: str) -> list[Mount]:
        viewed.append(parent)
        return view(self, key, parent)

    monkeypatch.setattr(SnapshotsService, "view", counted)
    remote = refs[-1].get_remote(compression=Compression.UNCOMPRESSED)
    assert len(remote.descriptors) == 4
    assert Counter(viewed) == Counter(r.info().snapshot_id for r in refs)
    assert not [n for n in snapshot_names(client) if "view" in n]
    for ref in refs:
        ref.release()


def test_a_pull_of_a_blob_already_stored_does_not_open_the_provider(
    managers: Managers, client: Client
) -> None:
    """Opening the ingest with the blob's digest says the blob is there: the provider is
    not read, and the blob is labelled as the record's and held by its lease."""
    cm = managers.open()
    blob, desc = layer({"already": os.urandom(1 << 16)})
    lease = client.leases.create(flat=True)
    assert client.with_lease(lease.id).content.write(
        "elsewhere", blob, expected=desc.digest, size=desc.size
    )
    provider = BytesProvider(blob)
    ref = cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(provider)})
    ref.extract()
    assert provider.opened == {}
    assert not ref.is_lazy()
    client.leases.delete(lease.id, sync=True)
    gc(client)
    assert (
        client.content.info(desc.digest).labels["buildkit.io/compression/mediatype"]
        == desc.media_type
    )
    ref.release()


def test_variants_survive_restart_and_gc_and_go_with_the_record(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    work = cm.new()
    with work.mount(readonly=False) as root:
        (root / "v").write_bytes(os.urandom(100_000))
    snap = work.commit()
    gzip_desc = snap.get_remote(compression=Compression.GZIP).descriptors[0]
    zstd_desc = snap.get_remote(compression=Compression.ZSTD, force_compression=True).descriptors[0]
    record_id = snap.id
    snap.release()
    cm.close()

    gc(client)
    assert {i.digest for i in client.content.list()} == {gzip_desc.digest, zstd_desc.digest}
    labels = client.content.info(gzip_desc.digest).labels
    assert labels["buildkit.io/compression/digest.zstd"] == zstd_desc.digest
    assert labels["buildkit.io/compression/digest.gzip"] == gzip_desc.digest
    variant_labels = client.content.info(zstd_desc.digest).labels
    assert variant_labels["buildkit.io/compression/mediatype"] == TAR_ZSTD

    cm = managers.open()
    with cm.get(record_id) as again:
        found = again.get_remote(
            create_if_needed=False, compression=Compression.ZSTD, force_compression=True
        ).descriptors[0]
    assert found.digest == zstd_desc.digest
    assert blob_count(client) == 2  # found through the labels, not made again
    cm.prune(PrunePolicy(all=True))
    assert blob_count(client) == 0


def test_conversion_refuses_a_blob_whose_diff_id_lies(managers: Managers, client: Client) -> None:
    cm = managers.open()
    blob, desc = layer({"f": b"real"})
    liar = Descriptor(desc.media_type, desc.digest, desc.size, {UNCOMPRESSED: digest_of(b"x")})
    ref = cm.get_by_blob(liar, desc_handlers={desc.digest: DescHandler(BytesProvider(blob))})
    with pytest.raises(InvalidError, match="not to its diff id"):
        ref.get_remote(compression=Compression.ZSTD, force_compression=True)
    ref.release()
    cm.prune(PrunePolicy(all=True))
    gc(client)
    assert blob_count(client) == 0
    assert client.content.list_statuses() == []


def test_a_variant_made_before_is_served_without_force(managers: Managers, client: Client) -> None:
    cm = managers.open()
    work = cm.new()
    with work.mount(readonly=False) as root:
        (root / "v").write_bytes(os.urandom(50_000))
    snap = work.commit()
    (own,) = snap.get_remote(compression=Compression.GZIP).descriptors
    # No variant yet: without force, the record's own blob.
    assert snap.get_remote(compression=Compression.ZSTD).descriptors == [own]
    (zstd,) = snap.get_remote(compression=Compression.ZSTD, force_compression=True).descriptors
    assert zstd.media_type == TAR_ZSTD
    blobs = blob_count(client)
    for _ in range(2):
        (served,) = snap.get_remote(compression=Compression.ZSTD).descriptors
        assert served.digest == zstd.digest
    assert snap.get_remote(compression=Compression.GZIP).descriptors == [own]
    assert blob_count(client) == blobs
    snap.release()


def test_estargz_without_force_is_the_same_layer_every_time(managers: Managers) -> None:
    cm = managers.open()
    work = cm.new()
    with work.mount(readonly=False) as root:
        (root / "e").write_bytes(os.urandom(50_000))
    snap = work.commit()
    first, second = (snap.get_remote(compression=Compression.ESTARGZ) for _ in range(2))
    assert first.descriptors == second.descriptors
    assert "containerd.io/snapshot/stargz/toc.digest" in first.descriptors[0].annotations
    snap.release()
