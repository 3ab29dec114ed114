"""Blobs of records: descriptors and compression variants, blob chains, lazy pulls,
extraction, making a record's blob, and applying layers (BuildKit's cache/blobs.go and the
blob half of refs.go; remotes are in `remotes.py`, conversion in `converter.py`).

Work that writes to containerd runs under a temporary lease until what it made is held by a
record's own lease: a blob or snapshot is added to the record's lease before anything that
depends on it is recorded, so the collector never takes something a record still needs.
Every variant a record has is a resource of the record's (flat) lease, and is also linked
from the original blob with a `containerd.io/gc.ref.content` label for holders whose leases
are not flat.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import queue
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, BinaryIO, Final, TypeVar, cast

from .. import _validate
from .._streams import ChunkReader
from .._tasks import TaskGroup, detached, pipelined, unwrapped
from ..client import Client, ContentWriter, Descriptor, LeaseResource, Mount, Usage
from ..compression import (
    OCI_LAYER,
    Compression,
    chain_id,
    compressed_chunks,
    decompressed_chunks,
    detect,
    from_descriptor,
    media_type_for,
    parse_digest,
)
from ..errors import (
    AlreadyExistsError,
    CacheError,
    ContainerdError,
    FailedPreconditionError,
    InvalidError,
    NeedsRemoteProvidersError,
    NoBlobsError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)
from ..estargz import (
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
)
from ..mounts import readonly_mounts
from ..remote import DescHandler, DescHandlers, ProgressEvent
from . import overlay_diff, remote_snapshots
from .remote_snapshots import Session

if TYPE_CHECKING:
    from ._core import Core
    from .refs import ImmutableRef, MutableRef, _Record

UNCOMPRESSED_LABEL: Final = "containerd.io/uncompressed"
VARIANT_DIGEST_PREFIX: Final = "buildkit.io/compression/digest."
VARIANT_ANNOTATION_PREFIX: Final = _validate.ANNOTATION_LABEL_PREFIX
VARIANT_MEDIA_TYPE_LABEL: Final = "buildkit.io/compression/mediatype"
VARIANT_GC_REF_PREFIX: Final = "containerd.io/gc.ref.content.buildkit.compression."
CREATED_AT_ANNOTATION: Final = "buildkit/createdat"
ESTARGZ_ANNOTATIONS: Final = (TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION)
CHUNK: Final = 1 << 20
"""The size of the reads and writes that stream blobs."""

log = logging.getLogger("pyctrd_cache.blobs")
_T = TypeVar("_T")


def diff_id_of(desc: Descriptor) -> str:
    """The layer's uncompressed digest from its `containerd.io/uncompressed` annotation."""
    value = desc.annotations.get(UNCOMPRESSED_LABEL)
    if value is None:
        raise InvalidError(f"missing {UNCOMPRESSED_LABEL} annotation for {desc.digest}")
    return parse_digest(value, what=f"diff id of {desc.digest}")


def filter_annotations_for_save(annotations: Mapping[str, str]) -> dict[str, str]:
    """The annotations BuildKit keeps across restarts: eStargz's and the diff id."""
    keep = (*ESTARGZ_ANNOTATIONS, UNCOMPRESSED_LABEL)
    return {k: v for k, v in annotations.items() if k in keep}


def variant_label(compression: Compression) -> str:
    return VARIANT_DIGEST_PREFIX + compression.value


def compression_of(media_type: str, annotations: Mapping[str, str] | None = None) -> Compression:
    """The compression of a layer of `media_type` and `annotations` (eStargz is told from
    its annotations); `InvalidError` for an unknown media type."""
    compression = from_descriptor(media_type, annotations or {})
    if compression is None:
        raise InvalidError(f"unhandled layer media type {media_type!r}")
    return compression


def _notify(dh: DescHandler | None, event: ProgressEvent) -> None:
    if dh is not None and dh.progress is not None:
        dh.progress(event)


