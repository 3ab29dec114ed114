"""Hostile OCI layouts and tars (issue 16): symlinks planted inside a layout (to a user's
Docker config, a root-only file, `/dev/zero`, a directory elsewhere), FIFOs and oversized
files where JSON should be, blobs of the right name and size but the wrong bytes, tars
whose PAX or GNU long-name headers are huge, and a zstd bomb converted to gzip. Reading
and writing a layout never follows a symlink, memory stays bounded, and files outside the
layout stay as they were."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest
import zstandard

from pyctrd_cache import (
    CacheError,
    Compression,
    DescHandler,
    ImmutableRef,
    InvalidError,
    Manager,
    PrunePolicy,
    export_layout,
    import_path,
)
from pyctrd_cache.client import Client, Descriptor
from pyctrd_cache.oci import pull_layout
from tests.checks import gc
from tests.fix_containerd import Daemon, Managers
from tests.hostile_fix import peak_memory, refused
from tests.layers import TAR_GZIP, TAR_ZSTD, BytesProvider, digest_of, layer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEMORY = 48 << 20


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def _put(root: pathlib.Path, data: bytes, digest: str | None = None) -> str:
    """Writes `data` as the blob of `digest` (default: its own)."""
    digest = digest or digest_of(data)
    path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def make_layout(root: pathlib.Path, blob: bytes, desc: Descriptor) -> dict[str, str]:
    """A one-layer image layout around the layer `blob` (written as the blob of `desc`); the
    digests of its layer, config and manifest."""
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    _put(root, blob, desc.digest)
    config = _json({"rootfs": {"type": "layers", "diff_ids": [desc.annotations[UNCOMPRESSED]]}})
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _put(root, config), "size": len(config)},
            "layers": [{"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}],
        }
    )
    manifest_digest = _put(root, manifest)
    entry = {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest)}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return {"layer": desc.digest, "config": digest_of(config), "manifest": manifest_digest}


UNCOMPRESSED = "containerd.io/uncompressed"


def blob_file(root: pathlib.Path, digest: str) -> pathlib.Path:
    return root / "blobs" / "sha256" / digest.removeprefix("sha256:")


# 7. Layout files that are not files, or too large, are refused (in a child process with a
# memory limit and a timeout, so that a failure cannot take the machine down).

_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from pyctrd_cache import Manager
from pyctrd_cache.oci import pull_layout
address, namespace, state, root = sys.argv[1:]
with Manager.open(address, namespace=namespace, state_dir=state) as cm:
    try:
        pull_layout(cm, root).release()
        print("accepted")
    except BaseException as err:
        print(type(err).__name__, err)
"""


def _plant(root: pathlib.Path, digests: dict[str, str], how: str, tmp: pathlib.Path) -> None:
    outside = tmp / "outside"
    outside.mkdir()
    if how == "index-dev-zero":
        (root / "index.json").unlink()
        (root / "index.json").symlink_to("/dev/zero")
    elif how == "index-fifo":
        (root / "index.json").unlink()
        os.mkfifo(root / "index.json")
    elif how == "oci-layout-dev-zero":
        (root / "oci-layout").unlink()
        (root / "oci-layout").symlink_to("/dev/zero")
    elif how == "index-too-large":
        with open(root / "index.json", "r+b") as f:
            f.truncate(64 << 20)
    elif how == "manifest-symlink":
        path = blob_file(root, digests["manifest"])
        os.replace(path, outside / "manifest")
        path.symlink_to(outside / "manifest")
    elif how == "blobs-symlink":
        os.rename(root / "blobs", outside / "blobs")
        (root / "blobs").symlink_to(outside / "blobs")
    elif how == "config-fifo":
        path = blob_file(root, digests["config"])
        path.unlink()
        os.mkfifo(path)


