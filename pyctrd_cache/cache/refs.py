"""Cache records and the counted handles on them (BuildKit's cache/refs.go).

Locking rules, as in BuildKit: the manager lock (`Core.mu`) is taken before any record lock;
a record lock (`_Record.mu`) is shared by records that share data (a mutable record and its
equal immutable); a child's record lock may be held while its parent's is taken, never the
other way round. Every method of `_Record` says in its docstring what its caller holds:
"Caller holds `self.mu`", "Caller holds the manager lock and `self.mu`", "Takes `self.mu`
itself" (the caller must not hold it), or "Needs no lock"; tests/unit/test_record_state.py
checks that each says one. Handles take the locks they need themselves, except
`ImmutableRef._release_locked`, whose caller holds the manager lock.

A record's life is its `RecordState`; `_Record._transition` makes every change of it,
checked against `_TRANSITIONS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import pathlib
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, BinaryIO, Final

from .. import _validate
from .._faults import crash_point
from ..client import Descriptor, Mount
from ..compression import Compression
from ..errors import CacheError, InvalidError, NotFoundError
from ..metadata import RecordMeta
from ..mountpoints import new_mount_point, unmount
from ..mounts import readonly_mounts
from ..remote import DescHandlers, Remote
from ..types import CachePolicy, RecordType, RefInfo
from . import blobs, remotes
from .remote_snapshots import Session, is_remote, remote_labels

if TYPE_CHECKING:
    from ._core import Core

__all__ = ["ImmutableRef", "MutableRef", "Ref"]


def now_ns() -> int:
    return time.time_ns()


def _datetime(ns: int | None) -> datetime | None:
    return None if ns is None else datetime.fromtimestamp(ns / 1e9, tz=UTC)


class RecordState(enum.Enum):
    """Where a record is in its life; every state but LIVE is BuildKit's `dead`."""

    LIVE = "live"
    """In the manager's records, usable."""
    REMOVING = "removing"
    """Its row is marked deleted and nothing may use it, but it is still in the manager's
    records and holds its handle on its parent: a mutable record whose snapshot a finalize
    committed for its equal immutable, until the background remover removes it."""
    GONE = "gone"
    """Out of the manager's records, its parent handle released, its row marked deleted and
    never written again; `purge` deletes its lease and then its row."""


_TRANSITIONS: Final[Mapping[RecordState, frozenset[RecordState]]] = MappingProxyType(
    {
        # A finalize leaves the mutable REMOVING; a removal (a DEFAULT mutable released, an
        # unfinalized immutable given up by `get_mutable`, a prune) makes a record GONE.
        RecordState.LIVE: frozenset({RecordState.REMOVING, RecordState.GONE}),
        # The background remover.
        RecordState.REMOVING: frozenset({RecordState.GONE}),
        RecordState.GONE: frozenset(),
    }
)
"""The state changes a record may make; each marks its row deleted."""