@contextlib.contextmanager
def temporary_lease(core: Core) -> Iterator[Client]:
    """A client whose calls attach to a new lease of this manager, deleted on exit."""
    lease_id = f"temp-{core.new_id()}"
    leased = core.create_lease(lease_id, "temp")
    try:
        yield leased
    finally:
        with contextlib.suppress(UnavailableError):
            core.drop_lease(lease_id)


# Blob metadata in the content store.


def blob_desc(core: Core, digest: str) -> Descriptor:
    """A blob's descriptor as its labels record it; `NotFoundError` when there is no such
    blob or it carries no media type label."""
    info = core.client.content.info(digest)
    media_type = info.labels.get(VARIANT_MEDIA_TYPE_LABEL)
    if media_type is None:
        raise NotFoundError(f"no media type is stored for {digest}")
    annotations = {
        k.removeprefix(VARIANT_ANNOTATION_PREFIX): v
        for k, v in info.labels.items()
        if k.startswith(VARIANT_ANNOTATION_PREFIX)
    }
    return Descriptor(media_type, info.digest, info.size, annotations)


def oci_desc(rec: _Record, dhs: DescHandlers) -> Descriptor:
    """The descriptor of the record's blob, with the annotations stored with the blob (or
    given by its handler), the diff id and the creation time."""
    md = rec.md
    annotations: dict[str, str] = {}
    try:
        annotations.update(blob_desc(rec.core, md.blob).annotations)
    except NotFoundError:
        dh = dhs.get(md.blob)
        if dh is not None:
            annotations.update(filter_annotations_for_save(dh.annotations))
    if md.diff_id:
        annotations[UNCOMPRESSED_LABEL] = md.diff_id
    if md.created_at is not None:
        created = datetime.fromtimestamp(md.created_at / 1e9, tz=UTC)
        annotations[CREATED_AT_ANNOTATION] = created.isoformat().replace("+00:00", "Z")
    return Descriptor(md.media_type, md.blob, md.blob_size or 0, annotations)


def _variant_labels(desc: Descriptor) -> dict[str, str]:
    """The labels that let `blob_desc` make the descriptor of a blob again."""
    labels = {VARIANT_MEDIA_TYPE_LABEL: desc.media_type}
    for key, value in filter_annotations_for_save(desc.annotations).items():
        labels[VARIANT_ANNOTATION_PREFIX + key] = value
    return labels


def own_blob_labels(desc: Descriptor, compression: Compression) -> dict[str, str]:
    """The labels of a record's own blob `desc`, its `compression` variant of itself."""
    return {variant_label(compression): desc.digest, **_variant_labels(desc)}


def add_compression_blob(rec: _Record, desc: Descriptor, compression: Compression) -> None:
    """Records `desc` as the `compression` variant of the record's blob: held by the
    record's lease first, then labelled on both blobs so that it is found after a restart.
    The record's own blob is held by its lease from the moment it is set (`set_blob`, a
    blob record's creation), and takes its labels in one update. The caller does not hold
    the record lock."""
    client = rec.core.client
    variant = _variant_labels(desc)
    if desc.digest == rec.md.blob:
        client.content.update_labels(desc.digest, own_blob_labels(desc, compression))
    else:
        client.leases.add_resource(rec.id, LeaseResource.content(desc.digest))
        client.content.update_labels(
            rec.md.blob,
            {
                variant_label(compression): desc.digest,
                VARIANT_GC_REF_PREFIX + compression.value: desc.digest,
            },
        )
        client.content.update_labels(desc.digest, variant)
    with rec.mu:
        rec.invalidate_size()  # the size counts every variant


def get_compression_blob(rec: _Record, compression: Compression) -> Descriptor:
    """The record's `compression` variant, found through the labels.

    The variant is added to the record's lease before it is trusted, and checked to exist
    after that, so a collection between the look-up and the use cannot take it
    (moby/buildkit#2346). `NotFoundError` when there is none.
    """
    client = rec.core.client
    digest = client.content.info(rec.md.blob).labels.get(variant_label(compression))
    if digest is None:
        raise NotFoundError(f"no {compression.value} variant of {rec.md.blob}")
    client.leases.add_resource(rec.id, LeaseResource.content(digest))
    try:
        return blob_desc(rec.core, digest)
    except NotFoundError:
        client.leases.delete_resource(rec.id, LeaseResource.content(digest))
        raise


