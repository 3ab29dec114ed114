"""eStargz remotes against real containerd daemons: records converted to eStargz from every
compression, checked by gzip, by the project's reader, by containerd's applier, by umoci and
by Debian's `ctr-remote`; eStargz blobs serving as gzip, their annotations across a restart,
and eStargz layers `ctr-remote` made imported with `get_by_blob`."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pathlib
import subprocess
import tarfile
import uuid
from collections.abc import Iterator

import pytest

from pyctrd_cache import (
    CacheError,
    Compression,
    DescHandler,
    Descriptor,
    ImmutableRef,
    Manager,
    PrunePolicy,
)
from pyctrd_cache import estargz as esgz
from pyctrd_cache.client import Client
from pyctrd_cache.oci import export_layout
from tests.checks import blob_count, gc
from tests.fix_containerd import Daemon, Managers, clean_namespace
from tests.integration.test_estargz_tools import (
    checked,
    ctr_import,
    ctr_remote_converted,
    images,
    layout_tar,
    read_json,
    tool,
    tree,
)
from tests.layers import TAR, TAR_GZIP, TAR_ZSTD, BytesProvider, compress, digest_of, make_tar

__all__ = ["images"]  # the fixture, shared with test_estargz_tools

UNCOMPRESSED = "containerd.io/uncompressed"
ANNOTATION_LABEL = "buildkit.io/compression/annotation."
KEPT = {esgz.TOC_DIGEST_ANNOTATION, esgz.UNCOMPRESSED_SIZE_ANNOTATION, UNCOMPRESSED}

FILES = {
    "etc/motd": b"hello from estargz\n",
    # Three chunks of the default 4 MiB, part random so that compression has work to do.
    "usr/lib/big.bin": os.urandom(1 << 20) + hashlib.sha256(b"big").digest() * 300_000,
    "usr/share/empty": b"",
    "usr/share/doc/readme": b"read me\n" * 1000,
}
ESTARGZ_OWN = {esgz.TOC_NAME, esgz.NO_PREFETCH_LANDMARK}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and unpacking need root")


@pytest.fixture(autouse=True)
def _empty_at_end(managers: Managers, client: Client) -> Iterator[None]:
    yield
    for cm in managers.opened:
        with contextlib.suppress(CacheError):
            cm.prune(PrunePolicy(all=True))
    gc(client)


@pytest.fixture
def elsewhere(daemon: Daemon, tmp_path: pathlib.Path) -> Iterator[Managers]:
    """Managers on a namespace of their own, emptied and deleted afterwards."""
    name = f"t{os.getpid()}-esgz-{uuid.uuid4().hex[:8]}"
    opened = Managers(daemon, name, tmp_path / "elsewhere")
    with Client(daemon.address, namespace=name) as client:
        try:
            yield opened
            for cm in opened.opened:
                with contextlib.suppress(CacheError):  # closed by the test
                    cm.prune(PrunePolicy(all=True))
            opened.close_all()
            gc(client)
            assert blob_count(client) == 0
        finally:
            opened.close_all()
            clean_namespace(client)


def committed(cm: Manager) -> ImmutableRef:
    """A committed record of FILES, written through containerd's applier (no blob yet)."""
    work = cm.new()
    work.apply(make_tar(FILES))
    return work.commit()


def read_blob(client: Client, digest: str) -> bytes:
    return b"".join(client.content.read(digest))


def tar_files(tar: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isreg()}  # type: ignore[union-attr]


def check_estargz(blob: bytes, desc: Descriptor, source_diff_id: str | None) -> None:
    """The blob is valid gzip and valid eStargz, the descriptor's annotations tell the truth,
    and it holds FILES plus eStargz's own entries."""
    assert source_diff_id is not None
    assert desc.media_type == TAR_GZIP
    assert desc.digest == digest_of(blob)
    assert desc.size == len(blob)
    tested = subprocess.run(["gzip", "-t"], input=blob, capture_output=True, check=False)
    assert tested.returncode == 0, tested.stderr
    toc = esgz.verify(io.BytesIO(blob), toc_digest=desc.annotations[esgz.TOC_DIGEST_ANNOTATION])
    assert len([e for e in toc.entries if e.name == "usr/lib/big.bin"]) == 3
    plain = gzip.decompress(blob)
    assert int(desc.annotations[esgz.UNCOMPRESSED_SIZE_ANNOTATION]) == len(plain)
    assert desc.annotations[UNCOMPRESSED] == digest_of(plain) != source_diff_id
    files = tar_files(plain)
    assert files.pop(esgz.NO_PREFETCH_LANDMARK) == b"\x0f"
    assert json.loads(files.pop(esgz.TOC_NAME))["version"] == 1
    assert files == FILES


