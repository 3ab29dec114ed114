"""Laziness in two halves, blob and snapshot, and set_blob that validates before it writes
(issue 15)."""

from __future__ import annotations

import os

import pytest

from pyctrd_cache import (
    Compression,
    DescHandler,
    Descriptor,
    InvalidError,
    NeedsRemoteProvidersError,
)
from pyctrd_cache.client import Client
from tests.fix_containerd import Managers
from tests.layers import TAR, TAR_GZIP, BytesProvider, compress, digest_of, layer, make_tar


def _one_layer_twice() -> tuple[dict[str, bytes], dict[str, Descriptor], BytesProvider]:
    """One layer as a plain tar and gzipped: two blobs, one diff id, one chain id."""
    tar = make_tar({"file": os.urandom(100_000)})
    diff_id = digest_of(tar)
    blobs = {mt: compress(tar, mt) for mt in (TAR, TAR_GZIP)}
    descs = {
        mt: Descriptor(mt, digest_of(b), len(b), {"containerd.io/uncompressed": diff_id})
        for mt, b in blobs.items()
    }
    return blobs, descs, BytesProvider(*blobs.values())


def _handlers(descs: dict[str, Descriptor], provider: BytesProvider) -> dict[str, DescHandler]:
    return {d.digest: DescHandler(provider) for d in descs.values()}


def test_a_linked_record_without_its_blob_is_lazy_and_pulls_it_for_a_remote(
    managers: Managers,
) -> None:
    cm = managers.open()
    blobs, descs, provider = _one_layer_twice()
    dhs = _handlers(descs, provider)
    plain = cm.get_by_blob(descs[TAR], desc_handlers=dhs)
    plain.extract()
    linked = cm.get_by_blob(descs[TAR_GZIP], desc_handlers=dhs)
    assert not linked.info().blob_only  # it shares the extracted snapshot
    assert linked.is_lazy()  # but its own blob is not here

    # A handle without the handler can mount, but its remote names the missing blob.
    with cm.get(linked.id) as bare:
        remote = bare.get_remote(compression=Compression.GZIP)
        with pytest.raises(NeedsRemoteProvidersError):
            remote.provider.open(remote.descriptors[0])

    remote = linked.get_remote(compression=Compression.GZIP)
    assert [d.digest for d in remote.descriptors] == [descs[TAR_GZIP].digest]
    with remote.provider.open(remote.descriptors[0]) as stream:
        assert stream.read() == blobs[TAR_GZIP]
    assert not linked.is_lazy()
    linked.release()
    plain.release()


def test_extract_takes_an_existing_snapshot_without_pulling(managers: Managers) -> None:
    cm = managers.open()
    _, descs, provider = _one_layer_twice()
    dhs = _handlers(descs, provider)
    gzipped = cm.get_by_blob(descs[TAR_GZIP], desc_handlers=dhs)
    plain = cm.get_by_blob(descs[TAR], desc_handlers=dhs)
    assert gzipped.info().snapshot_id == plain.info().snapshot_id
    plain.extract()
    assert provider.opened == {descs[TAR].digest: 1}
    gzipped.extract()
    assert provider.opened == {descs[TAR].digest: 1}  # nothing more was downloaded
    assert not gzipped.info().blob_only
    assert gzipped.is_lazy()
    with gzipped.mount() as root:
        assert (root / "file").stat().st_size == 100_000
    gzipped.release()
    plain.release()


def test_set_blob_on_a_parent_without_a_blob_writes_nothing(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    parent = cm.new().commit()
    child = cm.new(parent).commit()
    blob, desc = layer({"child": b"x"})
    lease = client.leases.create("test-writer")
    client.with_lease(lease.id).content.write("w-child", blob, expected=desc.digest, size=desc.size)
    with pytest.raises(InvalidError, match="has no blob"):
        child.set_blob(desc)
    info = child.info()
    assert (info.blob, info.diff_id, info.media_type) == (None, None, None)
    if any(lease.id == child.id for lease in client.leases.list()):
        assert all(r.id != desc.digest for r in client.leases.list_resources(child.id))
    # Once the parent has a blob, the child's goes through.
    parent_blob, parent_desc = layer({"parent": b"y"})
    client.with_lease(lease.id).content.write(
        "w-parent", parent_blob, expected=parent_desc.digest, size=parent_desc.size
    )
    parent.set_blob(parent_desc)
    child.set_blob(desc)
    assert child.info().chain_id is not None
    client.leases.delete(lease.id)
    child.release()
    parent.release()