# Blobs and chain ids of records.


def set_blob(rec: _Record, desc: Descriptor, *, made_here: bool = False) -> None:
    """Associates a blob already in the content store with the record (once). A blob this
    module has just made (`made_here`) is not looked up again."""
    _validate.descriptor(desc)
    diff_id = diff_id_of(desc)
    compression = compression_of(desc.media_type, desc.annotations)
    if not made_here:
        rec.core.client.content.info(desc.digest)
    with rec.mu:
        if rec.md.blob:
            return
        rec.finalize()
        rec.core.client.leases.add_resource(rec.id, LeaseResource.content(desc.digest))
        rec.md.diff_id = diff_id
        rec.md.blob = desc.digest
        rec.md.media_type = desc.media_type
        rec.md.blob_size = desc.size
        rec.save()
    add_compression_blob(rec, desc, compression)


def set_chains(rec: _Record) -> None:
    """Computes the chain id and blob chain id of a record whose parent has them."""
    with rec.mu:
        md = rec.md
        if md.chain_id:
            return
        if not md.blob:
            raise NoBlobsError(f"record {rec.id} has no blob")
        layer_blob_chain = chain_id(md.blob, md.diff_id)
        if rec.parent is None:
            md.chain_id, md.blob_chain_id = md.diff_id, layer_blob_chain
        else:
            parent = rec.parent._rec.md
            if not parent.chain_id or not parent.blob_chain_id:
                raise InvalidError(f"parent {parent.id} of {rec.id} has no chain ids")
            md.chain_id = chain_id(parent.chain_id, md.diff_id)
            md.blob_chain_id = chain_id(parent.blob_chain_id, layer_blob_chain)
        rec.save()


def chain_of(ref: ImmutableRef) -> list[_Record]:
    """The records of the ref's chain, parent first."""
    recs = []
    rec: _Record | None = ref._rec
    while rec is not None:
        recs.append(rec)
        rec = rec.parent._rec if rec.parent is not None else None
    return recs[::-1]


def missing_providers(recs: Sequence[_Record], dhs: DescHandlers) -> list[str]:
    """The blobs of `recs` whose snapshots are not made yet, are not here, and have no
    handler."""
    return [r.md.blob for r in recs if r.md.blob not in dhs and r.snapshot_lazy()]


# Pulling lazy blobs.


