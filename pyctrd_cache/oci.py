"""OCI image layouts and local trees in and out of the cache: `export_layout` writes a
record's chain as an OCI image layout, `pull_layout` registers a layout's layers as (lazy)
records, and `import_path` turns a directory or a layer tar into a committed record.

A layout written here is what skopeo and umoci expect: `oci-layout`, content-addressed
blobs under `blobs/<algorithm>/<hex>`, an OCI image manifest and config, and `index.json`
naming the manifest with `org.opencontainers.image.ref.name`. Blobs and `index.json` are
written to a temporary file in the same directory and renamed into place, so a reader (or a
crash) never sees half a file; `index.json` is changed under an exclusive `flock` on the
layout directory, so concurrent exports into one layout keep each other's tags.

Layouts are not trusted, read or written: their entries are reached without following
symlinks (a symlink, FIFO or device inside a layout is an `InvalidError`), JSON files are
read up to `MAX_JSON` bytes, and a blob already in a layout is kept only when its bytes
match its digest, else it is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pathlib
import platform
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, Final, Literal

import zstandard

from . import _validate
from ._layout_files import LayoutFiles, blob_parts
from ._streams import CountingReader
from ._tasks import TaskGroup, unwrapped
from .blobs import CREATED_AT_ANNOTATION, DISTRIBUTION_SOURCE_PREFIX, UNCOMPRESSED_LABEL
from .client import Descriptor
from .compression import Compression, from_media_type, parse_digest
from .errors import CacheError, InvalidError, NotFoundError
from .manager import Manager
from .refs import ImmutableRef, MutableRef
from .remote import (
    DescHandler,
    OCILayoutProvider,
    ProgressCallback,
    ProgressEvent,
    Provider,
    Remote,
)
from .remote_snapshots import remote_snapshot_labels
from .types import CachePolicy, PrunePolicy

__all__ = ["export_layout", "import_path", "machine_platform", "pull_layout"]

OCI_LAYOUT_VERSION: Final = "1.0.0"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
REF_NAME: Final = "org.opencontainers.image.ref.name"
HISTORY_COMMENT: Final = "pyctrd-cache.exporter.oci.v0"

INDEXES: Final = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFESTS: Final = (OCI_MANIFEST, DOCKER_MANIFEST)
_CHUNK: Final = 1 << 20
MAX_JSON: Final = 16 << 20
"""The largest index, manifest or config blob read into memory."""
_MAX_NESTING: Final = 8
_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_BZIP2_MAGIC: Final = b"BZh"
_XZ_MAGIC: Final = b"\xfd7zXZ\x00"
# The image-layout spec's grammar for ref.name: components of alphanumerics joined by
# separators, the components joined by "/".
_COMPONENT: Final = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME_RE: Final = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_GO_ARCH: Final = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "armv6l": "arm",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


# The platform of this machine, as OCI spells it.


def machine_platform() -> dict[str, str]:
    """`os`, `architecture` (and `variant` for arm) of this machine, as in an OCI config."""
    machine = platform.machine().lower()
    out = {"os": "linux", "architecture": _GO_ARCH.get(machine, machine)}
    if machine.startswith("armv") and machine[4:5].isdigit():
        out["variant"] = "v" + machine[4]
    return out


def _platform_matches(wanted: Mapping[str, str], candidate: Any) -> bool:
    if not isinstance(candidate, Mapping):
        return False
    if candidate.get("os") != wanted["os"]:
        return False
    if candidate.get("architecture") != wanted["architecture"]:
        return False
    variant = candidate.get("variant") or ""
    if wanted["architecture"] == "arm64":
        return variant in ("", "v8")
    return not variant or variant == wanted.get("variant", "")


def _notify(progress: ProgressCallback | None, event: ProgressEvent) -> None:
    if progress is not None:
        progress(event)


# Writing layouts.


def export_layout(
    ref: ImmutableRef,
    layout: str | os.PathLike[str],
    *,
    compression: Compression = Compression.GZIP,
    force_compression: bool = False,
    tag: str | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> Descriptor:
    """Writes the record's chain as an OCI image layout; returns the manifest's descriptor.

    The layer blobs come from `ref.get_remote(compression=..., force_compression=...)`
    (made by containerd's diff service when needed), parent first. Blobs already in the
    layout are kept when their bytes match their digest, else replaced. The manifest
    replaces the one of the same `tag` (default `latest`) in `index.json`; other tags stay,
    and the old manifest's blobs are left in place. A layout holding a symlink (or a FIFO or
    device) where a file or directory goes is refused with `InvalidError`, and nothing is
    written through one. `progress` hears `start`, `bytes` and `end` for every layer blob.
    """
    name = _check_tag("latest" if tag is None else tag)
    root = pathlib.Path(layout)
    _check_layout(root)
    remote = ref.get_remote(compression=compression, force_compression=force_compression)
    files = _prepare_layout(root)
    image = image_of(ref, remote)
    for desc in remote.descriptors:
        _write_stream_blob(files, desc, lambda desc=desc: remote.provider.open(desc), progress)  # type: ignore[misc]
    _write_bytes_blob(files, image.config_desc, image.config)
    manifest_desc = image.manifest_desc
    _write_bytes_blob(files, manifest_desc, image.manifest)
    named = Descriptor(OCI_MANIFEST, manifest_desc.digest, manifest_desc.size, {REF_NAME: name})
    with _layout_lock(root):
        index = _read_index(files)
        entries = [
            m
            for m in index.get("manifests") or []
            if not (isinstance(m, Mapping) and (m.get("annotations") or {}).get(REF_NAME) == name)
        ]
        entries.append(named.to_oci())
        index = {
            **index,
            "schemaVersion": 2,
            "mediaType": index.get("mediaType") or OCI_INDEX,
            "manifests": entries,
        }
        files.write(["index.json"], [_json_bytes(index, indent=True)])
    return named


@dataclass(frozen=True)
class Image:
    """An image of a record's chain: its config and manifest, serialized, and their
    descriptors."""

    config: bytes
    config_desc: Descriptor
    manifest: bytes
    manifest_desc: Descriptor


def image_of(ref: ImmutableRef, remote: Remote) -> Image:
    """The OCI config (`rootfs.diff_ids` from the layers' `containerd.io/uncompressed`
    annotations, one history entry per record) and manifest of `remote`, the remote of
    `ref`."""
    history = _history(ref, len(remote.descriptors))
    layers = [
        Descriptor(desc.media_type, desc.digest, desc.size, _manifest_annotations(desc))
        for desc in remote.descriptors
    ]
    diff_ids = [_diff_id(desc) for desc in remote.descriptors]
    config_doc: dict[str, Any] = {
        **({"created": history[-1]["created"]} if history else {}),
        **machine_platform(),
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config = _json_bytes(config_doc)
    config_desc = Descriptor(OCI_CONFIG, _sha256(config), len(config))
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_oci(),
        "layers": [d.to_oci() for d in layers],
    }
    manifest = _json_bytes(manifest_doc)
    return Image(
        config, config_desc, manifest, Descriptor(OCI_MANIFEST, _sha256(manifest), len(manifest))
    )


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_tag(tag: str) -> str:
    if not _REF_NAME_RE.match(tag):
        raise InvalidError(f"invalid OCI layout tag {tag!r}")
    return tag


def _check_layout(root: pathlib.Path) -> bool:
    """Whether `root` is an OCI image layout (of version 1.0.0); `InvalidError` when it is
    something else than a layout, an empty directory or nothing."""
    if root.exists() and not root.is_dir():
        raise InvalidError(f"{root} is not a directory")
    if (root / "oci-layout").is_symlink() or (root / "oci-layout").exists():
        OCILayoutProvider(root)  # checks the version
        return True
    if root.is_dir() and any(root.iterdir()):
        raise InvalidError(f"{root} is not empty and not an OCI image layout")
    return False


def _prepare_layout(root: pathlib.Path) -> LayoutFiles:
    """Makes `root` an OCI image layout unless it is one; its files."""
    files = LayoutFiles(root)
    if not _check_layout(root):
        root.mkdir(parents=True, exist_ok=True)
        files.write(["oci-layout"], [_json_bytes({"imageLayoutVersion": OCI_LAYOUT_VERSION})])
    with files.directory(["blobs", "sha256"], create=True):
        return files


def _manifest_annotations(desc: Descriptor) -> dict[str, str]:
    """The layer annotations that belong in a manifest: what BuildKit's OCI exporter keeps
    (it drops the diff id, the record's creation time and the distribution sources)."""
    return {
        k: v
        for k, v in desc.annotations.items()
        if k not in (UNCOMPRESSED_LABEL, CREATED_AT_ANNOTATION)
        and not k.startswith(DISTRIBUTION_SOURCE_PREFIX)
    }


def _diff_id(desc: Descriptor) -> str:
    value = desc.annotations.get(UNCOMPRESSED_LABEL)
    if not value:
        raise CacheError(f"layer {desc.digest} has no {UNCOMPRESSED_LABEL} annotation")
    return value


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _history(ref: ImmutableRef, count: int) -> list[dict[str, Any]]:
    """One history entry per layer of the chain, parent first: the record's creation time
    and description."""
    entries: list[dict[str, Any]] = []
    current: ImmutableRef | None = ref.clone()
    try:
        while current is not None and len(entries) < count:
            entry: dict[str, Any] = {}
            if current.created_at is not None:
                entry["created"] = _rfc3339(current.created_at)
            if current.description:
                entry["created_by"] = current.description
            entry["comment"] = HISTORY_COMMENT
            entries.append(entry)
            parent = current.parent()
            current.release()
            current = parent
    finally:
        if current is not None:
            current.release()
    return entries[::-1]


def _json_bytes(document: Mapping[str, Any], *, indent: bool = False) -> bytes:
    if indent:
        return (json.dumps(document, indent=2) + "\n").encode()
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _write_bytes_blob(files: LayoutFiles, desc: Descriptor, data: bytes) -> None:
    """Writes the blob unless the layout has it with these very bytes."""
    parts = blob_parts(desc.digest)
    if not files.matches(parts, len(data), desc.digest):
        files.write(parts, [data])


def _write_stream_blob(
    files: LayoutFiles,
    desc: Descriptor,
    open_blob: Callable[[], BinaryIO],
    progress: ProgressCallback | None,
) -> None:
    """Streams a blob into the layout, checking its size and digest before it is renamed
    into place; a blob already there with the right size and digest is kept."""
    parts = blob_parts(desc.digest)
    _notify(progress, ProgressEvent("start", desc.digest, 0, desc.size))
    if files.matches(parts, desc.size, desc.digest):
        _notify(progress, ProgressEvent("end", desc.digest, desc.size, desc.size))
        return

    def chunks() -> Iterator[bytes]:
        hasher = hashlib.new(desc.digest.partition(":")[0])
        size = 0
        with open_blob() as blob:
            while chunk := blob.read(_CHUNK):
                size += len(chunk)
                if size > desc.size:
                    raise CacheError(f"blob {desc.digest} is larger than its size {desc.size}")
                hasher.update(chunk)
                yield chunk
                _notify(progress, ProgressEvent("bytes", desc.digest, size, desc.size))
        if size != desc.size:
            raise CacheError(f"blob {desc.digest} has {size} bytes, not {desc.size}")
        seen = f"{hasher.name}:{hasher.hexdigest()}"
        if seen != desc.digest:
            raise CacheError(f"blob {desc.digest} has the digest {seen}")

    try:
        files.write(parts, chunks())
    except BaseException as err:
        _notify(progress, ProgressEvent("end", desc.digest, 0, desc.size, error=err))
        raise
    _notify(progress, ProgressEvent("end", desc.digest, desc.size, desc.size))


@contextlib.contextmanager
def _layout_lock(root: pathlib.Path) -> Iterator[None]:
    """An exclusive `flock` on the layout directory (per open file description, so it
    orders threads of one process as well as processes)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_index(files: LayoutFiles) -> dict[str, Any]:
    path = files.path(["index.json"])
    try:
        data = files.read(["index.json"], MAX_JSON)
    except FileNotFoundError:
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    try:
        index = json.loads(data)
    except ValueError as err:
        raise InvalidError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
        raise InvalidError(f"{path} is not an OCI image index")
    return index


# Reading layouts.


def pull_layout(
    cm: Manager,
    layout: str | os.PathLike[str],
    tag: str | None = None,
    *,
    extract: bool = False,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> ImmutableRef:
    """Registers the layout's layers as (lazy) records with `get_by_blob` and
    `OCILayoutProvider` handlers; returns a ref on the top layer (release it).

    `tag` is the manifest's `org.opencontainers.image.ref.name` (or its digest); without
    one, the layout's only manifest, else `latest`. An image index is followed to the
    manifest for this machine's platform. A layer's diff id is its
    `containerd.io/uncompressed` annotation, else the config's `rootfs.diff_ids`. Every
    layer blob is checked to be in the layout before any record is made; with `extract`
    the chain is pulled and unpacked. On error, the records this call made are removed.
    """
    root = pathlib.Path(os.path.abspath(layout))
    if not root.is_dir():
        raise NotFoundError(f"no OCI layout at {root}")
    provider = OCILayoutProvider(root)
    files = LayoutFiles(root)
    index = _read_index(files)
    name, entry = _select_entry(index, tag, root)

    def read_json(desc: Descriptor) -> dict[str, Any]:
        return _read_json_blob(files, desc)

    def check_blob(desc: Descriptor) -> None:
        try:
            size = files.stat(blob_parts(desc.digest)).st_size
        except FileNotFoundError:
            raise NotFoundError(
                f"layer blob {desc.digest} is not in the OCI layout {root}"
            ) from None
        if size != desc.size:
            raise InvalidError(
                f"layer blob {desc.digest} in {root} has {size} bytes, not {desc.size}"
            )

    manifest_desc, manifest = resolve_manifest(entry, read_json, str(root))
    layers = layer_descriptors(
        manifest_desc, manifest, read_config=read_json, check_blob=check_blob, where=str(root)
    )
    image_ref = f"oci-layout:{root}:{name}" if name else f"oci-layout:{root}@{manifest_desc.digest}"
    return register_layers(
        cm, layers, provider, image_ref, extract=extract, progress=progress, where=str(root)
    )


def register_layers(
    cm: Manager,
    layers: Sequence[Descriptor],
    provider: Provider,
    image_ref: str,
    *,
    extract: bool,
    progress: ProgressCallback | None,
    where: str,
    registry: bool = False,
) -> ImmutableRef:
    """Registers `layers` (parent first, diff ids annotated) as a chain of (lazy) records
    with `get_by_blob` and `provider` handlers, recording `image_ref`; returns a ref on the
    top one. With `extract` the chain is pulled and unpacked. On error, the records this
    call made are removed. When `image_ref` names an image in a `registry`, the handlers
    carry the snapshot labels a remote snapshotter finds the layers with (the stargz
    mode)."""
    started = datetime.now(UTC)
    made: list[str] = []
    current: ImmutableRef | None = None
    try:
        for i, desc in enumerate(layers):
            handler = DescHandler(
                provider,
                progress=progress,
                annotations=dict(desc.annotations),
                ref=image_ref,
                snapshot_labels=(remote_snapshot_labels(image_ref, layers, i) if registry else {}),
            )
            ref = cm.get_by_blob(
                desc, current, desc_handlers={desc.digest: handler}, image_ref=image_ref
            )
            if current is not None:
                current.release()
            current = ref
            info = ref.info()
            if (
                info.usage_count == 0
                and info.last_used_at is None
                and info.created_at is not None
                and info.created_at >= started
            ):
                made.append(ref.id)
        if current is None:
            raise InvalidError(f"no layers to register from {where}")
        if extract:
            current.extract()
    except BaseException:
        if current is not None:
            with contextlib.suppress(CacheError):
                current.release()
        _remove_records(cm, made)
        raise
    return current


def _remove_records(cm: Manager, ids: Sequence[str]) -> None:
    """Removes records this call made (those nobody else took a handle on meanwhile)."""
    if ids:
        with contextlib.suppress(CacheError):
            cm.prune(PrunePolicy(filters=[f"id=={i}" for i in ids], all=True))


def _ref_name(entry: Any) -> str | None:
    if not isinstance(entry, Mapping):
        return None
    annotations = entry.get("annotations")
    if not isinstance(annotations, Mapping):
        return None
    value = annotations.get(REF_NAME)
    return value if isinstance(value, str) else None


def _select_entry(
    index: Mapping[str, Any], tag: str | None, root: pathlib.Path
) -> tuple[str, Descriptor]:
    """The index.json entry for `tag` and the name it goes by."""
    entries = [e for e in index.get("manifests") or [] if isinstance(e, Mapping)]
    if tag is None:
        if len(entries) == 1:
            return _ref_name(entries[0]) or "", descriptor(entries[0], root)
        tag = "latest"
    candidates = [e for e in entries if _ref_name(e) == tag]
    if not candidates:
        candidates = [e for e in entries if e.get("digest") == tag]
    if not candidates:
        raise NotFoundError(f"no manifest tagged {tag!r} in the OCI layout {root}")
    if len(candidates) > 1:
        wanted = machine_platform()
        matching = [e for e in candidates if _platform_matches(wanted, e.get("platform"))]
        candidates = matching or [e for e in candidates if "platform" not in e]
        if not candidates:
            raise NotFoundError(
                f"no manifest tagged {tag!r} for {_platform_name(wanted)} in the OCI layout {root}"
            )
    return tag, descriptor(candidates[0], root)


def _platform_name(p: Mapping[str, str]) -> str:
    return "/".join(v for v in (p["os"], p["architecture"], p.get("variant", "")) if v)


def descriptor(entry: Mapping[str, Any], where: str | pathlib.Path) -> Descriptor:
    """A descriptor of an index or manifest in `where`, checked."""
    try:
        desc = Descriptor.from_oci(entry)
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidError(f"malformed descriptor {dict(entry)!r} in {where}: {err}") from None
    parse_digest(desc.digest, what=f"digest in {where}")
    _validate.size(desc.size, what=f"size of {desc.digest} in {where}")
    return desc


def _read_json_blob(files: LayoutFiles, desc: Descriptor) -> dict[str, Any]:
    """An index, manifest or config blob of the layout, checked against its descriptor."""
    if desc.size > MAX_JSON:
        raise InvalidError(f"blob {desc.digest} is too large for a {desc.media_type}")
    try:
        data = files.read(blob_parts(desc.digest), MAX_JSON)
    except FileNotFoundError:
        raise NotFoundError(f"blob {desc.digest} is not in the OCI layout {files.root}") from None
    return parse_json_blob(desc, data, str(files.root))


def parse_json_blob(desc: Descriptor, data: bytes, where: str) -> dict[str, Any]:
    """An index, manifest or config blob read from `where`, checked against its
    descriptor (size, digest, and the media type it declares)."""
    algorithm = desc.digest.partition(":")[0]
    seen = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    if len(data) != desc.size or seen != desc.digest:
        raise InvalidError(
            f"blob {desc.digest} in {where} does not match its descriptor "
            f"({len(data)} bytes, digest {seen})"
        )
    try:
        document = json.loads(data)
    except ValueError as err:
        raise InvalidError(f"blob {desc.digest} is not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise InvalidError(f"blob {desc.digest} is not a JSON object")
    declared = document.get("mediaType")
    if declared and desc.media_type in (*INDEXES, *MANIFESTS) and declared != desc.media_type:
        raise InvalidError(
            f"blob {desc.digest} is a {declared}, but its descriptor says {desc.media_type}"
        )
    return document


def resolve_manifest(
    desc: Descriptor, read_json: Callable[[Descriptor], dict[str, Any]], where: str
) -> tuple[Descriptor, dict[str, Any]]:
    """Follows image indexes down to the image manifest for this machine's platform;
    `read_json` reads an index or manifest blob."""
    wanted = machine_platform()
    for _ in range(_MAX_NESTING):
        if desc.media_type in MANIFESTS:
            return desc, read_json(desc)
        if desc.media_type not in INDEXES:
            raise InvalidError(f"unsupported manifest media type {desc.media_type!r} in {where}")
        index = read_json(desc)
        entries = [e for e in index.get("manifests") or [] if isinstance(e, Mapping)]
        matching = [e for e in entries if _platform_matches(wanted, e.get("platform"))]
        if not matching and len(entries) == 1 and "platform" not in entries[0]:
            matching = entries
        if not matching:
            raise NotFoundError(
                f"the image index {desc.digest} in {where} has no manifest for "
                f"{_platform_name(wanted)}"
            )
        desc = descriptor(matching[0], where)
    raise InvalidError(f"image indexes nested too deeply in {where}")


def layer_descriptors(
    manifest_desc: Descriptor,
    manifest: Mapping[str, Any],
    *,
    read_config: Callable[[Descriptor], dict[str, Any]],
    check_blob: Callable[[Descriptor], None],
    where: str,
) -> list[Descriptor]:
    """The manifest's layers, each with its diff id annotated (its
    `containerd.io/uncompressed` annotation, else the config's `rootfs.diff_ids`), after
    `check_blob` has accepted every layer blob."""
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list) or not isinstance(manifest.get("config"), Mapping):
        raise InvalidError(f"the manifest {manifest_desc.digest} in {where} is malformed")
    if not raw_layers:
        raise InvalidError(f"the manifest {manifest_desc.digest} in {where} has no layers")
    config_desc = descriptor(manifest["config"], where)
    layers = [descriptor(layer, where) for layer in raw_layers]
    for desc in layers:
        if from_media_type(desc.media_type) is None:
            raise InvalidError(f"unsupported layer media type {desc.media_type!r} of {desc.digest}")
        check_blob(desc)
    diff_ids: list[Any] = []
    if any(UNCOMPRESSED_LABEL not in d.annotations for d in layers):
        config = read_config(config_desc)
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None  # type: ignore[assignment]
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise InvalidError(
                f"the config {config_desc.digest} in {where} does not list one diff id per layer"
            )
    out = []
    for i, desc in enumerate(layers):
        diff_id = desc.annotations.get(UNCOMPRESSED_LABEL) or diff_ids[i]
        parse_digest(diff_id, what=f"diff id of {desc.digest}")
        out.append(
            Descriptor(
                desc.media_type,
                desc.digest,
                desc.size,
                {**desc.annotations, UNCOMPRESSED_LABEL: diff_id},
            )
        )
    return out


# Importing directories and tars.


def import_path(
    cm: Manager,
    path: str | os.PathLike[str],
    *,
    parent: ImmutableRef | None = None,
    description: str | None = None,
    cache_policy: CachePolicy = CachePolicy.DEFAULT,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> ImmutableRef:
    """A directory or a tar (plain, gzip or zstd) becomes a committed (finalized) record on
    `parent`; returns a ref on it (release it).

    A directory is streamed as a tar (modes, owners, mtimes, extended attributes, which
    include file capabilities and POSIX ACLs, as PAX `SCHILY.xattr.*` records; symlinks as
    symlinks, hard links, FIFOs and device nodes; sockets are skipped) straight into
    containerd's diff service. A tar file is first read through once: a member whose name,
    or hard link target, is absolute or has a `..` component is refused with
    `InvalidError`. Nothing is left behind on error. `progress` hears `start`, `bytes` (of
    tar stream sent) and `end`; their digest is empty, and `message` names the path.
    """
    source = pathlib.Path(path)
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise NotFoundError(f"no such file or directory: {source}") from None
    except OSError as err:
        raise InvalidError(f"cannot read {source}: {err.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        importer: Callable[[MutableRef, _Progress], None] = lambda work, counter: (  # noqa: E731
            _apply_directory(work, source, counter)
        )
        total = 0
    elif stat.S_ISREG(st.st_mode):
        _check_tar(source)
        importer = lambda work, counter: _apply_tar(work, source, counter)  # noqa: E731
        total = st.st_size
    else:
        raise InvalidError(f"{source} is neither a directory nor a tar file")
    counter = _Progress(progress, f"importing {source}", total)
    counter.notify("start")
    try:
        # The mutable is made with the default policy, so that releasing it on error
        # removes it; the record gets the caller's policy once it is committed.
        work = cm.new(parent, description=description)
        try:
            importer(work, counter)
            snap = work.commit()
        except BaseException:
            work.release()
            raise
        try:
            snap.finalize()
            if cache_policy is not CachePolicy.DEFAULT:
                snap.set_cache_policy(cache_policy)
        except BaseException:
            snap.release()
            raise
    except BaseException as err:
        counter.notify("end", error=err)
        raise
    counter.notify("end")
    return snap


class _Progress:
    """Counts the tar bytes sent and reports them."""

    def __init__(self, progress: ProgressCallback | None, message: str, total: int) -> None:
        self.progress = progress
        self.message = message
        self.total = total
        self.current = 0

    def notify(
        self, kind: Literal["start", "bytes", "end"], error: BaseException | None = None
    ) -> None:
        if self.progress is not None:
            self.progress(
                ProgressEvent(
                    kind,
                    "",
                    self.current,
                    self.total,
                    message=self.message,
                    error=error,
                )
            )

    def reached(self, count: int) -> None:
        self.current = count
        self.notify("bytes")


def _apply_tar(work: MutableRef, source: pathlib.Path, counter: _Progress) -> None:
    with open(source, "rb") as raw:
        work.apply(io.BufferedReader(CountingReader(raw, counter.reached), _CHUNK))


def _apply_directory(work: MutableRef, source: pathlib.Path, counter: _Progress) -> None:
    """Streams the directory as a tar through a pipe into `work.apply`: one task writes the
    tar, one applies it. The writer's own failure, started first, is the error raised: it
    says why the stream was short."""
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb", buffering=0)

    def write() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out:
                _write_tree(source, out)
        except BrokenPipeError:
            return  # the reader closed the pipe: its own end says why
        except CacheError:
            raise
        except OSError as err:
            raise InvalidError(
                f"cannot read {err.filename or source}: {err.strerror or err}"
            ) from err
        except Exception as err:
            raise CacheError(f"cannot stream {source} as a tar: {err}") from err

    def read() -> None:
        # Closing the read end stops a writer the diff service no longer reads from.
        with reader:
            work.apply(io.BufferedReader(CountingReader(reader, counter.reached), _CHUNK))

    with reader, unwrapped(), TaskGroup(name="pyctrd-cache-import") as group:
        group.start(write)
        group.start(read)


_SCHILY_XATTR: Final = "SCHILY.xattr."


def _pax_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    seconds, fraction = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{seconds}.{fraction:09d}".rstrip("0").rstrip(".")


def _walk(root: pathlib.Path) -> Iterator[tuple[str, str]]:
    """(relative name with "/" separators, full path) of every entry below `root`, each
    directory before its contents, names sorted; symlinks are not followed."""

    def children(directory: str, prefix: str) -> Iterator[tuple[str, str]]:
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it)
        return iter([(prefix + n, os.path.join(directory, n)) for n in names])

    stack = [children(str(root), "")]
    while stack:
        try:
            name, full = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        yield name, full
        if stat.S_ISDIR(os.lstat(full).st_mode):
            stack.append(children(full, name + "/"))


def _write_tree(root: pathlib.Path, out: BinaryIO) -> None:
    """Writes the tree below `root` as a PAX tar stream (end blocks included) to `out`."""
    links: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, full in _walk(root):
            st = os.lstat(full)
            info = tarfile.TarInfo(name)
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            info.uname = info.gname = ""
            info.mtime = st.st_mtime_ns // 1_000_000_000
            if st.st_mtime_ns % 1_000_000_000 or st.st_mtime_ns < 0:
                info.pax_headers = {"mtime": _pax_time(st.st_mtime_ns)}
            info.pax_headers = {**info.pax_headers, **_xattr_headers(full)}
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(full)
            elif stat.S_ISREG(mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    info.type = tarfile.LNKTYPE
                    info.linkname = links[key]
                else:
                    if st.st_nlink > 1:
                        links[key] = name
                    _add_file(tar, info, full)
                    continue
            elif stat.S_ISFIFO(mode):
                info.type = tarfile.FIFOTYPE
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            else:
                continue  # sockets (and anything else tar cannot hold)
            tar.addfile(info)


def _xattr_headers(full: str) -> dict[str, str]:
    """The entry's extended attributes (file capabilities, `user.*`, POSIX ACLs as their
    `system.posix_acl_*` attributes) as PAX `SCHILY.xattr.NAME` records, the form GNU tar
    and containerd's applier use. Values are bytes: tarfile writes a record that is not
    UTF-8 as binary, undoing the surrogate escapes."""
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EPERM):
            return {}  # a file system, or a symlink, without extended attributes
        raise
    headers = {}
    for name in sorted(names):
        try:
            value = os.getxattr(full, name, follow_symlinks=False)
        except OSError as err:
            if err.errno == errno.ENODATA:
                continue  # removed meanwhile
            raise
        headers[_SCHILY_XATTR + name] = value.decode("utf-8", "surrogateescape")
    return headers


def _add_file(tar: tarfile.TarFile, info: tarfile.TarInfo, full: str) -> None:
    """Adds a regular file; opened without following a symlink swapped in meanwhile."""
    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InvalidError(f"{full} changed while it was read")
        info.type = tarfile.REGTYPE
        info.size = st.st_size
        tar.addfile(info, f)


def _check_tar(source: pathlib.Path) -> None:
    """Reads the tar once (plain, gzip or zstd) and refuses members that would land
    outside the root: absolute names, `..` components, hard links pointing out."""
    with open(source, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        if head.startswith((_BZIP2_MAGIC, _XZ_MAGIC)):
            raise InvalidError(f"{source}: only plain, gzip and zstd tars can be imported")
        try:
            with _open_tar_stream(raw, zstd=head.startswith(_ZSTD_MAGIC)) as tar:
                for member in tar:
                    _check_member(source, member)
        except (tarfile.TarError, EOFError, OSError, zlib.error, zstandard.ZstdError) as err:
            raise InvalidError(f"{source} is not a valid tar: {err}") from None


MAX_SPECIAL_HEADER: Final = 1 << 20
"""The largest PAX or GNU long-name header read from a tar (the limit of Go's archive/tar,
which containerd's archive code reads layers with)."""
_SPECIAL_TYPES: Final = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _CappedTarInfo(tarfile.TarInfo):
    """A member header that refuses a PAX or GNU long-name header over
    `MAX_SPECIAL_HEADER` bytes before tarfile reads it into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _SPECIAL_TYPES and self.size > MAX_SPECIAL_HEADER:
            raise tarfile.HeaderError(
                f"a PAX or GNU long-name header of {self.size} bytes (at most {MAX_SPECIAL_HEADER})"
            )
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member


def _open_tar_stream(raw: BinaryIO, *, zstd: bool) -> tarfile.TarFile:
    """A streaming tar reader with capped special headers; tarfile detects gzip itself,
    zstd is decompressed here."""
    if zstd:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return tarfile.open(fileobj=reader, mode="r|", tarinfo=_CappedTarInfo)
    return tarfile.open(fileobj=raw, mode="r|*", tarinfo=_CappedTarInfo)


def _escapes(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


def _check_member(source: pathlib.Path, member: tarfile.TarInfo) -> None:
    if _escapes(member.name):
        raise InvalidError(f"{source}: member {member.name!r} points outside the root")
    if member.islnk() and _escapes(member.linkname):
        raise InvalidError(
            f"{source}: hard link {member.name!r} points outside the root ({member.linkname!r})"
        )
