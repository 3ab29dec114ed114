"""The stargz snapshotter mode, run for real: an eStargz image pushed to the test registry
(through a proxy that records every request) is registered on a manager whose snapshotter is
the test-built stargz snapshotter (`-no-background-fetch`), mounted from the registry without
its blobs reaching the content store, and then extracted the ordinary way."""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

from pyctrd_cache import (
    DescHandler,
    Descriptor,
    Manager,
    PrunePolicy,
    RegistryProvider,
    pull,
    pull_layout,
    push,
)
from pyctrd_cache.client import Client
from pyctrd_cache.estargz import parse_footer
from pyctrd_cache.remote_snapshots import REMOTE_SNAPSHOT_LABEL
from tests.fix_containerd import Managers
from tests.stargz_fix import (
    STARGZ,
    CountingProxy,
    Image,
    StargzDaemon,
    detached_on_exit,
    mounts_under,
    read_tree,
    sample_trees,
    write_estargz_layout,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the snapshotter mounts FUSE")

CHUNK = 64 * 1024
SESSION = ["session-one", "session-two"]
_RANGE = re.compile(r"^(\d+)-(\d+)$")


def _ranges(proxy: CountingProxy, digest: str) -> list[tuple[int, int]]:
    """The byte ranges asked of the blob (the snapshotter sometimes asks several in one
    request: `bytes=a-b,c-d`); fails on a request for the whole blob."""
    out = []
    for request in proxy.blob_requests(digest):
        if request.method == "HEAD":
            continue
        assert request.range is not None, f"{digest} was fetched whole: {request}"
        unit, _, spec = request.range.partition("=")
        assert unit == "bytes", request.range
        for part in spec.split(","):
            match = _RANGE.match(part.strip())
            assert match, request.range
            out.append((int(match[1]), int(match[2])))
    return out


def _push(managers: Managers, proxy: CountingProxy, image: Image, name: str) -> str:
    """Pushes the layout's image through the proxy with the project's registry code."""
    cm = managers.open()
    ref = pull_layout(cm, image.layout, image.tag)
    try:
        push(ref, proxy.ref(name), insecure=True)
    finally:
        ref.release()
    return proxy.ref(name)


def _no_leftovers(client: Client) -> None:
    assert client.leases.list() == []
    assert client.snapshots(STARGZ).list() == []
    assert client.content.list() == []


def _temporary_labels(client: Client) -> list[str]:
    """Labels of the stargz snapshots that a call of the manager added for its duration."""
    return [
        key
        for info in client.snapshots(STARGZ).list()
        for key in info.labels
        if key.startswith("containerd.io/snapshot/remote/stargz.session.")
        or re.search(r"\.[0-9a-z]{25}$", key)
    ]


@pytest.fixture
def image(tmp_path: pathlib.Path) -> Image:
    return write_estargz_layout(tmp_path / "layout", sample_trees(), "v1", CHUNK)


def test_stargz_mode_mounts_from_the_registry_lazily(
    managers: Managers,
    stargz_containerd: StargzDaemon,
    registry_proxy: CountingProxy,
    image: Image,
    tmp_path: pathlib.Path,
) -> None:
    reference = _push(managers, registry_proxy, image, "stargz/lazy:v1")
    registry_proxy.requests.clear()
    digests = [layer.digest for layer in image.layers]
    namespace = f"sgz-{os.getpid()}"
    address = stargz_containerd.address
    with (
        detached_on_exit(stargz_containerd.root, tmp_path),
        Client(address, namespace=namespace) as client,
        Manager.open(
            address, namespace=namespace, snapshotter=STARGZ, state_dir=tmp_path / "stargz-state"
        ) as cm,
    ):
        top = pull(cm, reference, insecure=True)
        try:
            parent = top.parent()
            assert parent is not None
            assert top.is_lazy()
            assert parent.is_lazy()
            # Registering checked that the blobs exist (HEAD), and fetched nothing.
            assert {r.method for d in digests for r in registry_proxy.blob_requests(d)} == {"HEAD"}

            # Extraction prepares both layers as remote snapshots: they stay lazy, and the
            # registry served only the tail of each blob (footer and table of contents).
            top.extract(session=SESSION)
            for ref in (parent, top):
                info = client.snapshots(STARGZ).stat(ref.info().snapshot_id)
                assert REMOTE_SNAPSHOT_LABEL in info.labels, info.labels
                assert ref.is_lazy()
            assert _temporary_labels(client) == []
            for layer in image.layers:
                blob = (image.layout / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
                toc_offset = parse_footer(blob[-51:])
                ranges = _ranges(registry_proxy, layer.digest)
                assert ranges, f"nothing of {layer.digest} was fetched"
                # The fetcher first asks for two bytes to learn that ranges are served, then
                # reads in aligned blocks: each block reaches into the TOC or the footer.
                assert all(end >= toc_offset or (start, end) == (0, 1) for start, end in ranges), (
                    ranges,
                    toc_offset,
                )
            before_reading = len(registry_proxy.requests)

            # Reading every file fetches file data, in ranges only.
            with top.mount(session=SESSION) as root:
                assert mounts_under(root)
                assert read_tree(root) == image.files
            assert _temporary_labels(client) == []
            assert len(registry_proxy.requests) > before_reading
            fetched = sum(
                end - start + 1 for d in digests for start, end in _ranges(registry_proxy, d)
            )
            assert fetched >= len(image.files["usr/lib/big.bin"]) // 4

            # The blobs never reached this namespace's content store.
            assert not {i.digest for i in client.content.list()} & set(digests)
            assert top.is_lazy()
            parent.release()
        finally:
            top.release()
        cm.prune(PrunePolicy(all=True))
        _no_leftovers(client)
        # The collection removed the remote snapshots, and the snapshotter their FUSE mounts.
        assert not mounts_under(tmp_path, stargz_containerd.root / "stargz")
        client.namespaces.delete(namespace)


def test_stargz_mode_falls_back_to_pull_and_apply(
    managers: Managers,
    stargz_containerd: StargzDaemon,
    registry_proxy: CountingProxy,
    image: Image,
    tmp_path: pathlib.Path,
) -> None:
    """Handlers without snapshot labels: the snapshotter cannot prepare the layers remotely,
    so the manager pulls the blobs and applies them, as on any snapshotter."""
    reference = _push(managers, registry_proxy, image, "stargz/full:v1")
    manifest = json.loads(
        (image.layout / "blobs" / "sha256" / _manifest_digest(image)[7:]).read_bytes()
    )
    namespace = f"sgz-full-{os.getpid()}"
    address = stargz_containerd.address
    with (
        detached_on_exit(stargz_containerd.root, tmp_path),
        RegistryProvider(reference, insecure=True) as provider,
        Client(address, namespace=namespace) as client,
        Manager.open(
            address, namespace=namespace, snapshotter=STARGZ, state_dir=tmp_path / "stargz-state"
        ) as cm,
    ):
        current = None
        for entry, layer in zip(manifest["layers"], image.layers, strict=True):
            desc = Descriptor(
                entry["mediaType"],
                entry["digest"],
                entry["size"],
                {**entry["annotations"], "containerd.io/uncompressed": layer.diff_id},
            )
            ref = cm.get_by_blob(desc, current, desc_handlers={desc.digest: DescHandler(provider)})
            if current is not None:
                current.release()
            current = ref
        assert current is not None
        try:
            assert current.is_lazy()
            current.extract(session=SESSION)
            assert not current.is_lazy()
            info = client.snapshots(STARGZ).stat(current.info().snapshot_id)
            assert REMOTE_SNAPSHOT_LABEL not in info.labels
            assert {layer.digest for layer in image.layers} <= {
                i.digest for i in client.content.list()
            }
            with current.mount() as root:
                assert read_tree(root) == image.files
        finally:
            current.release()
        cm.prune(PrunePolicy(all=True))
        _no_leftovers(client)
        client.namespaces.delete(namespace)


def _manifest_digest(image: Image) -> str:
    index = json.loads((image.layout / "index.json").read_text())
    digest: str = index["manifests"][0]["digest"]
    return digest