class _ProviderReader(io.RawIOBase):
    """The blob `desc` from its handler's provider, counted as it streams.

    At the first read a detached task (`_tasks.detached`) opens and reads the provider, so
    that a provider that makes no progress for the handler's `stall_timeout` fails the pull
    with `UnavailableError` (`stalled` is then set; the blocked task is abandoned and closes
    the stream if it ever returns). More bytes than the descriptor's size fail as soon as
    they arrive, a stream that ends short of the size at its end: both `InvalidError`,
    raised before containerd is asked to commit. The digest is containerd's to check: the
    commit names it, and bytes of another digest are refused and their ingest aborted.
    """

    def __init__(self, desc: Descriptor, dh: DescHandler) -> None:
        super().__init__()
        self._desc = desc
        self._dh = dh
        self._count = 0
        self._piece = b""
        self._buffer = memoryview(b"")
        self._items: queue.Queue[bytes | BaseException] = queue.Queue(4)
        self._stop = threading.Event()
        self._started = False
        self.stalled = False

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            stream = self._dh.provider.open(self._desc)
        except BaseException as err:
            self._put(err)
            return
        try:
            with stream:
                while self._put(chunk := stream.read(CHUNK)) and chunk:
                    pass
        except BaseException as err:
            self._put(err)

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Takes the provider's next piece once the last is used up, checked; False at the
        end of the blob."""
        if self._buffer:
            return True
        if not self._started:
            self._started = True
            detached(self._produce)
        desc = self._desc
        try:
            item = self._items.get(timeout=self._dh.stall_timeout)
        except queue.Empty:
            self.stalled = True
            raise UnavailableError(
                f"provider of {desc.digest} made no progress for "
                f"{self._dh.stall_timeout:g} s (after {self._count} of {desc.size} bytes)"
            ) from None
        if isinstance(item, CacheError):
            raise item
        if isinstance(item, BaseException):
            raise CacheError(f"provider of {desc.digest} failed: {item}") from item
        if not item:
            self._check_end()
            return False
        self._count += len(item)
        if self._count > desc.size:
            raise InvalidError(f"provider sent more than the {desc.size} bytes of {desc.digest}")
        self._piece = item if isinstance(item, bytes) else bytes(item)
        self._buffer = memoryview(self._piece)
        _notify(self._dh, ProgressEvent("bytes", desc.digest, self._count, desc.size))
        return True

    def read(self, size: int | None = -1) -> bytes:
        """At most `size` bytes; a whole piece of the provider's is passed on as it came,
        without a copy."""
        if size is None or size < 0:
            return self.readall()
        if not size or not self._fill():
            return b""
        if len(self._buffer) <= size and len(self._buffer) == len(self._piece):
            self._buffer = memoryview(b"")
            return self._piece
        part = bytes(self._buffer[:size])
        self._buffer = self._buffer[size:]
        return part

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._fill():
            return 0
        n = min(len(buffer), len(self._buffer))
        buffer[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def _check_end(self) -> None:
        desc = self._desc
        if self._count != desc.size:
            raise InvalidError(
                f"provider of {desc.digest} ended after {self._count} bytes, short of its "
                f"size {desc.size}"
            )

    def close(self) -> None:
        self._stop.set()
        super().close()


def unlazy(rec: _Record, desc: Descriptor, dh: DescHandler | None) -> None:
    """Copies a lazy blob from its provider into the content store, under the record's lease.

    Concurrent calls for one digest share one copy. The bytes are counted against the
    descriptor as they stream (`_ProviderReader`), and containerd's commit checks their
    digest; on any failure the ingest is aborted, so nothing is left. A blob already in the
    store is not read from the provider: opening the ingest with its digest says so.
    """
    core = rec.core
    core.flight.do(f"unlazy-{desc.digest}", lambda: _unlazy(rec, desc, dh))


def _unlazy(rec: _Record, desc: Descriptor, dh: DescHandler | None) -> None:
    core = rec.core
    if dh is None:
        if rec.blob_missing():
            raise NeedsRemoteProvidersError([desc.digest])
        # Pulled by another process (or for another record) meanwhile: this record's lease
        # holds it too. (With a handler, opening the ingest below does the same: containerd
        # adds a blob it already has to the lease of the call.)
        core.client.leases.add_resource(rec.id, LeaseResource.content(desc.digest))
        return
    ingest = f"unlazy-{desc.digest}"
    content = core.client.with_lease(rec.id).content
    # The blob's labels go with its commit, so that it is labelled from its first moment.
    labels = own_blob_labels(desc, compression_of(desc.media_type, desc.annotations))
    _notify(dh, ProgressEvent("start", desc.digest, 0, desc.size))
    reader = _ProviderReader(desc, dh)
    try:
        try:
            with reader:
                written = content.write(
                    ingest,
                    reader,  # type: ignore[arg-type]
                    expected=desc.digest,
                    size=desc.size,
                    labels=labels,
                )
        except FailedPreconditionError as err:
            # The size was counted: containerd refused bytes of another digest.
            raise InvalidError(
                f"provider sent bytes that are not of {desc.digest} (containerd refused the "
                f"commit: {err.message or err})"
            ) from None
        except CacheError as err:
            # An unreachable daemon cannot abort; a stalled provider leaves it reachable.
            if reader.stalled or not isinstance(err, UnavailableError):
                with contextlib.suppress(CacheError):
                    core.client.content.abort(ingest)
            raise
    except BaseException as err:
        _notify(dh, ProgressEvent("end", desc.digest, 0, desc.size, error=err))
        raise
    _notify(dh, ProgressEvent("end", desc.digest, desc.size, desc.size))
    with rec.mu:
        if written and rec.md.image_refs and not rec.md.description:
            rec.md.description = f"pulled from {rec.md.image_refs[0]}"
            rec.save()
        rec.invalidate_size()


# Extraction.


def extract(ref: ImmutableRef, session: Session = ()) -> None:
    """Makes the snapshots of the ref's whole chain exist: every lazy blob is pulled
    concurrently, and each layer is applied as soon as its parent is ready and its own blob
    is here. In the stargz mode, the layers the snapshotter can mount from the registry are
    prepared as remote snapshots first, and are neither pulled nor applied."""
    if not ref._rec.md.blob_only:
        return
    core = ref._rec.core
    dhs = ref.desc_handlers
    with temporary_lease(core) as leased, remote_snapshots.remote_labels(ref._rec, dhs, session):
        if core.snapshotter == remote_snapshots.STARGZ_SNAPSHOTTER:
            core.flight.do(
                f"prepare-remote-{ref.id}",
                lambda: remote_snapshots.prepare_remote(ref._rec, dhs, session, leased),
            )
        todo = [r for r in chain_of(ref) if r.md.blob_only and not _made_already(r, leased)]
        # Every pull starts at once; each layer is applied, in chain order, once its pull
        # is done. The first failure in chain order (of the pulls that ran) is raised.
        with unwrapped(), TaskGroup() as group:
            pulls = [group.start(lambda r=r: _pull(r, dhs)) for r in todo]  # type: ignore[misc]
            for r, pull in zip(todo, pulls, strict=True):
                desc = pull.result()
                core.flight.do(
                    f"extract-{r.id}",
                    lambda r=r, d=desc: _apply_layer(r, d, dhs, leased),  # type: ignore[misc]
                )


def _pull(rec: _Record, dhs: DescHandlers) -> Descriptor:
    """Pulls the record's blob if it is lazy; its descriptor."""
    desc = oci_desc(rec, dhs)
    unlazy(rec, desc, dhs.get(rec.md.blob))
    return desc