@pytest.mark.parametrize(
    "how",
    [
        "index-dev-zero",
        "index-fifo",
        "oci-layout-dev-zero",
        "index-too-large",
        "manifest-symlink",
        "blobs-symlink",
        "config-fifo",
    ],
)
def test_layout_files_that_are_not_plain_files_are_refused(
    daemon: Daemon, namespace: str, tmp_path: pathlib.Path, how: str
) -> None:
    root = tmp_path / "layout"
    blob, desc = layer({"f": b"x"})
    digests = make_layout(root, blob, desc)
    # The config is read only without the diff id annotation.
    _plant(root, digests, how, tmp_path)
    try:
        state = str(tmp_path / "s")
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, daemon.address, namespace, state, str(root)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        said = out.stdout.strip() or out.stderr[-300:]
    except subprocess.TimeoutExpired:
        said = "hung for 30 s"
    # An oversized index is refused by its size, not after it was read and parsed.
    expected = "larger than" if how == "index-too-large" else ""
    refused(said.startswith("InvalidError") and expected in said, said)


# 11. Export never follows a symlink planted in the layout.


def _record(cm: Manager, files: dict[str, bytes]) -> tuple[ImmutableRef, bytes, Descriptor]:
    blob, desc = layer(files)
    ref = cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(BytesProvider(blob))})
    return ref, blob, desc


def _empty_layout(root: pathlib.Path) -> None:
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


DOCKER_CONFIG = {"auths": {"registry.test": {"auth": "YWxpY2U6czNjcmV0LXBhc3M="}}}