class _Record:
    """One cache record: metadata, open handles, parent handle and containerd bookkeeping."""

    def __init__(
        self,
        core: Core,
        md: RecordMeta,
        *,
        mutable: bool,
        parent: ImmutableRef | None,
        mu: threading.Lock | None = None,
    ) -> None:
        self.core = core
        self.md = md
        self.mutable = mutable
        self.parent = parent
        self.mu = mu or threading.Lock()
        self.refs: set[Ref] = set()
        self._state = RecordState.LIVE
        self.view = ""
        self.view_mounts: list[Mount] | None = None
        self.equal_mutable: MutableRef | None = None
        self.equal_immutable: ImmutableRef | None = None
        self._parent_chain: list[str] | None = None
        # Counts the changes of content or layout that make a measured size stale.
        self.size_epoch = 0
        # The caller's handles (not the parent handles of child records): while there is
        # one, this process holds the record across processes (`MetadataStore.hold`).
        self.holders = 0

    @property
    def id(self) -> str:
        """The record's id. Needs no lock."""
        return self.md.id

    @property
    def state(self) -> RecordState:
        """The record's state. Caller holds `self.mu`; without it the answer may be stale at
        once (a finalize changes a state under that lock alone)."""
        return self._state

    def _transition(self, to: RecordState) -> None:
        """Moves the record to `to`, which `_TRANSITIONS` must allow (else `CacheError`), and
        marks its in-memory row deleted; the caller writes the row. Caller holds `self.mu`,
        and the manager lock for GONE (the record leaves the manager's records)."""
        if to not in _TRANSITIONS[self._state]:
            raise CacheError(
                f"record {self.id} cannot go from {self._state.value} to {to.value} "
                "(a bug in pyctrd-cache)"
            )
        self._state = to
        self.md.deleted = True

    def ref(self, trigger_last_used: bool, dhs: DescHandlers) -> ImmutableRef:
        """A new immutable handle. Caller holds `self.mu`."""
        ref = ImmutableRef(self, trigger_last_used, dhs)
        self.refs.add(ref)
        return ref

    def mref(self, trigger_last_used: bool, dhs: DescHandlers) -> MutableRef:
        """A writable handle: the size measured before no longer holds. Caller holds
        `self.mu`."""
        ref = MutableRef(self, trigger_last_used, dhs)
        self.refs.add(ref)
        self.invalidate_size()
        return ref

    def invalidate_size(self) -> None:
        """Drops the measured size: the snapshot's content or the record's blobs changed.
        Caller holds `self.mu`."""
        self.size_epoch += 1
        if self.md.size is not None:
            self.md.size = None
            self.save()

    def writable(self) -> bool:
        """Whether a writable handle is open, so that the snapshot may change at any time.
        Caller holds `self.mu`."""
        return self.mutable and bool(self.refs)

    def parent_ref(self, trigger_last_used: bool, dhs: DescHandlers) -> ImmutableRef | None:
        """A new handle on the parent. Needs no lock (the parent never changes); takes the
        parent's lock itself."""
        if self.parent is None:
            return None
        prec = self.parent._rec
        with prec.mu:
            return prec.ref(trigger_last_used, dhs)

    def is_dead(self) -> bool:
        """Whether this record or its equal twin left LIVE (BuildKit's `isDead`): nothing may
        use it any more. Caller holds `self.mu` (which the twin shares)."""
        return (
            self._state is not RecordState.LIVE
            or (
                self.equal_immutable is not None
                and self.equal_immutable._rec._state is not RecordState.LIVE
            )
            or (
                self.equal_mutable is not None
                and self.equal_mutable._rec._state is not RecordState.LIVE
            )
        )

    def parent_chain(self) -> list[str]:
        """The blob digests of the chain, parent first; empty while this record has no blob.
        Caller holds `self.mu`; the parents' blobs, set once, are read without their locks."""
        if self._parent_chain is None:
            if not self.md.blob:
                return []
            parent = self.parent._rec.parent_chain() if self.parent else []
            self._parent_chain = [*parent, self.md.blob]
        return self._parent_chain

    # Laziness has two halves: a record's blob may be absent from the content store (what
    # remotes, exports and pushes need), and its snapshot may not be made yet (what mounts
    # need). A record that shares another's extracted snapshot can lack only its blob.

    def blob_missing(self) -> bool:
        """Whether the record has a blob that is not in the content store. Needs no lock (the
        blob, once set, never changes)."""
        if not self.md.blob:
            return False
        try:
            self.core.client.content.info(self.md.blob)
        except NotFoundError:
            return True
        return False

    def is_lazy(self) -> bool:
        """Either half: the blob is absent, or the snapshot is a remote one. Needs no lock (a
        lazy record's snapshot id never changes, and it stops being blob only once)."""
        if self.blob_missing():
            return True
        return (
            self.md.blob_only
            and bool(self.md.blob)
            and is_remote(self.core.client, self.core.snapshotter, self.md.snapshot_id)
        )

    def snapshot_lazy(self) -> bool:
        """The snapshot half: the snapshot is not made, and making it needs the blob. Needs no
        lock, as `is_lazy`."""
        return self.md.blob_only and self.is_lazy()

    def save(self) -> None:
        """Persists the in-memory row, unless the record is GONE. Caller holds `self.mu`."""
        if self._state is not RecordState.GONE:
            self._write()

    def _write(self) -> None:
        """Writes the in-memory row; when the write fails, the row is read back so that
        memory and store still agree. Caller holds `self.mu`."""
        try:
            self.core.store.update(self.md)
        except CacheError:
            with contextlib.suppress(CacheError):
                self.core.store.reload(self.md)
            raise

    def update_last_used(self) -> None:
        """Counts a use, stored at once. Caller holds `self.mu`."""
        self.md.usage_count += 1
        self.md.last_used_at = now_ns()
        self.save()

    # Holds: another process may remove or take exclusively no record this process holds.

    def take_hold(self, *, exclusive: Iterable[str] | None = None, new: bool = False) -> bool:
        """Counts one more caller's handle (the caller marks it `_held`); the first one holds
        the record across processes (`MetadataStore.hold`: `NotFoundError` when another
        process removed it; with `exclusive`, `LockedError` when another holds it or one of
        those). `new`: the row was just written by this process. Whether another process
        wrote since the records were last brought up to date. Caller holds `self.mu`."""
        wrote = False
        if self.holders == 0:
            if new:
                self.core.store.hold_new(self.id)
            else:
                wrote = self.core.store.hold(self.id, exclusive=exclusive)
        self.holders += 1
        return wrote

    def drop_hold(self, ref: Ref) -> None:
        """Uncounts `ref`; with the last caller's handle the hold goes. Caller holds
        `self.mu`."""
        if not ref._held:
            return
        ref._held = False
        self.holders -= 1
        if not self.holders:
            self.core.store.unhold(self.id)

    def forget(self) -> None:
        """Drops a record that another process removed from memory alone: it goes GONE,
        leaves the manager and releases its parent handle; neither its row nor containerd is
        touched. Caller holds the manager lock and `self.mu`."""
        self._leave()

    def _leave(self) -> None:
        """Goes GONE, leaves the manager's records and releases the parent handle. Caller
        holds the manager lock and `self.mu`."""
        self._transition(RecordState.GONE)
        self.core.records.pop(self.id, None)
        if self.parent is not None:
            prec = self.parent._rec
            with prec.mu:
                prec.release_immutable(self.parent)

    def refresh(self, stored: RecordMeta) -> None:
        """Takes the row another process wrote: a finalize made there unlinks the equal
        mutable, and a new blob or snapshot makes the measured size stale. Caller holds
        `self.mu`."""
        if self.equal_mutable is not None and not stored.equal_mutable:
            self.equal_mutable._rec.equal_immutable = None
            self.equal_mutable = None
        md = self.md
        if (md.blob, md.snapshot_id, md.blob_only) != (
            stored.blob,
            stored.snapshot_id,
            stored.blob_only,
        ):
            self._parent_chain = None
            self.size_epoch += 1
        for f in dataclasses.fields(stored):
            setattr(md, f.name, getattr(stored, f.name))
        self.core.store.track(md)

    def info(self) -> RefInfo:
        """The record's metadata as the public API shows it. Caller holds `self.mu`."""
        md = self.md
        return RefInfo(
            id=md.id,
            mutable=self.mutable,
            parent_id=md.parent or None,
            snapshot_id=md.snapshot_id,
            equal_mutable_id=md.equal_mutable or None,
            blob=md.blob or None,
            diff_id=md.diff_id or None,
            chain_id=md.chain_id or None,
            blob_chain_id=md.blob_chain_id or None,
            media_type=md.media_type or None,
            blob_size=md.blob_size,
            blob_only=md.blob_only,
            size=md.size,
            description=md.description,
            created_at=_datetime(md.created_at),
            last_used_at=_datetime(md.last_used_at),
            usage_count=md.usage_count,
            record_type=md.record_type,
            layer_type=md.layer_type,
            cache_policy=md.cache_policy,
            image_refs=tuple(md.image_refs),
        )

    # Life cycle.

    def release_immutable(self, ref: ImmutableRef) -> None:
        """Gives up an immutable handle; with the last one, the view and the equal mutable's
        handle go. Caller holds the manager lock and `self.mu`."""
        self.refs.discard(ref)
        if ref.trigger_last_used and not any(r.trigger_last_used for r in self.refs):
            self.update_last_used()
            if self.equal_mutable is not None:
                self.equal_mutable.trigger_last_used = True
        self.drop_hold(ref)
        if self.refs:
            return
        if self.view:
            self.core.drop_lease(self.view)
            self.view = ""
            self.view_mounts = None
        if self.equal_mutable is not None:
            self.equal_mutable._rec.release_mutable(self.equal_mutable)

    def release_mutable(self, ref: MutableRef) -> None:
        """Gives up a mutable handle; a record that is not RETAIN goes with it, and so does
        its unfinalized equal immutable unless that one is RETAIN. Caller holds the manager
        lock and `self.mu`."""
        self.refs.discard(ref)
        self.drop_hold(ref)
        # Whatever the handle wrote (through mounts or apply) is measured afresh.
        self.invalidate_size()
        if self.md.cache_policy is not CachePolicy.RETAIN:
            twin = self.equal_immutable
            if twin is not None:
                if twin._rec.md.cache_policy is CachePolicy.RETAIN:
                    self._trigger_last_used(ref)
                    return
                twin._rec.remove()
            self.remove()
            return
        self._trigger_last_used(ref)

    def _trigger_last_used(self, ref: MutableRef) -> None:
        """Counts the use `ref` was taken for, once. Caller holds `self.mu`."""
        if ref.trigger_last_used:
            self.update_last_used()
            ref.trigger_last_used = False

    def remove(self) -> bool:
        """Drops the record: releases its parent, deletes its lease, clears its row. The row
        is marked deleted before the lease goes, so that a crash in between is finished by
        `Manager.open`. Nothing happens when another process holds the record or built on
        it (`MetadataStore.claim_removal`); whether it was removed. Caller holds the manager
        lock and `self.mu`."""
        if self._state is RecordState.LIVE and not self.core.store.claim_removal([self.id]):
            return False
        self.detach()
        self.purge()
        return True

    def detach(self) -> None:
        """The part of `remove` that needs the locks: the record goes GONE (first, so that
        it is dead even when what follows fails), leaves the manager, releases its parent
        and has its row marked deleted (a REMOVING record's is already). Caller holds the
        manager lock and `self.mu`."""
        marked = self._state is RecordState.REMOVING
        self._leave()
        if not marked:
            self._write()

    def purge(self) -> None:
        """The rest of `remove`, for a GONE record: the lease, then the row. Needs no lock.

        An unfinalized immutable record holds no snapshot of its own (its data is its equal
        mutable's, under that record's lease), but a finalize that failed while containerd
        was unreachable can leave its lease behind; it goes too, or the next `open` would
        find a record lease without a row.
        """
        crash_point("remove.after_mark")
        with contextlib.suppress(NotFoundError):
            self.core.client.leases.delete(self.id)
        crash_point("remove.after_lease_delete")
        self.core.store.delete(self.id)

    def finalize(self) -> None:
        """Commits the equal mutable's snapshot for good under this record's own lease; the
        mutable goes REMOVING. Caller holds `self.mu`.

        The committed snapshot exists under the new lease before the mutable's row is marked
        deleted (in the same transaction that clears the link), and the mutable's removal
        runs afterwards outside the record lock.
        """
        if self.equal_mutable is None:
            return
        # One process at a time finalizes a record; a later one finds the row finalized.
        with self.core.store.exclusive(f"finalize-{self.id}"):
            stored = self.core.store.get(self.id)
            if stored is not None and not stored.deleted and not stored.equal_mutable:
                self._finalized_elsewhere(stored)
            else:
                self._finalize()

    def _finalized_elsewhere(self, stored: RecordMeta) -> None:
        """Takes a finalize another process made: the row, and the equal mutable (whose row
        that process marked deleted) goes REMOVING here too. Caller holds `self.mu`."""
        mutable = self.equal_mutable
        self.refresh(stored)
        if mutable is not None and mutable._rec.state is RecordState.LIVE:
            mutable._rec._transition(RecordState.REMOVING)
            self.core.remove_later(mutable._rec)

    def _finalize(self) -> None:
        """`finalize` under the lock across processes. Caller holds `self.mu`."""
        mutable = self.equal_mutable
        if mutable is None:
            return
        mrec = mutable._rec
        leased = self.core.create_lease(self.id, "record", exist_ok=True)
        crash_point("finalize.after_lease")
        try:
            leased.snapshots(self.core.snapshotter).commit(self.id, mrec.md.snapshot_id)
        except CacheError:
            with contextlib.suppress(CacheError):
                self.core.client.leases.delete(self.id)
            raise
        crash_point("finalize.after_snapshot_commit")
        mrec._transition(RecordState.REMOVING)
        self.equal_mutable = None
        self.md.equal_mutable = ""
        self.md.snapshot_id = self.id
        self.core.store.update(self.md, mrec.md)
        crash_point("finalize.after_metadata")
        self.core.remove_later(mrec)

    def commit(self, ref: MutableRef) -> ImmutableRef:
        """The lazy commit of this mutable record: a new immutable record whose data is the
        mutable's snapshot. Caller holds the manager lock and `self.mu`."""
        if not self.mutable or ref not in self.refs:
            raise InvalidError(f"invalid mutable ref {ref.id}")
        md = RecordMeta(
            self.core.new_id(),
            committed=True,
            parent=self.md.parent,
            equal_mutable=self.id,
            snapshot_id=self.md.snapshot_id,
            description=self.md.description,
            record_type=self.md.record_type,
            created_at=now_ns(),
        )
        dhs = ref.desc_handlers
        rec = _Record(self.core, md, mutable=False, parent=self.parent_ref(False, dhs), mu=self.mu)
        rec.equal_mutable = ref
        # Held before its row exists: another process's prune never claims it.
        self.core.store.hold_new(md.id)
        try:
            self.core.store.insert(md)
        except BaseException:
            self.core.store.unhold(md.id)
            raise
        ref._released = ref._passed = True
        crash_point("commit.after_insert")
        self.core.records[md.id] = rec
        immutable = rec.ref(True, dhs)
        rec.take_hold(new=True)
        immutable._held = True
        self.equal_immutable = immutable
        return immutable

    def mounts(self, readonly: bool) -> list[Mount]:
        """The containerd mounts; an immutable record is finalized first unless a read-only
        mount of its equal mutable will do. Caller holds `self.mu`."""
        sn = self.core.client.snapshots(self.core.snapshotter)
        if self.mutable:
            mounts = sn.mounts(self.md.snapshot_id)
            return readonly_mounts(mounts) if readonly else mounts
        if self.equal_mutable is not None and readonly:
            return readonly_mounts(sn.mounts(self.equal_mutable._rec.md.snapshot_id))
        self.finalize()
        if self.view_mounts is None:
            view = self.core.new_id()
            leased = self.core.create_lease(view, "view")
            try:
                self.view_mounts = leased.snapshots(self.core.snapshotter).view(
                    view, self.md.snapshot_id
                )
            except CacheError:
                with contextlib.suppress(CacheError):
                    self.core.drop_lease(view)
                raise
            self.view = view
        return self.view_mounts

    def compute_size(self, unsaved: list[_Record] | None = None) -> int:
        """Snapshot usage plus the blob and its compression variants; cached in the row.

        A record with a writable handle open is measured but not cached (its snapshot may
        change at any time), and neither is a measurement that raced with a change of the
        record (a write, an extraction, a finalize moving the snapshot) or that found the
        snapshot missing. With `unsaved`, a size cached in memory is not written to the row:
        the record is appended to `unsaved` for the caller's `save_rows`. Takes `self.mu`
        itself.
        """
        while True:
            with self.mu:
                if self.md.size is not None and not self.writable():
                    return self.md.size
                state = self._size_state()
            _, driver, blob_only, blob = state
            size, complete = 0, True
            if not blob_only:
                try:
                    size = self.core.client.snapshots(self.core.snapshotter).usage(driver).size
                except NotFoundError:
                    complete = False
            if blob:
                size += self._blob_sizes(blob)
            with self.mu:
                if self.is_dead():
                    return 0
                if self._size_state() != state:
                    continue
                if complete and not self.writable():
                    self.md.size = size
                    if unsaved is None:
                        self.save()
                    else:
                        unsaved.append(self)
                return size

    def measure(self, unsaved: list[_Record] | None = None) -> int:
        """`compute_size`, one computation for concurrent callers. Takes `self.mu` itself."""
        return self.core.flight.do(f"size-{self.id}", lambda: self.compute_size(unsaved))

    def _size_state(self) -> tuple[int, str, bool, str]:
        """What a measured size depends on: the epoch, the snapshot measured, the blob.
        Caller holds `self.mu`."""
        driver = self.md.snapshot_id
        if self.equal_mutable is not None:
            driver = self.equal_mutable._rec.md.snapshot_id
        return (self.size_epoch, driver, self.md.blob_only, self.md.blob)

    def _blob_sizes(self, blob: str) -> int:
        """The sizes of `blob` and of its compression variants. Needs no lock."""
        content = self.core.client.content
        try:
            info = content.info(blob)
        except NotFoundError:
            return 0
        total = info.size
        for key, value in info.labels.items():
            # A variant label that points at the blob itself is not counted twice.
            if key.startswith(blobs.VARIANT_DIGEST_PREFIX) and value != blob:
                with contextlib.suppress(CacheError):
                    total += content.info(value).size
        return total