def _made_already(rec: _Record, leased: Client) -> bool:
    """Whether the snapshot a blob-only record would make exists: a remote one, or one that
    another record of the same chain made, which the record then takes without its blob
    being pulled."""
    try:
        info = leased.snapshots(rec.core.snapshotter).stat(rec.md.snapshot_id)
    except NotFoundError:
        return False
    if remote_snapshots.REMOTE_SNAPSHOT_LABEL not in info.labels:
        _mark_extracted(rec)
    return True


def _mark_extracted(rec: _Record) -> None:
    with rec.mu:
        rec.md.blob_only = False
        rec.save()
        rec.invalidate_size()


def _apply_layer(rec: _Record, desc: Descriptor, dhs: DescHandlers, leased: Client) -> None:
    """Applies the record's blob `desc` onto its parent's snapshot, unless the snapshot was
    made meanwhile."""
    core = rec.core
    sn = leased.snapshots(core.snapshotter)
    with contextlib.suppress(NotFoundError):
        sn.stat(rec.md.snapshot_id)
        return
    dh = dhs.get(desc.digest)
    _notify(dh, ProgressEvent("status", desc.digest, message=f"extracting {desc.digest}"))
    key = f"extract-{core.new_id()} {rec.md.chain_id}"
    parent = rec.parent._rec.md.snapshot_id if rec.parent is not None else ""
    mounts = sn.prepare(key, parent)
    try:
        applied = apply_checked(core, leased, desc, mounts)
        if applied.digest != rec.md.diff_id:
            raise InvalidError(
                f"layer {desc.digest} unpacks to {applied.digest}, not to its diff id "
                f"{rec.md.diff_id}"
            )
        try:
            sn.commit(rec.md.snapshot_id, key)
        except AlreadyExistsError:
            sn.remove(key)
    except BaseException:
        with contextlib.suppress(CacheError):
            sn.remove(key)
        raise
    _mark_extracted(rec)


