"""The cache manager (BuildKit's cache/manager.go): look-up, life cycle, usage and prune.

State lives in three places (DESIGN.md): containerd holds snapshots, blobs and one lease per
record (lease id = record id, `containerd.io/gc.flat`, and this manager's ownership label);
the metadata store holds the rows; process memory holds open handles and locks. Every
change follows the same order so that a crash at any point leaves state `open` repairs:
write the row, then create the lease and the containerd objects under it; remove by marking
the row deleted, deleting the lease, then dropping the row. A record lease is thus never
without its row, and one found without means the store lost records (`StoreDamagedError`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType, TracebackType
from typing import Final

from .. import _validate, mountpoints
from .._faults import crash_point
from .._tasks import run_all, unwrapped
from ..client import (
    DEFAULT_ADDRESS,
    Client,
    ContentService,
    Descriptor,
    LeaseResource,
)
from ..compression import chain_id
from ..errors import (
    CacheError,
    InvalidError,
    LockedError,
    NeedsRemoteProvidersError,
    NotFoundError,
    StoreDamagedError,
)
from ..metadata import MetadataStore, RecordMeta
from ..remote import DescHandler, DescHandlers
from ..shared import ImageStoreChecker, SharedChecker, SharedCheckerFactory
from ..types import CachePolicy, PrunePolicy, RecordStatus, RecordType, RefInfo, UsageInfo
from ..usage_filters import UsageFilter, compile_filters
from . import _reconcile, _usage, blobs, remote_snapshots
from ._core import KIND_LABEL, OWNER_LABEL, SESSION_LABEL, Core, new_id
from ._usage import keep_bytes_for
from .refs import ImmutableRef, MutableRef, RecordState, _Record, now_ns, save_rows

__all__ = ["OWNER_LABEL", "Manager", "default_state_dir"]

_log = logging.getLogger("pyctrd_cache")
_NO_HANDLERS: Final[DescHandlers] = MappingProxyType({})
DEFAULT_NAMESPACE: Final = "pyctrd"
_MEASURERS: Final = 8
"""How many records `disk_usage` measures at a time."""

log = logging.getLogger("pyctrd_cache.manager")


def default_state_dir() -> pathlib.Path:
    """`$PYCTRD_CACHE_STATE_DIR`, else `$XDG_STATE_HOME/pyctrd-cache`, else
    `~/.local/state/pyctrd-cache`."""
    if explicit := os.environ.get("PYCTRD_CACHE_STATE_DIR"):
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return pathlib.Path(base) / "pyctrd-cache"


@dataclass
class _UsageEntry:
    rec: _Record
    info: RefInfo
    refs: int
    double_ref: bool
    chain: list[str]


class _Gone:
    """What a prune removed so far (or, in a dry run, would have): the records, the
    handles they held on their parents, and the bytes that freed."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.handles: set[ImmutableRef] = set()
        self.freed = 0

    def holds(self, rec: _Record) -> bool:
        """Whether `rec` has a handle that no removed record held."""
        return any(ref not in self.handles for ref in rec.refs)

    def add(self, rec: _Record, twin: _Record | None, freed: int) -> None:
        self.freed += freed
        for one in (rec, twin):
            if one is not None:
                self.ids.add(one.id)
                if one.parent is not None:
                    self.handles.add(one.parent)