def save_rows(recs: Iterable[_Record]) -> None:
    """Persists the in-memory rows of `recs` in one transaction, each written under its
    record's lock so that the row is the one in memory; a record whose lock is busy is saved
    on its own afterwards, and a GONE one not at all (as `_Record.save`). Takes each
    record's lock itself."""
    held: dict[int, threading.Lock] = {}
    batch: list[_Record] = []
    busy: list[_Record] = []
    try:
        for rec in recs:
            # Records of an equal pair share one lock.
            if id(rec.mu) not in held:
                if not rec.mu.acquire(blocking=False):
                    busy.append(rec)
                    continue
                held[id(rec.mu)] = rec.mu
            if rec.state is not RecordState.GONE:
                batch.append(rec)
        if batch:
            try:
                batch[0].core.store.update(*(rec.md for rec in batch))
            except CacheError:
                for rec in batch:
                    with contextlib.suppress(CacheError):
                        rec.core.store.reload(rec.md)
                raise
    finally:
        for lock in held.values():
            lock.release()
    for rec in busy:
        with rec.mu:
            rec.save()


class Ref:
    """A counted handle on a cache record; release every ref exactly once."""

    def __init__(self, rec: _Record, trigger_last_used: bool, dhs: DescHandlers) -> None:
        self._rec = rec
        self.trigger_last_used = trigger_last_used
        self.desc_handlers = dhs
        """The handlers of the chain's lazy blobs, by digest."""
        self._released = False
        self._passed = False
        """Set when `commit` passed this mutable handle into an immutable ref."""
        self._held = False
        """Whether this is a caller's handle, counted in the record's holds."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"

    def __enter__(self) -> Ref:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A mutable handle that `commit` passed on is released through the immutable ref.
        if not self._passed:
            self.release()

    @property
    def id(self) -> str:
        """The record's id, stable across restarts."""
        return self._rec.id

    def _check(self) -> None:
        self._rec.core.check_open()
        if self._released:
            raise InvalidError(f"ref {self.id} was already released")

    def release(self) -> None:
        """Gives the handle up; each ref is released once, or used as a context manager."""
        raise NotImplementedError

    def mounts(self, readonly: bool, *, session: Session = ()) -> list[Mount]:
        """The containerd mounts of the record's snapshot; `session` is the caller's session
        ids, for a remote snapshotter (the stargz mode)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def mount(self, readonly: bool = True, *, session: Session = ()) -> Iterator[pathlib.Path]:
        """Mounts the record on a new directory under the state directory, unmounted (and
        removed) on exit; if the process dies first, the next `Manager.open` on the state
        directory does that (`pyctrd_cache.mountpoints`).

        Needs the privilege to mount (root, or CAP_SYS_ADMIN).
        """
        mounts = self.mounts(readonly, session=session)
        target = new_mount_point(self._rec.core.mounts_dir)
        mounted: list[pathlib.Path] = []
        try:
            for m in mounts:
                _mount_one(m, target)
                mounted.append(target)
            yield target
        finally:
            for path in reversed(mounted):
                unmount(path)
            target.rmdir()

    def info(self) -> RefInfo:
        """A snapshot of the record's metadata, read under the record lock."""
        self._check()
        with self._rec.mu:
            return self._rec.info()

    @property
    def description(self) -> str:
        """The caller's description of the record."""
        return self._rec.md.description

    @property
    def created_at(self) -> datetime | None:
        """When the record was created (UTC)."""
        return _datetime(self._rec.md.created_at)

    @property
    def last_used_at(self) -> datetime | None:
        """When the record was last used (UTC): the release of its last handle; None if never."""
        return _datetime(self._rec.md.last_used_at)

    @property
    def usage_count(self) -> int:
        """How many times the record was used (BuildKit's `cache.usageCount`)."""
        return self._rec.md.usage_count

    @property
    def record_type(self) -> RecordType:
        """What the record holds (BuildKit's record type)."""
        return self._rec.md.record_type

    @property
    def layer_type(self) -> str:
        """The caller's layer type label (BuildKit's `cache.layerType`)."""
        return self._rec.md.layer_type

    @property
    def cache_policy(self) -> CachePolicy:
        """DEFAULT (pruned when unused) or RETAIN."""
        return self._rec.md.cache_policy

    def _set(self, **values: object) -> None:
        self._check()
        with self._rec.mu:
            for name, value in values.items():
                setattr(self._rec.md, name, value)
            self._rec.save()

    def set_description(self, description: str) -> None:
        """Sets the description (at most 4096 bytes), stored at once."""
        _validate.description(description)
        self._set(description=description)

    def set_record_type(self, record_type: RecordType) -> None:
        """Sets the record type, stored at once."""
        self._set(record_type=RecordType(record_type))

    def set_layer_type(self, layer_type: str) -> None:
        """Sets the layer type label, stored at once."""
        self._set(layer_type=layer_type)

    def set_cache_policy(self, policy: CachePolicy) -> None:
        """Sets the cache policy, stored at once (it survives a reopen)."""
        self._set(cache_policy=CachePolicy(policy))

    def set_created_at(self, created_at: datetime) -> None:
        """Sets the creation time; `InvalidError` for a naive datetime."""
        if created_at.tzinfo is None:
            raise InvalidError("created_at must be timezone-aware")
        self._set(created_at=int(created_at.timestamp() * 1e9))

    def get_external(self, key: str) -> bytes:
        """Opaque per-record data stored by a caller; NotFoundError when unset."""
        self._check()
        value = self._rec.core.store.get_external(self.id, key)
        if value is None:
            raise NotFoundError(f"no external value {key!r} on record {self.id}")
        return value

    def set_external(self, key: str, value: bytes) -> None:
        """Stores opaque per-record data under `key`, read back with `get_external`."""
        self._check()
        self._rec.core.store.set_external(self.id, key, bytes(value))