# Creating a record's blob.


class Views:
    """What the blobs of one chain share while they are made: read-only views of committed
    snapshots (a record's view is the upper side of its own diff and the lower side of its
    child's) and the usage of snapshots (which every layer's choice of differ asks of the
    bottom of the chain), each made once. `close` removes the views, so that none outlives
    the work as a child of the chain's snapshots. Thread-safe."""

    def __init__(self, core: Core, leased: Client) -> None:
        self._core = core
        self._sn = leased.snapshots(core.snapshotter)
        self._mu = threading.Lock()
        self._once: dict[tuple[str, str], tuple[threading.Lock, list[object]]] = {}
        self._names: list[str] = []

    def _memo(self, key: tuple[str, str], make: Callable[[], _T]) -> _T:
        with self._mu:
            once, made = self._once.setdefault(key, (threading.Lock(), []))
        with once:
            if not made:
                made.append(make())
            return cast(_T, made[0])

    def mounts(self, snapshot_id: str) -> list[Mount]:
        """The mounts of a view of `snapshot_id`, made by the first caller."""

        def view() -> list[Mount]:
            name = f"diff-view-{self._core.new_id()}"
            with self._mu:
                self._names.append(name)
            return self._sn.view(name, snapshot_id)

        return self._memo(("view", snapshot_id), view)

    def usage(self, snapshot_id: str) -> Usage:
        """containerd's usage of `snapshot_id`, asked by the first caller."""
        return self._memo(("usage", snapshot_id), lambda: self._sn.usage(snapshot_id))

    def close(self) -> None:
        """Removes every view made."""
        with self._mu:
            names, self._names, self._once = self._names, [], {}
        for name in names:
            with contextlib.suppress(CacheError):
                self._sn.remove(name)


def create_blob(
    rec: _Record,
    dhs: DescHandlers,
    leased: Client,
    create_if_needed: bool,
    compression: Compression,
    views: Views,
) -> bool:
    """Makes the record's blob unless it has one, from its overlay upper directory where that
    can be trusted (`overlay_diff`), else with the diff service, on `views` of the record's
    and its parent's snapshots; whether it was made in another compression than
    `compression` (gzip for eStargz, which is converted)."""
    if rec.md.blob:
        return False
    if not create_if_needed:
        raise NoBlobsError(f"record {rec.id} has no blob")
    core = rec.core
    sn = leased.snapshots(core.snapshotter)
    if rec.parent is not None:
        extract(rec.parent)
    with rec.mu:
        if rec.equal_mutable is not None:
            key = rec.equal_mutable._rec.md.snapshot_id
            upper = readonly_mounts(sn.mounts(key))
        else:
            key = rec.md.snapshot_id
            upper = []
    if not upper:
        upper = views.mounts(key)
    made_other = compression is Compression.ESTARGZ
    if made_other:
        compression = Compression.GZIP
    parents = [r.md.snapshot_id for r in chain_of(rec.parent)] if rec.parent else []
    desc = _diff(rec, leased, views, upper, (parents, key), compression)
    set_blob(rec, desc, made_here=True)
    return made_other