class Manager:
    """BuildKit's cache manager over one containerd namespace and one state directory.

    Create it with `Manager.open`; all methods, and those of its refs, are thread-safe.
    """

    def __init__(
        self,
        client: Client,
        store: MetadataStore,
        snapshotter: str,
        shared_checker: SharedCheckerFactory | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self.snapshotter = snapshotter
        self._shared_checker: SharedCheckerFactory = shared_checker or (
            lambda: ImageStoreChecker(client)
        )
        self._core = Core(client, store, snapshotter)
        self._prune_mu = threading.Lock()
        self._containerd_version = ""

    # Opening and closing.

    @classmethod
    def open(
        cls,
        address: str | None = None,
        *,
        namespace: str | None = None,
        snapshotter: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        shared_checker: SharedCheckerFactory | None = None,
        repair: bool = False,
        lock_timeout: float = 0.0,
    ) -> Manager:
        """Connects, checks the snapshotter, opens the metadata store and reconciles it with
        containerd.

        Each of `address`, `namespace`, `snapshotter` and `state_dir` left out is taken from
        `$CONTAINERD_ADDRESS`, `$CONTAINERD_NAMESPACE`, `$CONTAINERD_SNAPSHOTTER` and
        `$PYCTRD_CACHE_STATE_DIR`, else the defaults (`/run/containerd/containerd.sock`,
        `pyctrd`, `overlayfs`, `default_state_dir()`).

        Any number of managers, in any processes, may have one state directory open at
        once; a record one of them holds is neither pruned nor taken exclusively by
        another. Only a brief exclusive step (creating or migrating the metadata store,
        moving a damaged one aside) makes others wait for it, up to `lock_timeout` seconds
        but at least 10. A single-process version (schema 1) holds the directory
        exclusively while it has it open: this call waits up to `lock_timeout` seconds for
        it, logging once who holds it (process id and command), then raises `LockedError`
        naming the holder.

        The open that finds no other live manager reconciles the store with containerd
        (below); one that finds others only reaps the sessions of dead processes.

        `shared_checker` makes the checker `disk_usage` and `prune` ask which records are
        shared; by default, those whose chain of blobs an image in the namespace's image
        store uses.

        A metadata store that cannot be read, or that lost records whose leases still exist
        in containerd, raises `StoreDamagedError` naming the file and the lost records, and
        changes nothing. `repair=True` gives those records up instead: an unreadable
        database is moved aside and started again empty, the leases of lost records are
        deleted (containerd collects their data), and the rest is reconciled as usual.
        """
        address = address or os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS
        namespace = namespace or os.environ.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE
        snapshotter = snapshotter or os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs"
        client = Client(address, namespace=namespace)
        try:
            version = client.check(snapshotter=snapshotter)
            store = MetadataStore(
                state_dir if state_dir is not None else default_state_dir(),
                repair=repair,
                lock_timeout=lock_timeout,
            )
        except BaseException:
            client.close()
            raise
        try:
            manager = cls(client, store, snapshotter, shared_checker)
        except BaseException:
            store.close()
            client.close()
            raise
        manager._containerd_version = version.version
        try:
            # One open reconciles at a time; only one that finds no other live session
            # may repair what crashes left half done (a live one's work looks the same).
            with store.exclusive("reconcile"):
                manager._reap_dead_sessions()
                if manager._alone():
                    manager._reconcile(repair=repair)
                else:
                    manager._load_live_records()
            for path in mountpoints.clean_stale(manager.mounts_dir):
                _log.debug("unmounted and removed %s, left by a process that is gone", path)
        except BaseException:
            manager.close()
            raise
        return manager

    def __enter__(self) -> Manager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Waits for background removals, then releases the metadata store; the manager is
        unusable afterwards."""
        if not self._core.close():
            return
        self._store.close()
        self._client.close()

    @property
    def address(self) -> str:
        """The containerd socket the manager talks to."""
        return self._client.address

    @property
    def containerd_version(self) -> str:
        """The version the daemon reported when the manager opened (e.g. `1.7.24`)."""
        return self._containerd_version

    @property
    def namespace(self) -> str:
        """The containerd namespace the manager works in."""
        return self._client.namespace

    @property
    def state_dir(self) -> pathlib.Path:
        """The directory that holds the metadata store and the manager id."""
        return self._store.state_dir

    @property
    def mounts_dir(self) -> pathlib.Path:
        """Where `Ref.mount` mounts (see `pyctrd_cache.mountpoints`)."""
        return self._core.mounts_dir

    @property
    def manager_id(self) -> str:
        """The id in the ownership label of this manager's leases."""
        return self._store.manager_id

    @property
    def content(self) -> ContentService:
        """The content store of the namespace, for the caller's own content work."""
        return self._client.content

    def new_id(self) -> str:
        """A fresh random record id, in the form `new` and `get_by_blob` use."""
        return new_id()

    def _wait_background(self) -> None:
        """Waits for the removals already scheduled (finalized mutables); `prune` starts
        with it, and so does each cycle of the core benchmark."""
        self._core.wait_background()

    # Reconciliation.

    def _reconcile(self, *, repair: bool = False) -> None:
        """Brings the store in line with containerd after a restart or a crash.

        A record's row is written before its lease and dropped after it, so a record lease
        of this manager with no row (a row marked deleted counts) means the store lost
        records: `StoreDamagedError` before anything changes, or with `repair` the lease
        is deleted. Then finishes removals marked in the store, completes finalizes that
        committed the snapshot but not the row, drops rows whose containerd objects are gone
        (their lease first), loads the rest, deletes leases of this manager that no row
        accounts for, and lets containerd collect what those leases held.

        `_reconcile.plan` decides all of that from the rows, leases and snapshots; this
        applies the plan in its order.
        """
        owned = self._client.leases.list(f'labels."{OWNER_LABEL}"=={self.manager_id}')
        self._core.seen_at_open = frozenset(lease.id for lease in owned)
        todo = _reconcile.plan(
            self._store.all(),
            {lease.id: lease.labels.get(KIND_LABEL) == "record" for lease in owned},
            {s.name: s.kind for s in self._client.snapshots(self.snapshotter).list()},
        )
        if todo.lost and not repair:
            lost = list(todo.lost)
            shown = ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "")
            raise StoreDamagedError(
                f"the metadata store {self._store.path} lost {len(lost)} record(s) whose data "
                f"containerd still holds ({shown}); restore the database to keep them, or "
                "open with repair=True (pyctrd-cache --repair) to give them up",
                path=str(self._store.path),
                lost=lost,
            )
        for changed in todo.finish_finalizes:
            log.info("reconcile: finishing the interrupted finalize of record %s", changed[0].id)
            self._store.update(*changed)
        for lease_id in todo.unfinalized_leases:
            # The next finalize makes the lease again.
            self._core.drop_lease(lease_id)
        for drop in todo.drops:
            record_id = drop.record_id
            if drop.interrupted:
                log.info("reconcile: finishing the interrupted removal of record %s", record_id)
            else:
                log.warning(
                    "reconcile: dropping record %s, whose containerd objects are gone", record_id
                )
            if drop.lease:
                self._core.drop_lease(record_id)
            self._store.delete(record_id)
        with self._core.mu:
            for record_id in todo.keep:
                self._get_record(record_id)
        for lease_id in todo.stray_leases:
            log.info("reconcile: deleting lease %s, which no record holds", lease_id)
            self._core.drop_lease(lease_id)
        if todo.collect:
            # What the deleted leases held is gone before `open` returns.
            self._collect_garbage()

    def _alone(self) -> bool:
        """Whether no other manager has the state directory open (the caller reaped the
        dead sessions)."""
        return not any(
            self._store.session_alive(name)
            for name in self._store.session_names()
            if name != self._core.session
        )

    def _load_live_records(self) -> None:
        with self._core.mu:
            self._load_all()

    def _reap_dead_sessions(self) -> None:
        """Gives up what processes that died left (their holds ended with them): the
        leases of their own work (temporary, view, caller), then their session files."""
        dead = self._store.dead_sessions()
        if not dead:
            return
        owned = self._client.leases.list(f'labels."{OWNER_LABEL}"=={self.manager_id}')
        for lease in owned:
            if lease.labels.get(SESSION_LABEL) in dead and lease.labels.get(KIND_LABEL) != "record":
                log.info("deleting lease %s of a process that died", lease.id)
                self._core.drop_lease(lease.id)
        log.info("reaping %d session(s) of processes that died", len(dead))
        self._store.reap(dead)

    def _sync(self) -> None:
        """Brings the records in memory up to date with what other processes wrote: a
        record removed there is forgotten here, a changed row is taken. One pragma when no
        other process wrote. The manager lock is held."""
        records = self._core.records
        changed = self._store.foreign_changes(list(records))
        if not changed:
            return
        for record_id in changed:
            rec = records.get(record_id)
            if rec is None:
                continue
            with rec.mu:
                if rec.state is not RecordState.LIVE:
                    continue
                # Read under the record lock: a write of this process's under way is seen.
                stored = self._store.get(record_id)
                if stored is None or stored.deleted:
                    rec.forget()
                else:
                    rec.refresh(stored)

    def _load_all(self) -> None:
        """Loads the live records other processes made since, and takes the last uses they
        counted (which the change log leaves out). The manager lock is held."""
        for record_id in self._store.live_ids():
            if record_id not in self._core.records and record_id not in self._core.creating:
                with contextlib.suppress(NotFoundError):
                    self._get_record(record_id)
        times = self._store.usage_times()
        for rec in list(self._core.records.values()):
            used = times.get(rec.id)
            with rec.mu:
                if used is not None and used != (rec.md.last_used_at, rec.md.usage_count):
                    rec.md.last_used_at, rec.md.usage_count = used
                    self._store.track(rec.md)

    def _enter(self) -> None:
        """The start of every operation on the records: the manager is open and its records
        up to date. The manager lock is held."""
        self._core.check_open()
        self._sync()

    # Records. The manager lock is held for all of these.

    def _get_record(self, record_id: str) -> _Record:
        rec = self._core.records.get(record_id)
        if rec is not None:
            with rec.mu:
                dead = rec.is_dead()
            if dead:
                raise NotFoundError(f"record {record_id} was removed")
            return rec
        md = self._store.get(record_id)
        if md is None or md.deleted:
            raise NotFoundError(f"no record {record_id}")
        self._store.track(md)
        if md.equal_mutable:
            mutable = self._get_record(md.equal_mutable)
            dhs = mutable.parent.desc_handlers if mutable.parent else _NO_HANDLERS
            parent = mutable.parent_ref(False, dhs)
            rec = _Record(self._core, md, mutable=False, parent=parent, mu=mutable.mu)
            with mutable.mu:
                rec.equal_mutable = MutableRef(mutable, False, dhs)
                mutable.equal_immutable = ImmutableRef(rec, False, dhs)
            self._core.records[record_id] = rec
            return rec
        parent = (
            self._get(md.parent, trigger_last_used=False, dhs=_NO_HANDLERS) if md.parent else None
        )
        rec = _Record(self._core, md, mutable=not md.committed, parent=parent)
        self._core.records[record_id] = rec
        return rec

    def _get(self, record_id: str, *, trigger_last_used: bool, dhs: DescHandlers) -> ImmutableRef:
        rec = self._get_record(record_id)
        if rec.mutable and rec.equal_immutable is None:
            # Another process's lazy commit of it is its equal immutable here too.
            for twin_id in self._store.twins_of(record_id):
                with contextlib.suppress(NotFoundError):
                    self._get_record(twin_id)
        with rec.mu:
            if rec.mutable:
                if rec.refs:
                    raise LockedError(f"record {record_id} is locked")
                if rec.equal_immutable is not None:
                    return rec.equal_immutable._rec.ref(trigger_last_used, dhs)
                self._store.check_unheld([record_id])
                return rec.commit(rec.mref(trigger_last_used, dhs))
            return rec.ref(trigger_last_used, dhs)

    def _hold(self, ref: ImmutableRef) -> None:
        """Makes `ref` the caller's handle (held across processes); on failure it is
        released. When another process wrote meanwhile, the records are brought up to date
        first, and a record removed there is `NotFoundError`. The manager lock is held."""
        rec = ref._rec
        try:
            with rec.mu:
                wrote = rec.take_hold()
                ref._held = True
            if wrote:
                self._sync()
                with rec.mu:
                    if rec.is_dead():
                        raise NotFoundError(f"record {rec.id} was removed")
        except BaseException:
            ref.trigger_last_used = False
            ref._release_locked()
            raise

    def _check_providers(self, ref: ImmutableRef) -> None:
        """`NeedsRemoteProvidersError` unless every lazy blob of the chain has a handler.

        The manager lock is held; on error the ref is released.
        """
        missing = blobs.missing_providers(blobs.chain_of(ref), ref.desc_handlers)
        if missing:
            ref.trigger_last_used = False  # a failed get is not a use
            ref._release_locked()
            raise NeedsRemoteProvidersError(missing)

    # Public look-up and life cycle.

    def new(
        self,
        parent: ImmutableRef | None = None,
        *,
        cache_policy: CachePolicy = CachePolicy.DEFAULT,
        description: str | None = None,
        record_type: RecordType | None = None,
        created_at: datetime | None = None,
        desc_handlers: DescHandlers | None = None,
        session: Sequence[str] = (),
    ) -> MutableRef:
        """A new writable snapshot on top of `parent`, whose lazy chain is extracted first.

        `session` is the caller's session ids, handed to a remote snapshotter with the
        chain's labels in the stargz mode (see `pyctrd_cache.remote_snapshots`)."""
        _validate.description(description or "")
        self._core.check_open()
        record_id = new_id()
        parent_ref: ImmutableRef | None = None
        dhs: DescHandlers = _NO_HANDLERS
        if parent is not None:
            if parent._rec.core is not self._core:
                raise InvalidError(f"ref {parent.id} belongs to another manager")
            dhs = {**parent.desc_handlers, **(desc_handlers or {})}
            with self._core.mu:
                self._enter()
                parent_ref = self._get(parent.id, trigger_last_used=False, dhs=dhs)
                self._check_providers(parent_ref)
        try:
            parent_snapshot = ""
            if parent_ref is not None:
                parent_ref.finalize()
                parent_ref.extract(session=session)
                parent_snapshot = parent_ref._rec.md.snapshot_id
            md = RecordMeta(
                record_id,
                parent=parent_ref.id if parent_ref else "",
                snapshot_id=record_id,
                cache_policy=CachePolicy(cache_policy),
                description=description or "",
                record_type=RecordType(record_type or RecordType.REGULAR),
                created_at=int(created_at.timestamp() * 1e9) if created_at else now_ns(),
            )
            # The row comes first: `open` drops a row whose lease or snapshot never came.
            with self._core.mu:
                self._core.creating.add(record_id)
            # Held before its row exists: another process's prune never claims it.
            self._store.hold_new(record_id)
            try:
                self._store.insert(md)
            except BaseException:
                self._store.unhold(record_id)
                with self._core.mu:
                    self._core.creating.discard(record_id)
                raise
            try:
                leased = self._core.create_lease(record_id, "record")
                crash_point("new.after_lease")
                parent_rec = parent_ref._rec if parent_ref is not None else None
                with remote_snapshots.remote_labels(parent_rec, dhs, session):
                    leased.snapshots(self.snapshotter).prepare(record_id, parent_snapshot)
                crash_point("new.after_prepare")
                with self._core.mu:
                    self._core.check_open()
                    self._core.creating.discard(record_id)
                    rec = _Record(self._core, md, mutable=True, parent=parent_ref)
                    self._core.records[record_id] = rec
                    with rec.mu:
                        rec.take_hold(new=True)
                        ref = rec.mref(True, dhs)
                        ref._held = True
                        return ref
            except BaseException:
                with self._core.mu:
                    self._core.creating.discard(record_id)
                self._drop_unborn(record_id)
                self._store.unhold(record_id)
                raise
        except BaseException:
            if parent_ref is not None:
                parent_ref.release()
            raise

    def get(
        self,
        record_id: str,
        *,
        update_last_used: bool = True,
        desc_handlers: DescHandlers | None = None,
    ) -> ImmutableRef:
        """An immutable ref on the record; a mutable record with no open handle is committed
        (lazily) first. `NeedsRemoteProvidersError` when a lazy blob of the chain has no
        handler in `desc_handlers`."""
        _validate.record_id(record_id)
        with self._core.mu:
            # No sync first: the hold brings the records up to date when another process
            # wrote (one pragma when none did), and a record held already cannot go.
            self._core.check_open()
            ref = self._get(
                record_id, trigger_last_used=update_last_used, dhs=desc_handlers or _NO_HANDLERS
            )
            self._check_providers(ref)
            self._hold(ref)
            return ref

    def get_by_blob(
        self,
        desc: Descriptor,
        parent: ImmutableRef | None = None,
        *,
        desc_handlers: DescHandlers | None = None,
        image_ref: str | None = None,
        description: str | None = None,
        cache_policy: CachePolicy = CachePolicy.DEFAULT,
    ) -> ImmutableRef:
        """A record for the layer blob `desc` on `parent`.

        Reuses a record with the same blob chain; else shares the snapshot of a record with
        the same chain; else makes a lazy record whose snapshot (named by the chain id) is
        made at extraction. The blob needs no handler when it is in the content store.

        The annotations BuildKit keeps (eStargz's and the diff id) stay with the blob: a
        local blob of a new record is labelled with them at once, and a handler without
        them takes them from `desc`, so that they become labels when the blob is pulled.
        """
        _validate.descriptor(desc)
        _validate.description(description or "")
        self._core.check_open()
        diff_id = blobs.diff_id_of(desc)
        compression = blobs.compression_of(desc.media_type, desc.annotations)
        saved = blobs.filter_annotations_for_save(desc.annotations)
        dhs: dict[str, DescHandler] = {
            **(parent.desc_handlers if parent else {}),
            **(desc_handlers or {}),
        }
        try:
            self._client.content.info(desc.digest)
            local = True
        except NotFoundError:
            if desc.digest not in dhs:
                raise NeedsRemoteProvidersError([desc.digest]) from None
            local = False
        if desc.digest in dhs:
            dh = dhs[desc.digest]
            dhs[desc.digest] = replace(dh, annotations={**saved, **dh.annotations})
        chain = diff_id
        blob_chain = chain_id(desc.digest, diff_id)
        parent_ref: ImmutableRef | None = None
        with contextlib.ExitStack() as on_error:
            if parent is not None:
                if parent._rec.core is not self._core:
                    raise InvalidError(f"ref {parent.id} belongs to another manager")
                with self._core.mu:
                    self._enter()
                    parent_ref = self._get(parent.id, trigger_last_used=False, dhs=dhs)
                    self._check_providers(parent_ref)
                # Released on every way out until the new record takes it over (the path that
                # finds a record releases it itself).
                on_error.callback(_release_if_held, parent_ref)
                pmd = parent_ref._rec.md
                if not pmd.chain_id or not pmd.blob_chain_id:
                    raise InvalidError(
                        f"cannot get a record by blob on {parent_ref.id}, which has no chain ids"
                    )
                chain = chain_id(pmd.chain_id, chain)
                blob_chain = chain_id(pmd.blob_chain_id, blob_chain)
                parent_ref.finalize()
            # One process at a time looks for the blob chain and makes its record, so that
            # two processes getting one blob at once share one record.
            with self._core.mu, self._store.exclusive(f"blob-chain-{blob_chain}"):
                self._enter()
                found = self._find_by_blob_chain(blob_chain, dhs)
                if found is not None:
                    if parent_ref is not None:
                        parent_ref._release_locked()
                    self._add_image_ref(found._rec, image_ref)
                    return found
                ref = self._new_blob_record(
                    desc,
                    parent_ref,
                    dhs,
                    diff_id,
                    chain,
                    blob_chain,
                    image_ref=image_ref,
                    description=description,
                    cache_policy=cache_policy,
                )
            # The new record holds the parent handle now.
            on_error.pop_all()
        if local:
            # The record's lease holds the blob now, so a blob still there stays; one another
            # process's prune let containerd collect since the look above leaves the record
            # lazy (moby/buildkit#2346).
            try:
                blobs.add_compression_blob(ref._rec, replace(desc, annotations=saved), compression)
            except NotFoundError:
                if desc.digest not in dhs:
                    ref.release()
                    raise NeedsRemoteProvidersError([desc.digest]) from None
            except BaseException:
                ref.release()
                raise
        return ref

    def _find_by_blob_chain(self, blob_chain: str, dhs: DescHandlers) -> ImmutableRef | None:
        """The caller's handle (held) on a live record with the blob chain `blob_chain`; a
        record another process claims meanwhile is passed over. The manager lock is held."""
        for record_id in self._store.search_blob_chain(blob_chain):
            try:
                found = self._get(record_id, trigger_last_used=True, dhs=dhs)
                self._hold(found)
            except NotFoundError:
                continue
            return found
        return None

    def _add_image_ref(self, rec: _Record, image_ref: str | None) -> None:
        if image_ref:
            with rec.mu:
                if image_ref not in rec.md.image_refs:
                    rec.md.image_refs.append(image_ref)
                    rec.save()

    def _new_blob_record(
        self,
        desc: Descriptor,
        parent_ref: ImmutableRef | None,
        dhs: DescHandlers,
        diff_id: str,
        chain: str,
        blob_chain: str,
        *,
        image_ref: str | None,
        description: str | None,
        cache_policy: CachePolicy,
    ) -> ImmutableRef:
        """A new record for a blob; the manager lock is held."""
        snapshot_id, blob_only, link = self._snapshot_to_share(chain, dhs)
        with contextlib.ExitStack() as linked:
            if link is not None:
                # Released once the new record's lease holds the snapshot.
                linked.callback(link._release_locked)
            record_id = new_id()
            # The row comes first, marked deleted until the lease holds the snapshot and the blob:
            # `open` finishes a creation that stopped in between as a removal.
            md = RecordMeta(
                record_id,
                committed=True,
                parent=parent_ref.id if parent_ref else "",
                snapshot_id=snapshot_id,
                cache_policy=CachePolicy(cache_policy),
                description=description or "",
                created_at=now_ns(),
                diff_id=diff_id,
                chain_id=chain,
                blob_chain_id=blob_chain,
                blob=desc.digest,
                blob_only=blob_only,
                media_type=desc.media_type,
                blob_size=desc.size,
                image_refs=[image_ref] if image_ref else [],
                deleted=True,
            )
            self._store.insert(md)
            try:
                self._core.create_lease(record_id, "record")
                self._client.leases.add_resource(
                    record_id, LeaseResource.snapshot(self.snapshotter, snapshot_id)
                )
                self._client.leases.add_resource(record_id, LeaseResource.content(desc.digest))
                # Held before its row is live: another process's prune never claims it.
                self._store.hold_new(record_id)
                md.deleted = False
                self._store.update(md)
            except BaseException:
                self._drop_unborn(record_id)
                self._store.unhold(record_id)
                raise
        rec = _Record(self._core, md, mutable=False, parent=parent_ref)
        self._core.records[record_id] = rec
        with rec.mu:
            ref = rec.ref(True, dhs)
        self._hold(ref)
        return ref

    def _snapshot_to_share(
        self, chain: str, dhs: DescHandlers
    ) -> tuple[str, bool, ImmutableRef | None]:
        """The snapshot a new record of chain id `chain` shares, whether it is still to be
        made (blob only), and the caller's handle (held) on the record it is shared with
        until the new record's lease holds it: a live record's of the same chain, else its
        own, named by the chain id. The manager lock is held."""
        records = self._core.records
        linkable = [records[i] for i in self._store.search_chain(chain) if i in records]
        # A record that has the snapshot extracted is the better one to share it with.
        for candidate in sorted(linkable, key=lambda r: r.md.blob_only):
            try:
                # Sharing its snapshot is a use of the linked record, as in BuildKit.
                link = self._get(candidate.id, trigger_last_used=True, dhs=dhs)
                # Held, so that another process's prune does not remove it meanwhile.
                self._hold(link)
            except (NotFoundError, NeedsRemoteProvidersError):
                continue
            with link._rec.mu:
                return link._rec.md.snapshot_id, link._rec.md.blob_only, link
        return chain, True, None

    def _drop_unborn(self, record_id: str) -> None:
        """Undoes a creation that failed: the record's lease if it was made, then its row.
        A row whose lease cannot be deleted stays for `open` to drop, lease first."""
        try:
            self._client.leases.delete(record_id)
        except NotFoundError:
            pass
        except CacheError:
            return
        with contextlib.suppress(CacheError):
            self._store.delete(record_id)

    def get_mutable(self, record_id: str) -> MutableRef:
        """The mutable record again; `LockedError` while any ref of it or of its equal
        immutable is open. An unfinalized equal immutable record is dropped."""
        _validate.record_id(record_id)
        with self._core.mu:
            self._enter()
            rec = self._get_record(record_id)
            twins = self._store.twins_of(record_id)
            for twin_id in twins:
                with contextlib.suppress(NotFoundError):
                    self._get_record(twin_id)
            with rec.mu:
                if not rec.mutable:
                    raise InvalidError(f"record {record_id} is not mutable")
                if rec.refs:
                    raise LockedError(f"record {record_id} is locked")
                twin = rec.equal_immutable
                if twin is not None and twin._rec.refs:
                    raise LockedError(f"record {record_id} is locked")
                # Exclusive across processes: no other process holds it or its twin.
                rec.take_hold(exclusive=twins)
                ref = rec.mref(True, _NO_HANDLERS)
                ref._held = True
                if twin is not None:
                    rec.equal_immutable = None
                    if not twin._rec.remove():
                        rec.equal_immutable = twin
                        rec.refs.discard(ref)
                        rec.drop_hold(ref)
                        raise LockedError(f"record {record_id} is locked by another process")
                return ref

    @contextlib.contextmanager
    def lease(self, *, expire: timedelta | None = None) -> Iterator[str]:
        """A containerd lease for the caller's own content work, deleted on exit.

        It carries this manager's ownership label, so a crash leaves nothing behind: the
        next `open` deletes it.
        """
        self._core.check_open()
        lease_id = f"caller-{new_id()}"
        self._core.create_lease(lease_id, "caller", expire=expire)
        try:
            yield lease_id
        finally:
            self._core.drop_lease(lease_id)

    # Disk usage.

    def disk_usage(self, *, filters: Sequence[str] = ()) -> list[UsageInfo]:
        """One entry per record, oldest first; sizes are computed concurrently and cached.

        A record is in use while a handle on it, or on a record built on it, is open. A
        snapshot that several records share counts once, in the oldest of them that holds
        it extracted, or else in the oldest of them (moby/buildkit#6931).
        """
        self._core.check_open()
        match = compile_filters(filters)
        entries = self._usage_entries()
        sizes = self._sizes(entries)
        shared = self._shared(entries)
        infos = [
            self._usage_info(e.info, e.refs, size=sizes[record_id], shared=record_id in shared)
            for record_id, e in entries.items()
        ]
        infos = [i for i in infos if match.match(i)]
        infos.sort(key=lambda i: (i.created_at.timestamp() if i.created_at else 0.0, i.id))
        return infos

    def records(self) -> list[RecordStatus]:
        """The records a usage report lists, oldest first, without measuring sizes or
        taking handles."""
        self._core.check_open()
        entries = sorted(self._usage_entries().values(), key=_age)
        return [RecordStatus(e.info, e.refs > 0) for e in entries]

    def info(self, record_id: str) -> RefInfo:
        """A record's metadata without taking a handle: a mutable record is not committed
        and a lazy one needs no provider. `NotFoundError` for an unknown or removed one."""
        _validate.record_id(record_id)
        with self._core.mu:
            self._enter()
            rec = self._get_record(record_id)
            with rec.mu:
                return rec.info()

    def metadata_size(self) -> int:
        """Bytes the metadata store takes on disk (moby/buildkit#4218)."""
        return self._store.size_on_disk()

    def _sizes(self, entries: Mapping[str, _UsageEntry]) -> dict[str, int]:
        # A mutable record in use changes at any time: it is not measured (BuildKit).
        unknown = [
            e.rec
            for e in entries.values()
            if e.info.size is None and not (e.info.mutable and e.refs > 0)
        ]
        sizes = {e.info.id: e.info.size or 0 for e in entries.values()}
        # The measured sizes are written to their rows in one transaction, not one each.
        unsaved: list[_Record] = []
        with self._core.working(), unwrapped():
            try:
                computed = run_all(
                    [lambda r=r: r.measure(unsaved) for r in unknown],  # type: ignore[misc]
                    limit=_MEASURERS,
                )
            finally:
                save_rows(unsaved)
        sizes.update(zip((r.id for r in unknown), computed, strict=True))
        groups: dict[str, list[_UsageEntry]] = {}
        for e in entries.values():
            if e.info.mutable and e.refs > 0:
                sizes[e.info.id] = 0  # changing while in use
            else:
                groups.setdefault(e.info.snapshot_id, []).append(e)
        existing: set[str] | None = None
        sn = self._client.snapshots(self.snapshotter)
        for snapshot_id, group in groups.items():
            counted = [e for e in group if not e.info.blob_only]
            if len(counted) == 1:
                continue
            if not counted:
                if existing is None:
                    existing = {s.name for s in sn.list()}
                if snapshot_id not in existing:
                    continue
            try:
                usage = sn.usage(snapshot_id).size
            except NotFoundError:
                continue
            group.sort(
                key=lambda e: (e.info.created_at or datetime.min.replace(tzinfo=UTC), e.info.id)
            )
            if counted:
                counted.sort(
                    key=lambda e: (e.info.created_at or datetime.min.replace(tzinfo=UTC), e.info.id)
                )
                for e in counted[1:]:
                    sizes[e.info.id] = max(0, sizes[e.info.id] - usage)
            else:
                sizes[group[0].info.id] += usage
        return sizes

    def _shared(self, entries: Mapping[str, _UsageEntry]) -> set[str]:
        """The records an image uses, and all their parents."""
        checker = self._shared_checker()
        shared: set[str] = set()
        for record_id, e in entries.items():
            if record_id in shared or not checker.exists(record_id, e.chain):
                continue
            walk: str | None = record_id
            while walk is not None and walk in entries and walk not in shared:
                shared.add(walk)
                walk = entries[walk].info.parent_id
        return shared

    def _usage_entries(self) -> dict[str, _UsageEntry]:
        """The records a usage report shows, with in-use counted through children."""
        entries: dict[str, _UsageEntry] = {}
        # Handles that records being removed still hold on their parents.
        leaving: list[str] = []
        with self._core.mu:
            self._enter()
            self._load_all()
            foreign = set(self._store.held_elsewhere(list(self._core.records)))
            for rec in list(self._core.records.values()):
                with rec.mu:
                    if rec.is_dead():
                        # Still in the manager, so still holding its parent handle.
                        if rec.parent is not None:
                            leaving.append(rec.parent.id)
                        continue
                    if _shares_data_with_listed_twin(rec):
                        continue
                    entries[rec.id] = _UsageEntry(
                        rec,
                        rec.info(),
                        # Another process's handles count as one.
                        refs=len(rec.refs) + _held_by(rec, foreign),
                        double_ref=rec.equal_immutable is not None,
                        chain=rec.parent_chain(),
                    )
        uses = _usage.in_use(
            {i: _usage.Use(e.refs, e.double_ref, e.info.parent_id) for i, e in entries.items()},
            leaving,
        )
        for record_id, refs in uses.items():
            entries[record_id].refs = refs
        return entries

    @staticmethod
    def _usage_info(info: RefInfo, refs: int, *, size: int, shared: bool) -> UsageInfo:
        return UsageInfo(
            id=info.id,
            mutable=info.mutable,
            in_use=refs > 0,
            size=size,
            parents=(info.parent_id,) if info.parent_id else (),
            created_at=info.created_at,
            last_used_at=info.last_used_at,
            usage_count=info.usage_count,
            description=info.description,
            record_type=info.record_type,
            shared=shared,
        )

    # Prune.

    def prune(
        self,
        *policies: PrunePolicy,
        on_removed: Callable[[UsageInfo], None] | None = None,
        dry_run: bool = False,
    ) -> list[UsageInfo]:
        """Removes unused records by each policy in turn (no policy: the default one) and
        lets containerd collect what they held, and whatever else no record holds, before
        returning; prunes never overlap.

        Each entry's `size` is what removing that record freed: its blobs, and its snapshot
        when no other record holds it. With `dry_run` nothing is removed or collected, and
        the result is what the same prune would remove now.
        """
        self._core.check_open()
        compiled = [(policy, compile_filters(policy.filters, prune=True)) for policy in policies]
        removed: list[UsageInfo] = []

        def report(info: UsageInfo) -> None:
            removed.append(info)
            if on_removed is not None:
                on_removed(info)

        with self._prune_mu:
            self._wait_background()
            self._reap_dead_sessions()
            with self._core.mu:
                self._enter()
                self._load_all()
            gone = _Gone()
            for policy, match in compiled or [(PrunePolicy(), compile_filters(()))]:
                self._prune_once(policy, match, report, gone, dry_run=dry_run)
            if not dry_run:
                # BuildKit collects after every prune: records released since the last
                # collection left data that no lease holds.
                self._collect_garbage()
        return removed

    def _collect_garbage(self) -> None:
        """Deletes the leases that arrived too late for `open`, then runs containerd's
        garbage collector and waits for it.

        A call of a killed process can reach containerd after the next `open` listed the
        leases, and a lease it creates escapes that reconcile: a lease of this state made by
        a dead session is such a latecomer unless it is a record's lease that `open` saw or
        whose row exists. A live session's leases are its own business.
        """
        owned = self._client.leases.list(f'labels."{OWNER_LABEL}"=={self.manager_id}')
        alive: dict[str, bool] = {}
        for lease in owned:
            session = lease.labels.get(SESSION_LABEL, "")
            if session not in alive:
                alive[session] = self._store.session_alive(session)
            if alive[session]:
                continue
            if lease.labels.get(KIND_LABEL) == "record" and (
                lease.id in self._core.seen_at_open or self._store.get(lease.id) is not None
            ):
                continue
            log.info("deleting lease %s, made by an earlier opening after it ended", lease.id)
            self._core.drop_lease(lease.id)
        log.debug("asking containerd to collect garbage")
        gc_lease = f"gc-{new_id()}"
        self._client.leases.create(gc_lease, labels=self._core.lease_labels("gc"))
        self._client.leases.delete(gc_lease, sync=True)

    def _prune_once(
        self,
        policy: PrunePolicy,
        match: UsageFilter,
        report: Callable[[UsageInfo], None],
        gone: _Gone,
        *,
        dry_run: bool,
    ) -> None:
        """One policy: removes candidates one at a time (least valuable first under a size
        bound) and adds a parent to the candidates once its last child went.

        Under a size bound the total is the deduplicated one `disk_usage` reports, and each
        removal takes off what it freed, so both sides of the comparison count a shared
        snapshot once.
        """
        checker = self._shared_checker() if not policy.all or policy.filters else None
        keep_duration = max(
            (d for d in (policy.keep_duration, match.until) if d is not None), default=None
        )
        cut_off = now_ns() - int(keep_duration.total_seconds() * 1e9) if keep_duration else None
        keep = policy.keep_bytes
        total = 0
        free_space_policy = policy.reserved_space or policy.max_used_space or policy.min_free_space
        # A dry run's earlier policies removed nothing that `disk_usage` could see.
        unseen = gone.freed if dry_run else 0
        if keep or free_space_policy:
            usage = self.disk_usage()
            # Records the policy may remove count even when an image uses them.
            total = sum(u.size for u in usage if policy.all or not u.shared) - unseen
        if free_space_policy:
            keep = keep_bytes_for(
                total,
                self._free_bytes() + unseen,
                reserved_space=max(policy.reserved_space, policy.keep_bytes),
                max_used_space=policy.max_used_space,
                min_free_space=policy.min_free_space,
            )
        ranked = bool(keep)

        with self._core.mu:
            foreign = set(self._store.held_elsewhere(list(self._core.records)))

        def prunable(rec: _Record) -> bool:
            return self._prunable(rec, policy, match, cut_off, checker, gone, foreign)

        with self._core.mu:
            records = list(self._core.records.values())
        # The next record to remove is the last of the list.
        candidates = [rec for rec in records if prunable(rec)]
        queued = {rec.id for rec in candidates}
        if ranked:
            candidates = _rank_for_removal(candidates)[::-1]
        while candidates and not (keep and total <= keep):
            rec = candidates.pop()
            info = self._remove_unused(rec, gone, dry_run=dry_run)
            if info is None:
                continue
            total -= info.size
            report(info)
            parent = rec.parent._rec if rec.parent is not None else None
            if parent is not None and parent.id not in queued and prunable(parent):
                # Re-ranked at once: it may go before records used more recently.
                queued.add(parent.id)
                candidates.append(parent)
                if ranked:
                    candidates = _rank_for_removal(candidates)[::-1]

    def _prunable(
        self,
        rec: _Record,
        policy: PrunePolicy,
        match: UsageFilter,
        cut_off: int | None,
        checker: SharedChecker | None,
        gone: _Gone,
        foreign: set[str],
    ) -> bool:
        """Whether the policy allows removing `rec` now: unused (but for handles that
        records already removed held) here and in other processes (`foreign`, the records
        they hold), not kept by the policy, matching its filters.

        Judged under the record's lock only: a record gains a handle only under that lock,
        and `_remove_unused` checks again before it removes.
        """
        with rec.mu:
            if (
                _shares_data_with_listed_twin(rec)
                or rec.is_dead()
                or rec.id in gone.ids
                or gone.holds(rec)
                or _held_by(rec, foreign)
            ):
                return False
            if (
                cut_off is not None
                and rec.md.last_used_at is not None
                and rec.md.last_used_at > cut_off
            ):
                return False
            info = rec.info()
            shared = checker is not None and checker.exists(rec.id, rec.parent_chain())
        if not policy.all and (
            shared or info.record_type in (RecordType.INTERNAL, RecordType.FRONTEND)
        ):
            return False
        return match.match(self._usage_info(info, 0, size=info.size or 0, shared=shared))

    def _remove_unused(self, rec: _Record, gone: _Gone, *, dry_run: bool) -> UsageInfo | None:
        """Removes `rec` unless it gained a handle since it was chosen (with `dry_run`, only
        notes it in `gone`); what was removed, its size being the bytes that freed.

        The manager lock is taken for one record at a time, so other calls go on during a
        long prune (moby/buildkit#4401).
        """
        size = rec.measure()
        # A snapshot that other records may hold is measured on its own, outside the locks.
        snapshot_usage = self._snapshot_usage(rec) if rec.md.chain_id else None
        with self._core.mu, rec.mu:
            if _shares_data_with_listed_twin(rec) or rec.is_dead() or gone.holds(rec):
                return None
            twin = rec.equal_immutable._rec if rec.equal_immutable is not None else None
            if snapshot_usage is not None:
                others = self._snapshot_holders(rec, gone) - {rec.id}
                if others and not rec.md.blob_only:
                    size -= snapshot_usage  # the others keep the snapshot
                elif not others and rec.md.blob_only:
                    size += snapshot_usage  # a linked snapshot goes with its last holder
            info = self._usage_info(rec.info(), 0, size=max(0, size), shared=False)
            if not dry_run and not self._store.claim_removal(
                [rec.id] + ([twin.id] if twin is not None else [])
            ):
                return None  # another process holds it or built on it meanwhile
            gone.add(rec, twin, info.size)
            if dry_run:
                return info
            if twin is not None:
                twin.detach()
            rec.detach()
        # The leases go outside the locks: containerd may be collecting garbage.
        if twin is not None:
            twin.purge()
        rec.purge()
        return info

    def _snapshot_usage(self, rec: _Record) -> int:
        """The usage of the record's snapshot; 0 when it does not exist (yet)."""
        try:
            return self._client.snapshots(self.snapshotter).usage(rec.md.snapshot_id).size
        except NotFoundError:
            return 0

    def _snapshot_holders(self, rec: _Record, gone: _Gone) -> set[str]:
        """The live records that hold `rec`'s snapshot. Records share a snapshot only
        with records of the same chain id. The caller holds the manager lock and `rec.mu`;
        the others are read without their locks (one may share `rec`'s), so a finalize
        running meanwhile may make the answer stale."""
        holders = set()
        for record_id in self._store.search_chain(rec.md.chain_id):
            other = self._core.records.get(record_id)
            if (
                other is not None
                and other.id not in gone.ids
                and not other.is_dead()
                and other.md.snapshot_id == rec.md.snapshot_id
            ):
                holders.add(record_id)
        return holders

    def _free_bytes(self) -> int:
        """Free bytes on the file system that holds the snapshotter's data."""
        plugins = {p.id: p for p in self._client.introspection.snapshotters()}
        root = (
            plugins[self.snapshotter].exports.get("root", "") if self.snapshotter in plugins else ""
        )
        try:
            st = os.statvfs(root)
        except OSError as err:
            raise CacheError(
                f"cannot measure the free space of containerd's root {root!r}: {err}"
            ) from None
        return st.f_bavail * st.f_frsize