class ImmutableRef(Ref):
    """A handle on a committed record."""

    def __enter__(self) -> ImmutableRef:
        return self

    def release(self) -> None:
        """Gives the handle up; a record with no handle left is reclaimable by `prune`."""
        with self._rec.core.mu:
            self._release_locked()

    def _release_locked(self) -> None:
        """`release` for a caller that holds the manager lock."""
        with self._rec.mu:
            self._check()
            self._released = True
            self._rec.release_immutable(self)

    def parent(self) -> ImmutableRef | None:
        """A new handle on the parent record (release it), or None."""
        self._check()
        ref = self._rec.parent_ref(True, self.desc_handlers)
        if ref is not None:
            _hold_or_release(ref)
        return ref

    def clone(self) -> ImmutableRef:
        """A new handle on the same record."""
        self._check()
        with self._rec.mu:
            ref = self._rec.ref(False, self.desc_handlers)
            self._rec.take_hold()
            ref._held = True
            return ref

    def size(self) -> int:
        """Bytes used: snapshot usage plus the blob and its compression variants."""
        self._check()
        return self._rec.measure()

    def is_lazy(self) -> bool:
        """Whether the record's blob is not in the content store (or its snapshot is remote)."""
        self._check()
        return self._rec.is_lazy()

    def finalize(self) -> None:
        """Commits the equal mutable snapshot for good; afterwards the mutable id is gone."""
        self._check()
        with self._rec.mu:
            self._rec.finalize()

    def mounts(self, readonly: bool, *, session: Session = ()) -> list[Mount]:
        """The record's mounts; a lazy chain is extracted first (in the stargz mode, its
        remote layers are mounted from the registry instead)."""
        self._check()
        blobs.extract(self, session)
        with remote_labels(self._rec, self.desc_handlers, session), self._rec.mu:
            return self._rec.mounts(readonly)

    def extract(self, *, session: Session = ()) -> None:
        """Makes the snapshot exist, pulling and applying the chain's lazy blobs; in the
        stargz mode, the layers the snapshotter can mount from the registry are prepared as
        remote snapshots instead, and stay lazy. `session` is the caller's session ids,
        handed to the remote snapshotter as temporary labels."""
        self._check()
        blobs.extract(self, session)

    def set_blob(self, desc: Descriptor) -> None:
        """Associates a blob already in the content store with the record (its compression
        from the media type) and computes the chain ids; nothing changes when the record
        already has a blob. `InvalidError`, before anything is written, when the parent has
        no blob (and so no chain ids to extend)."""
        self._check()
        parent = self._rec.parent
        if parent is not None:
            with parent._rec.mu:
                pmd = parent._rec.md
                if not (pmd.chain_id and pmd.blob_chain_id):
                    raise InvalidError(
                        f"cannot set the blob of {self.id}: its parent {pmd.id} has no blob"
                    )
        blobs.set_blob(self._rec, desc)
        blobs.set_chains(self._rec)

    def get_remote(
        self,
        *,
        create_if_needed: bool = True,
        compression: Compression = Compression.GZIP,
        force_compression: bool = False,
    ) -> Remote:
        """The descriptors of the whole chain, parent first, creating blobs through
        containerd's diff service when needed (`NoBlobsError` without `create_if_needed`)
        and converting to `compression` when forced; without force, a `compression` variant
        made before is served in place of the record's blob."""
        self._check()
        return remotes.get_remote(
            self,
            create_if_needed=create_if_needed,
            compression=Compression(compression),
            force_compression=force_compression,
        )