def _diff(
    rec: _Record,
    leased: Client,
    views: Views,
    upper: list[Mount],
    keys: tuple[list[str], str],
    compression: Compression,
) -> Descriptor:
    """The record's layer as `compression`, between the parent's view (made when the diff
    service needs it) and the record's mounts `upper`: from the overlay upper directory when that is
    cheaper (`overlay_diff`), else by containerd's diff service. A daemon that cannot write
    zstd (containerd 1.6 and 1.7) gets the upper directory's route whatever its cost, and
    where there is none writes the layer uncompressed, which is streamed back, compressed on
    every core and written as the zstd blob, its digest checked against the uncompressed
    blob's (the diff id); that blob is held only by the caller's temporary lease, so the
    collector takes it."""
    core = rec.core
    ingest = f"diff-{rec.id}"

    def from_upper(always: bool) -> Descriptor | None:
        return overlay_diff.try_write(
            core, leased, views.usage, upper, keys, compression, ingest, write_layer, always=always
        )

    made = from_upper(False)
    if made is not None:
        return made
    lower = [] if rec.parent is None else views.mounts(rec.parent._rec.md.snapshot_id)
    media_type = media_type_for(compression)
    try:
        desc = leased.diff.diff(lower, upper, media_type=media_type, ref=ingest)
    except UnimplementedError:
        if compression is not Compression.ZSTD:
            raise
        log.debug("containerd cannot write zstd: the blob of %s is compressed here", rec.id)
        made = from_upper(True)
        if made is not None:
            return made
        plain = leased.diff.diff(lower, upper, media_type=OCI_LAYER, ref=ingest)
        return write_layer(
            leased,
            f"zstd-{plain.digest}",
            leased.content.read(plain.digest),
            Compression.ZSTD,
            diff_id=plain.digest,
        )
    labels = leased.content.info(desc.digest).labels
    diff_id = labels.get(UNCOMPRESSED_LABEL) or (desc.digest if media_type == OCI_LAYER else "")
    if not diff_id:
        raise CacheError(f"containerd did not record the uncompressed digest of {desc.digest}")
    return Descriptor(media_type, desc.digest, desc.size, {UNCOMPRESSED_LABEL: diff_id})


def write_layer(
    leased: Client,
    ingest: str,
    tar: Iterable[bytes],
    compression: Compression,
    *,
    diff_id: str = "",
) -> Descriptor:
    """Writes the layer tar `tar` into the content store as a blob of `compression` (not
    eStargz) as it streams, never holding it whole.

    Producing the tar, compressing and writing run in tasks of their own; the codecs and
    the hashes release the GIL, so the stages overlap on several cores. The tar's digest is
    the descriptor's `containerd.io/uncompressed` annotation and a compressed blob's label;
    with `diff_id` it is checked first, and a mismatch aborts the ingest (`InvalidError`).
    """
    uncompressed = hashlib.sha256()
    compressed = hashlib.sha256()
    plain = compression is Compression.UNCOMPRESSED

    def tee() -> Iterator[bytes]:
        for chunk in tar:
            uncompressed.update(chunk)
            yield chunk

    def compress() -> Iterator[bytes]:
        for chunk in compressed_chunks(pipelined(tee()), compression):
            if not plain:
                compressed.update(chunk)
            yield chunk

    size = 0
    with leased.content.writer(ingest) as writer:
        if writer.offset:
            writer.truncate()
        try:
            for chunk in pipelined(compress()):
                size += len(chunk)
                writer.write(chunk)
            seen = "sha256:" + uncompressed.hexdigest()
            if diff_id and seen != diff_id:
                raise InvalidError(
                    f"{ingest}: the layer's tar hashes to {seen}, not to its diff id {diff_id}"
                )
            digest = seen if plain else "sha256:" + compressed.hexdigest()
            labels = {} if plain else {UNCOMPRESSED_LABEL: seen}
            commit_written(leased, writer, size=size, digest=digest, labels=labels)
        except BaseException:
            writer.close()
            with contextlib.suppress(CacheError):
                leased.content.abort(ingest)
            raise
    return Descriptor(media_type_for(compression), digest, size, {UNCOMPRESSED_LABEL: seen})


def commit_written(
    leased: Client, writer: ContentWriter, *, size: int, digest: str, labels: Mapping[str, str]
) -> None:
    """Commits what was written, whose digest the caller computed as it wrote.

    The commit names no expected digest: when the blob is already in the namespace,
    containerd then answers "already exists" after committing, with the blob added to the
    lease of the call (with an expected digest it would refuse before, leaving an unleased
    blob to the collector). The labels are set on an existing blob too.
    """
    try:
        committed = writer.commit(size=size, expected="", labels=labels)
    except AlreadyExistsError:
        if labels:
            leased.content.update_labels(digest, labels)
        return
    if committed != digest:
        raise CacheError(
            f"containerd committed {committed}, but the bytes written hash to {digest}"
        )