def test_forced_estargz_remote(managers: Managers, client: Client) -> None:
    cm = managers.open()
    with committed(cm) as snap:
        remote = snap.get_remote(compression=Compression.ESTARGZ, force_compression=True)
        (desc,) = remote.descriptors
        blob = read_blob(client, desc.digest)
        check_estargz(blob, desc, snap.info().diff_id)
        with remote.provider.open(desc) as f:
            assert f.read() == blob
        # The content store knows the variant by its labels, with exactly BuildKit's
        # annotations, and its own diff id.
        labels = client.content.info(desc.digest).labels
        assert labels[UNCOMPRESSED] == desc.annotations[UNCOMPRESSED]
        saved = {k.removeprefix(ANNOTATION_LABEL) for k in labels if k.startswith(ANNOTATION_LABEL)}
        assert saved == KEPT
        assert {k: desc.annotations[k] for k in KEPT} == {
            k: labels[ANNOTATION_LABEL + k] for k in KEPT
        }

        # The record's own blob stays plain gzip; asked again, the variant is found.
        (plain,) = snap.get_remote(compression=Compression.GZIP).descriptors
        assert plain.digest != desc.digest
        assert esgz.TOC_DIGEST_ANNOTATION not in plain.annotations
        # Only what leases hold counts: containerd may collect the rest at any moment.
        gc(client)
        blobs = blob_count(client)
        again = snap.get_remote(compression=Compression.ESTARGZ, force_compression=True)
        assert again.descriptors == [desc]
        assert blob_count(client) == blobs


def test_estargz_without_force_on_a_record_without_blob(managers: Managers, client: Client) -> None:
    """The diff service cannot write eStargz: the blob is made in gzip and converted."""
    cm = managers.open()
    with committed(cm) as snap:
        (desc,) = snap.get_remote(compression=Compression.ESTARGZ).descriptors
        check_estargz(read_blob(client, desc.digest), desc, snap.info().diff_id)
        gc(client)
        assert blob_count(client) == 2  # the gzip blob and its eStargz variant


def test_estargz_annotations_survive_a_restart(managers: Managers, client: Client) -> None:
    cm = managers.open()
    with committed(cm) as snap:
        record_id = snap.id
        (desc,) = snap.get_remote(
            compression=Compression.ESTARGZ, force_compression=True
        ).descriptors
    cm.close()
    cm = managers.open()
    gc(client)
    blobs = blob_count(client)
    with cm.get(record_id) as snap:
        (again,) = snap.get_remote(
            compression=Compression.ESTARGZ, force_compression=True
        ).descriptors
    assert again.digest == desc.digest
    assert {k: again.annotations[k] for k in KEPT} == {k: desc.annotations[k] for k in KEPT}
    assert blob_count(client) == blobs


@pytest.mark.parametrize("media_type", [TAR, TAR_ZSTD])
def test_conversion_to_estargz_from(managers: Managers, client: Client, media_type: str) -> None:
    cm = managers.open()
    tar = make_tar(FILES)
    blob = compress(tar, media_type)
    desc = Descriptor(media_type, digest_of(blob), len(blob), {UNCOMPRESSED: digest_of(tar)})
    handlers = {desc.digest: DescHandler(BytesProvider(blob))}
    with cm.get_by_blob(desc, desc_handlers=handlers) as ref:
        (converted,) = ref.get_remote(
            compression=Compression.ESTARGZ, force_compression=True
        ).descriptors
        check_estargz(read_blob(client, converted.digest), converted, digest_of(tar))
        # Asked for gzip, the record serves its own gzip variant, made apart.
        (gz,) = ref.get_remote(compression=Compression.GZIP, force_compression=True).descriptors
        assert gz.digest != converted.digest
        assert gzip.decompress(read_blob(client, gz.digest)) == tar


