"""The project's eStargz layers checked by tools no one here wrote: containerd imports and
unpacks them, Debian's `ctr-remote` reads their table of contents' digest, `umoci` unpacks
them; and layers `ctr-remote` converted to eStargz pass the project's reader."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from pyctrd_cache import estargz
from pyctrd_cache.client import Client
from pyctrd_cache.oci import machine_platform
from tests.fix_containerd import Daemon
from tests.layers import TAR_GZIP, digest_of, make_tar

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"

FILES = {
    "etc/motd": b"hello from estargz\n",
    "usr/lib/big.bin": hashlib.sha256(b"seed").digest() * 20_000,
    "usr/share/empty": b"",
}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking needs root")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def checked(*args: str) -> str:
    result = run(*args)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package stargz-snapshotter / umoci)")
    return path


def write_layout(
    layout: pathlib.Path, layer: bytes, annotations: dict[str, str], diff_id: str, tag: str
) -> None:
    """An OCI image layout holding one image of one gzip layer, tagged `tag`."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes, media_type: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        digest = digest_of(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **(extra or {})}

    config = {
        **machine_platform(),
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": put(json.dumps(config).encode(), OCI_CONFIG),
        "layers": [put(layer, TAR_GZIP, {"annotations": annotations} if annotations else None)],
    }
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            put(
                json.dumps(manifest).encode(),
                OCI_MANIFEST,
                {"annotations": {REF_NAME: tag}, "platform": machine_platform()},
            )
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def layout_tar(layout: pathlib.Path) -> pathlib.Path:
    out = layout.with_suffix(".tar")
    with tarfile.open(out, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(layout)), recursive=False)
    return out


def our_layer() -> tuple[bytes, estargz.EStargzLayer]:
    out = io.BytesIO()
    layer = estargz.write_estargz(io.BytesIO(make_tar(FILES)), out, chunk_size=64 * 1024)
    return out.getvalue(), layer


def tree(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def ctr_import(daemon: Daemon, namespace: str, tar: pathlib.Path, name: str) -> None:
    assert daemon.ctr is not None
    checked(daemon.ctr, "-a", daemon.address, "-n", namespace, "images", "import",
            "--index-name", name, str(tar))  # fmt: skip


def read_json(client: Client, digest: str) -> Any:
    return json.loads(b"".join(client.content.read(digest)))


def ctr_remote_converted(
    daemon: Daemon,
    namespace: str,
    images: Client,
    tmp_path: pathlib.Path,
    files: dict[str, bytes],
    name: str,
    *options: str,
) -> Any:
    """Imports a plain gzip image of `files` as `name-src`, has ctr-remote convert it to
    eStargz (with `options`) as `name-dst`, and returns the converted image's manifest."""
    ctr_remote = tool("ctr-remote")
    tar = make_tar(files)
    layout = tmp_path / "layout"
    write_layout(layout, gzip.compress(tar, mtime=0), {}, digest_of(tar), "gzip")
    ctr_import(daemon, namespace, layout_tar(layout), f"{name}-src")
    checked(ctr_remote, "-a", daemon.address, "-n", namespace, "images", "convert",
            "--estargz", "--oci", *options, f"{name}-src", f"{name}-dst")  # fmt: skip
    target = next(i.target for i in images.images.list() if i.name == f"{name}-dst")
    manifest = read_json(images, target.digest)
    if target.media_type == OCI_INDEX:
        manifest = read_json(images, manifest["manifests"][0]["digest"])
    return manifest


@pytest.fixture
def images(client: Client) -> Iterator[Client]:
    """The test's client; every image the test made is deleted afterwards."""
    try:
        yield client
    finally:
        for image in client.images.list():
            client.images.delete(image.name, sync=True)


def test_containerd_and_ctr_remote_read_our_layer(
    daemon: Daemon, namespace: str, images: Client, tmp_path: pathlib.Path
) -> None:
    ctr_remote = tool("ctr-remote")
    blob, layer = our_layer()
    layout = tmp_path / "layout"
    write_layout(layout, blob, layer.annotations(), layer.diff_id, "esgz")
    # The import unpacks the image for this platform: containerd's applier accepts the layer
    # and checks its diff id against the config's.
    ctr_import(daemon, namespace, layout_tar(layout), "estargz-ours")
    assert any(info.digest == layer.digest for info in images.content.list())

    out = checked(ctr_remote, "-a", daemon.address, "-n", namespace,
                  "images", "get-toc-digest", layer.digest)  # fmt: skip
    assert out.strip() == layer.toc_digest


def test_umoci_unpacks_our_layer(tmp_path: pathlib.Path) -> None:
    umoci = tool("umoci")
    blob, layer = our_layer()
    layout = tmp_path / "layout"
    write_layout(layout, blob, layer.annotations(), layer.diff_id, "esgz")
    bundle = tmp_path / "bundle"
    checked(umoci, "unpack", "--image", f"{layout}:esgz", str(bundle))
    got = tree(bundle / "rootfs")
    assert got.pop(estargz.NO_PREFETCH_LANDMARK) == b"\x0f"
    assert json.loads(got.pop(estargz.TOC_NAME))["version"] == 1
    assert got == FILES


def test_layers_ctr_remote_converted_pass_our_reader(
    daemon: Daemon, namespace: str, images: Client, tmp_path: pathlib.Path
) -> None:
    manifest = ctr_remote_converted(
        daemon, namespace, images, tmp_path, FILES, "estargz", "--estargz-chunk-size", "65536"
    )
    [desc] = manifest["layers"]
    toc_digest = desc["annotations"][estargz.TOC_DIGEST_ANNOTATION]
    blob = b"".join(images.content.read(desc["digest"]))

    assert estargz.is_estargz(io.BytesIO(blob))
    toc = estargz.verify(io.BytesIO(blob), toc_digest=toc_digest)
    big = [e for e in toc.entries if e.name == "usr/lib/big.bin"]
    assert len(big) == -(-len(FILES["usr/lib/big.bin"]) // 65536)
    plain = gzip.decompress(blob)
    assert int(desc["annotations"][estargz.UNCOMPRESSED_SIZE_ANNOTATION]) == len(plain)
    config = read_json(images, manifest["config"]["digest"])
    assert config["rootfs"]["diff_ids"] == [digest_of(plain)]
    with tarfile.open(fileobj=io.BytesIO(plain)) as t:
        files = {m.name: t.extractfile(m).read() for m in t if m.isreg()}  # type: ignore[union-attr]
    assert files.pop(estargz.TOC_NAME)
    assert files.pop(estargz.NO_PREFETCH_LANDMARK) == b"\x0f"
    assert files == FILES

    # Converting ctr-remote's layer again keeps the files and gives a valid layer of ours.
    again = io.BytesIO()
    ours = estargz.write_estargz(io.BytesIO(plain), again)
    estargz.verify(again, toc_digest=ours.toc_digest)
