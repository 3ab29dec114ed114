"""The invariants every fault of the reliability suite is followed by.

1. No lease of this manager without a record.
2. No record whose snapshot or blob is gone, unless it is lazy.
3. Every kept record (retained, committed) still mounts, with the tree digest it had.
4. After `prune(PrunePolicy(all=True))` with no refs open, the namespace holds no snapshot,
   blob or lease: asked of containerd through the client and through `ctr`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from pyctrd_cache import Manager, NotFoundError, PrunePolicy
from pyctrd_cache.cache._core import OWNER_LABEL, SESSION_LABEL
from pyctrd_cache.client import Client, SnapshotKind
from tests.checks import owned_leases
from tests.fix_containerd import SNAPSHOTTER, Daemon, Managers
from tests.reliability.workload import ref_digest


@dataclass
class Findings:
    """What a check found; the tests assert it is empty and add the counts to the figures."""

    records_lost: int = 0
    leaks: int = 0
    problems: list[str] = field(default_factory=list)

    def lost(self, what: str) -> None:
        self.records_lost += 1
        self.problems.append(what)

    def leaked(self, what: str) -> None:
        self.leaks += 1
        self.problems.append(what)


def check_records(cm: Manager, client: Client, kept: Mapping[str, str]) -> Findings:
    """Invariants 1 to 3."""
    found = Findings()
    rows = {md.id: md for md in cm._store.all()}
    # A call of the killed child may create its lease after `open` listed the leases; such a
    # latecomer (made by another opening, unseen by this one) must be gone after the prune
    # of invariant 4, which `check_empty_after_prune` checks.
    late = {
        lease.id
        for lease in client.leases.list(f'labels."{OWNER_LABEL}"=={cm.manager_id}')
        if lease.labels.get(SESSION_LABEL) != cm._core.session
        and lease.id not in cm._core.seen_at_open
    }
    for lease in sorted(set(owned_leases(client, cm)) - rows.keys() - late):
        found.leaked(f"lease {lease} has no record")
    snapshots = {s.name: s.kind for s in client.snapshots(SNAPSHOTTER).list()}
    blobs = {info.digest for info in client.content.list()}
    for status in cm.records():
        info = status.info
        if status.in_use:
            found.problems.append(f"record {info.id} is in use with no ref open")
        md = rows[info.id]
        if md.equal_mutable:
            continue
        # A blob-only record is lazy: its blob comes from a provider when it is extracted.
        if not md.blob_only:
            want = SnapshotKind.ACTIVE if info.mutable else SnapshotKind.COMMITTED
            if snapshots.get(md.snapshot_id) is not want:
                found.lost(f"record {info.id} lost its snapshot {md.snapshot_id}")
            if md.blob and md.blob not in blobs:
                found.lost(f"record {info.id} lost its blob {md.blob}")
    for record_id, digest in sorted(kept.items()):
        try:
            ref = cm.get(record_id, update_last_used=False)
        except NotFoundError:
            found.lost(f"kept record {record_id} is gone")
            continue
        with ref:
            if ref.is_lazy():
                found.lost(f"kept record {record_id} became lazy")
            elif (now := ref_digest(ref)) != digest:
                found.lost(f"kept record {record_id} changed: {digest} -> {now}")
    return found


def ctr_listing(daemon: Daemon, namespace: str) -> dict[str, list[str]]:
    """Snapshots, blobs and leases of the namespace as `ctr` lists them."""
    assert daemon.ctr is not None, "ctr is needed for the reliability suite"
    base = [daemon.ctr, "-a", daemon.address, "-n", namespace]
    commands = {
        "snapshot": [*base, "snapshots", "--snapshotter", SNAPSHOTTER, "ls"],
        "blob": [*base, "content", "ls", "-q"],
        "lease": [*base, "leases", "ls", "-q"],
    }
    listing = {}
    for kind, command in commands.items():
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        lines = [line for line in out.splitlines() if line.strip()]
        if kind == "snapshot":
            lines = lines[1:]  # the header
        listing[kind] = lines
    return listing


def check_empty_after_prune(cm: Manager, client: Client, daemon: Daemon) -> Findings:
    """Invariant 4: prunes everything, then counts what containerd still holds."""
    found = Findings()
    cm.prune(PrunePolicy(all=True))
    for usage in cm.disk_usage():
        found.leaked(f"record {usage.id} survived prune(all)")
    for lease in owned_leases(client, cm):
        found.leaked(f"lease {lease} survived prune(all)")
    for info in client.snapshots(SNAPSHOTTER).list():
        found.leaked(f"snapshot {info.name} survived prune(all)")
    for blob in client.content.list():
        found.leaked(f"blob {blob.digest} survived prune(all)")
    for kind, lines in ctr_listing(daemon, client.namespace).items():
        for line in lines:
            found.problems.append(f"ctr lists a {kind}: {line}")
    return found


def check_all(cm: Manager, client: Client, daemon: Daemon, kept: Mapping[str, str]) -> Findings:
    found = check_records(cm, client, kept)
    after = check_empty_after_prune(cm, client, daemon)
    found.records_lost += after.records_lost
    found.leaks += after.leaks
    found.problems += after.problems
    return found


@dataclass
class Trials:
    """The findings of a series of faults, each followed by a reopen and the invariants."""

    survived: int = 0
    records_lost: int = 0
    leaks: int = 0
    problems: list[str] = field(default_factory=list)

    def check(
        self,
        trial: int,
        managers: Managers,
        client: Client,
        daemon: Daemon,
        kept: Mapping[str, str],
    ) -> None:
        """Reopens the manager after trial `trial` and checks every invariant."""
        cm = managers.open()
        found = check_all(cm, client, daemon, kept)
        cm.close()
        self.records_lost += found.records_lost
        self.leaks += found.leaks
        if found.problems:
            self.problems += [f"trial {trial}: {p}" for p in found.problems]
        else:
            self.survived += 1