def test_estargz_blob_serves_as_gzip_and_applies_elsewhere(
    managers: Managers, client: Client, elsewhere: Managers
) -> None:
    """An eStargz layer registered on another namespace: containerd's applier unpacks it to
    its diff id (FILES plus eStargz's entries), and asked for gzip or eStargz, the record
    serves the blob itself, before and after a restart."""
    cm = managers.open()
    with committed(cm) as snap:
        (desc,) = snap.get_remote(
            compression=Compression.ESTARGZ, force_compression=True
        ).descriptors
    blob = read_blob(client, desc.digest)
    bare = Descriptor(desc.media_type, desc.digest, desc.size, {
        k: desc.annotations[k] for k in KEPT
    })  # fmt: skip
    other = elsewhere.open()
    handlers = {desc.digest: DescHandler(BytesProvider(blob))}
    with other.get_by_blob(bare, desc_handlers=handlers) as ref:
        ref.extract()
        with ref.mount() as root:
            got = tree(root)
        assert set(got) == set(FILES) | ESTARGZ_OWN
        assert {k: got[k] for k in FILES} == FILES
        for compression, force in [
            (Compression.GZIP, False),
            (Compression.GZIP, True),
            (Compression.ESTARGZ, True),
        ]:
            (served,) = ref.get_remote(compression=compression, force_compression=force).descriptors
            assert served.digest == desc.digest, compression
            assert {k: served.annotations[k] for k in KEPT} == bare.annotations
        record_id = ref.id
    other.close()
    other = elsewhere.open()
    with other.get(record_id) as ref:
        (served,) = ref.get_remote(
            compression=Compression.ESTARGZ, force_compression=True
        ).descriptors
        assert served.digest == desc.digest
        assert {k: served.annotations[k] for k in KEPT} == bare.annotations
    with Client(elsewhere.daemon.address, namespace=elsewhere.namespace) as c:
        assert blob_count(c) == 1


def test_exported_estargz_layout(
    managers: Managers,
    daemon: Daemon,
    namespace: str,
    images: Client,
    tmp_path: pathlib.Path,
) -> None:
    """The config lists the eStargz layer's own diff id; umoci unpacks the layout, ctr
    imports (and unpacks) it, and ctr-remote reads the annotated TOC digest."""
    umoci, ctr_remote = tool("umoci"), tool("ctr-remote")
    cm = managers.open()
    layout = tmp_path / "layout"
    with committed(cm) as snap:
        manifest_desc = export_layout(
            snap, layout, compression=Compression.ESTARGZ, force_compression=True, tag="esgz"
        )
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / manifest_desc.digest.removeprefix("sha256:")).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_bytes())
    [layer] = manifest["layers"]
    blob = (blobs / layer["digest"].removeprefix("sha256:")).read_bytes()
    assert layer["mediaType"] == TAR_GZIP
    assert config["rootfs"]["diff_ids"] == [digest_of(gzip.decompress(blob))]
    toc_digest = layer["annotations"][esgz.TOC_DIGEST_ANNOTATION]
    esgz.verify(io.BytesIO(blob), toc_digest=toc_digest)

    bundle = tmp_path / "bundle"
    checked(umoci, "unpack", "--image", f"{layout}:esgz", str(bundle))
    got = tree(bundle / "rootfs")
    assert set(got) == set(FILES) | ESTARGZ_OWN
    assert {k: got[k] for k in FILES} == FILES

    ctr_import(daemon, namespace, layout_tar(layout), "estargz-export")
    out = checked(ctr_remote, "-a", daemon.address, "-n", namespace,
                  "images", "get-toc-digest", layer["digest"])  # fmt: skip
    assert out.strip() == toc_digest


def test_get_by_blob_of_a_layer_ctr_remote_made(
    managers: Managers,
    daemon: Daemon,
    namespace: str,
    images: Client,
    tmp_path: pathlib.Path,
) -> None:
    """ctr-remote converts an image in the namespace; its local eStargz blob registered with
    `get_by_blob` keeps its annotations (labelled at once) and applies to its diff id."""
    manifest = ctr_remote_converted(daemon, namespace, images, tmp_path, FILES, "esgz")
    [layer] = manifest["layers"]
    [diff_id] = read_json(images, manifest["config"]["digest"])["rootfs"]["diff_ids"]
    annotations = {
        esgz.TOC_DIGEST_ANNOTATION: layer["annotations"][esgz.TOC_DIGEST_ANNOTATION],
        esgz.UNCOMPRESSED_SIZE_ANNOTATION: layer["annotations"][esgz.UNCOMPRESSED_SIZE_ANNOTATION],
        UNCOMPRESSED: diff_id,
    }
    desc = Descriptor(layer["mediaType"], layer["digest"], layer["size"], annotations)

    cm = managers.open()
    with cm.get_by_blob(desc) as ref:
        record_id = ref.id
        ref.extract()
        with ref.mount() as root:
            got = tree(root)
        assert {k: got[k] for k in FILES} == FILES
    cm.close()
    cm = managers.open()
    with cm.get(record_id) as ref:
        for compression in (Compression.ESTARGZ, Compression.GZIP):
            (served,) = ref.get_remote(compression=compression, force_compression=True).descriptors
            assert served.digest == desc.digest
            assert {k: served.annotations[k] for k in KEPT} == annotations