def _release_if_held(ref: ImmutableRef) -> None:
    """Releases `ref` unless it was released already (a handle given up on an error path)."""
    if not ref._released:
        ref.release()


def _held_by(rec: _Record, foreign: set[str]) -> int:
    """1 when another process holds `rec` or its equal twin, else 0."""
    twins = {rec.id}
    for twin in (rec.equal_mutable, rec.equal_immutable):
        if twin is not None:
            twins.add(twin.id)
    return 1 if twins & foreign else 0


def _age(entry: _UsageEntry) -> tuple[datetime, str]:
    return (entry.info.created_at or datetime.min.replace(tzinfo=UTC), entry.info.id)


def _shares_data_with_listed_twin(rec: _Record) -> bool:
    """Of an equal mutable/immutable pair only one is listed: the immutable while it has
    handles, the mutable otherwise."""
    return (rec.equal_immutable is not None and bool(rec.equal_immutable._rec.refs)) or (
        rec.equal_mutable is not None and not rec.refs
    )


def _rank_for_removal(recs: list[_Record]) -> list[_Record]:
    """`_usage.removal_order` of the records, least valuable first."""
    by_id = {r.id: r for r in recs}
    order = _usage.removal_order([(r.id, r.md.last_used_at, r.md.usage_count) for r in recs])
    return [by_id[record_id] for record_id in order]