@pytest.mark.parametrize(
    "how", ["index-to-docker-config", "blobs-sha256-elsewhere", "blobs-elsewhere", "blob-link"]
)
def test_export_never_follows_planted_symlinks(
    managers: Managers, tmp_path: pathlib.Path, how: str
) -> None:
    cm = managers.open()
    root = tmp_path / "layout"
    _empty_layout(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = tmp_path / "docker-config.json"
    config.write_text(json.dumps(DOCKER_CONFIG))
    ref, blob, desc = _record(cm, {"f": b"exported"})
    if how == "index-to-docker-config":
        (root / "index.json").symlink_to(config)
    elif how == "blobs-sha256-elsewhere":
        (root / "blobs" / "sha256").rmdir()
        (root / "blobs" / "sha256").symlink_to(elsewhere)
    elif how == "blobs-elsewhere":
        (elsewhere / "sha256").mkdir()
        (root / "blobs" / "sha256").rmdir()
        (root / "blobs").rmdir()
        (root / "blobs").symlink_to(elsewhere)
    else:
        victim = elsewhere / "victim"
        victim.write_bytes(bytes(len(blob)))
        blob_file(root, desc.digest).symlink_to(victim)
    before = {p.name: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    with ref:
        try:
            export_layout(ref, root, tag="v1")
            error: BaseException | None = None
        except CacheError as err:
            error = err
    after = {p.name: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    # What the layout itself holds as index.json (a planted symlink is not its content).
    index_path = root / "index.json"
    index = index_path.read_text() if index_path.is_file() and not index_path.is_symlink() else ""
    untouched = after == before and json.loads(config.read_text()) == DOCKER_CONFIG
    refused(
        isinstance(error, InvalidError) and untouched and "auths" not in index,
        (error, sorted(after), index[:200]),
    )
    assert "symlink" in str(error)


# 12. A layout blob symlinked to a root-only file is not read.


@pytest.mark.parametrize("digest", ["right", "wrong"])
def test_layout_blob_symlinked_to_a_root_only_file_is_not_read(
    managers: Managers, client: Client, tmp_path: pathlib.Path, digest: str
) -> None:
    cm = managers.open()
    secret_blob, secret_desc = layer({"shadow": b"root:$6$secret-hash:19000:0:99999:7:::\n"})
    secret = tmp_path / "root-only"
    secret.write_bytes(secret_blob)
    secret.chmod(0o600)
    root = tmp_path / "layout"
    if digest == "right":
        desc = secret_desc
    else:
        # Another layer's digest and the secret's size: an error would show the secret's
        # digest.
        _, other_desc = layer({"f": b"decoy".ljust(len(secret_blob), b"!")})
        desc = Descriptor(TAR_GZIP, other_desc.digest, len(secret_blob), other_desc.annotations)
    make_layout(root, secret_blob if digest == "right" else b"", desc)
    path = blob_file(root, desc.digest)
    path.unlink(missing_ok=True)
    path.symlink_to(secret)
    try:
        pull_layout(cm, root, extract=True).release()
        error: BaseException | None = None
    except CacheError as err:
        error = err
    stored = [b.digest for b in client.content.list()]
    cm.prune(PrunePolicy(all=True))
    gc(client)
    # With the wrong digest, the secret's digest in the error would tell about its bytes.
    shown = digest == "wrong" and secret_desc.digest.removeprefix("sha256:") in str(error)
    leaked = secret_desc.digest in stored or shown
    refused(isinstance(error, InvalidError) and not leaked, (error, stored))


# 13. A planted blob of the right name and size but the wrong bytes is replaced.


@pytest.mark.parametrize("which", ["layer", "config", "manifest"])
def test_export_replaces_a_planted_blob_of_the_right_size(
    managers: Managers, tmp_path: pathlib.Path, which: str
) -> None:
    cm = managers.open()
    root = tmp_path / "layout"
    ref, _, _ = _record(cm, {"f": b"honest bytes"})
    with ref:
        manifest = export_layout(ref, root, tag="v1")
        document = json.loads(blob_file(root, manifest.digest).read_bytes())
        digest = {
            "layer": document["layers"][0]["digest"],
            "config": document["config"]["digest"],
            "manifest": manifest.digest,
        }[which]
        path = blob_file(root, digest)
        planted = bytes(b ^ 0x5A for b in path.read_bytes())
        path.write_bytes(planted)
        export_layout(ref, root, tag="v1")
    bad = [
        p.name
        for p in (root / "blobs" / "sha256").iterdir()
        if hashlib.sha256(p.read_bytes()).hexdigest() != p.name
    ]
    refused(bad == [], bad)


# 8. Huge PAX and GNU long-name headers are refused before they are read.

HUGE = 256 << 20


def _huge_header_tar(path: pathlib.Path, kind: bytes) -> None:
    """A gzip tar whose first header is a PAX (`x`) or GNU long-name (`L`) header of
    `HUGE` bytes, written without holding them."""
    header = tarfile.TarInfo("././@Huge")
    header.type = kind
    header.size = HUGE
    block = header.tobuf(format=tarfile.GNU_FORMAT if kind == b"L" else tarfile.USTAR_FORMAT)
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(block[:512])
        # PAX records of exactly 1 MiB each ("<length> path=<value>\n"), or name bytes.
        pax = b"1048576 path=" + b"a" * (1048576 - 14) + b"\n"
        line = pax if kind == b"x" else b"a" * (1 << 20)
        for _ in range(HUGE >> 20):
            out.write(line)
        out.write(bytes(1024))


@pytest.mark.parametrize("kind", [b"x", b"L"], ids=["pax", "gnu-long-name"])
def test_huge_tar_headers_are_refused_within_bounded_memory(
    managers: Managers, tmp_path: pathlib.Path, kind: bytes
) -> None:
    cm = managers.open()
    path = tmp_path / "huge.tar.gz"
    _huge_header_tar(path, kind)
    with peak_memory() as peak, pytest.raises(InvalidError) as info:
        import_path(cm, path)
    refused(peak[0] < MEMORY, (peak[0], info.value))
    assert "header" in str(info.value)


# 9. A zstd bomb converted to gzip is decompressed in bounded steps.

BOMB = 512 << 20


def test_zstd_bomb_conversion_stays_within_bounded_memory(
    managers: Managers, tmp_path: pathlib.Path
) -> None:
    cm = managers.open()
    compressor = zstandard.ZstdCompressor(level=19).compressobj()
    diff = hashlib.sha256()
    parts = []
    zeros = bytes(1 << 20)
    for _ in range(BOMB >> 20):
        diff.update(zeros)
        parts.append(compressor.compress(zeros))
    blob = b"".join([*parts, compressor.flush()])
    diff_id = "sha256:" + diff.hexdigest()
    desc = Descriptor(TAR_ZSTD, digest_of(blob), len(blob), {UNCOMPRESSED: diff_id})
    with (
        cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(BytesProvider(blob))}) as ref,
        peak_memory() as peak,
    ):
        ref.get_remote(compression=Compression.GZIP, force_compression=True).unlazy()
    refused(peak[0] < 2 * MEMORY, peak[0])