class MutableRef(Ref):
    """A handle on a writable record; `commit` passes it into an immutable ref."""

    def __enter__(self) -> MutableRef:
        return self

    def release(self) -> None:
        """Gives the handle up; an uncommitted record goes with it unless it is RETAIN."""
        with self._rec.core.mu, self._rec.mu:
            self._check()
            self._released = True
            self._rec.release_mutable(self)

    def commit(self) -> ImmutableRef:
        """An immutable ref equal to this one; the snapshot is committed at finalize.

        This handle passes into the returned ref: release only that one.
        """
        with self._rec.core.mu, self._rec.mu:
            self._check()
            return self._rec.commit(self)

    def mounts(self, readonly: bool, *, session: Session = ()) -> list[Mount]:
        self._check()
        parent = self._rec.parent
        with (
            remote_labels(parent._rec if parent else None, self.desc_handlers, session),
            self._rec.mu,
        ):
            return self._rec.mounts(readonly)

    def apply(self, layer: bytes | BinaryIO | Descriptor, *, media_type: str | None = None) -> None:
        """Writes a layer tar (plain, gzip or zstd; bytes, a binary file, or a descriptor of
        a blob in the content store) into the snapshot through containerd's diff service."""
        self._check()
        blobs.apply_layer(self, layer, media_type)


def _hold_or_release(ref: ImmutableRef) -> None:
    """Counts a new handle as the caller's; on failure it is released and the error
    raised."""
    try:
        with ref._rec.mu:
            ref._rec.take_hold()
            ref._held = True
    except BaseException:
        ref.trigger_last_used = False
        ref.release()
        raise


def _mount_one(m: Mount, target: pathlib.Path) -> None:
    options = [o for o in m.options if o]
    args = ["mount", "-t", m.type, "-o", ",".join(options), m.source, str(target)]
    if m.type == "bind":
        args = ["mount", "-o", ",".join(options), m.source, str(target)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip()
        if os.geteuid() != 0:
            reason = f"mounting needs root or CAP_SYS_ADMIN ({reason})"
        raise CacheError(f"cannot mount {m.type} {m.source} on {target}: {reason}")