# Writing layers into mutable snapshots.


def apply_layer(
    ref: MutableRef, layer: bytes | BinaryIO | Descriptor, media_type: str | None
) -> None:
    """Writes a layer tar into the mutable snapshot through containerd's diff service; the
    blob is held only by a temporary lease."""
    rec = ref._rec
    core = rec.core
    if isinstance(layer, Descriptor):
        layer = _validate.descriptor(
            layer if media_type is None else replace(layer, media_type=media_type)
        )
        compression_of(layer.media_type)
    with temporary_lease(core) as leased:
        if isinstance(layer, Descriptor):
            desc = layer
            leased.content.info(desc.digest)
            leased.leases.add_resource(leased.lease, LeaseResource.content(desc.digest))
        else:
            desc = _write_layer(core, leased, layer, media_type)
        with rec.mu:
            mounts = leased.snapshots(core.snapshotter).mounts(rec.md.snapshot_id)
            apply_checked(core, leased, desc, mounts)
            rec.invalidate_size()


def apply_checked(core: Core, leased: Client, desc: Descriptor, mounts: list[Mount]) -> Descriptor:
    """Applies a layer with containerd's diff service; what it applied.

    containerd refuses a member whose path goes through a symbolic link that resolves, inside
    the snapshot, back into itself (`etc -> /etc` followed by `etc/passwd`), or a hard link
    through one, with a bare "too many links": that refusal becomes an `InvalidError` naming
    the member, the same for imports and for extractions of pulled layers.
    """
    try:
        return leased.diff.apply(desc, mounts)
    except ContainerdError as err:
        if "too many links" not in str(err):
            raise
        culprit = _member_through_symlink(core, desc)
        raise InvalidError(
            f"layer {desc.digest} cannot be applied: "
            + (culprit or "a member goes through a symbolic link of a lower layer")
            + " that loops inside the snapshot (containerd: too many links)"
        ) from err


def _member_through_symlink(core: Core, desc: Descriptor) -> str:
    """Names the first member of the layer whose path, or hard link target, goes through a
    symbolic link the layer itself made; "" when there is none."""
    links: dict[str, str] = {}
    chunks = decompressed_chunks(
        core.client.content.read(desc.digest), compression_of(desc.media_type)
    )
    with tarfile.open(fileobj=io.BufferedReader(ChunkReader(chunks), CHUNK), mode="r|") as tar:
        for member in tar:
            name = member.name.strip("/")
            paths = [name] + ([member.linkname.strip("/")] if member.islnk() else [])
            for path in paths:
                parts = path.split("/")
                through = next(
                    (p for p in ("/".join(parts[:i]) for i in range(1, len(parts))) if p in links),
                    None,
                )
                if through is not None:
                    what = f"member {member.name!r}"
                    if path != name:
                        what = f"hard link {member.name!r} (to {member.linkname!r})"
                    return (
                        f"{what} goes through the symbolic link {through!r} -> {links[through]!r}"
                    )
            if member.issym():
                links[name] = member.linkname
    return ""


def _write_layer(
    core: Core, leased: Client, layer: bytes | BinaryIO, media_type: str | None
) -> Descriptor:
    stream: BinaryIO = io.BytesIO(layer) if isinstance(layer, bytes | bytearray) else layer
    head = stream.read(4)
    if media_type is None:
        media_type = media_type_for(detect(head))
    compression_of(media_type)
    digest = hashlib.sha256()
    size = 0
    ingest = f"apply-{core.new_id()}"
    with leased.content.writer(ingest) as writer:
        try:
            chunk = head
            while chunk:
                digest.update(chunk)
                size += len(chunk)
                writer.write(chunk)
                chunk = stream.read(CHUNK)
            expected = "sha256:" + digest.hexdigest()
            commit_written(leased, writer, size=size, digest=expected, labels={})
        except BaseException:
            writer.close()
            with contextlib.suppress(CacheError):
                leased.content.abort(ingest)
            raise
    return Descriptor(media_type, expected, size)
