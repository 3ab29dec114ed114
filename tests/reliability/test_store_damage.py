"""Issue 6, metadata store damage: the database truncated, a row removed, the write-ahead log
deleted after a SIGKILL. `Manager.open` either finds every retained record or refuses with
`StoreDamagedError` naming the file; `repair=True` then gives the lost records up, and the
invariants hold: no lease of the manager without a row, every record left mounts with the
tree it was written with, and a full prune leaves nothing in the namespace.

Run as `python -m tests.reliability.test_store_damage ADDRESS NAMESPACE STATE_DIR`, this
module is the child of the write-ahead log test: it writes records, prints them and kills
itself with SIGKILL before closing the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest

from pyctrd_cache import CachePolicy, Manager, PrunePolicy, StoreDamagedError
from pyctrd_cache.client import Client
from pyctrd_cache.manager import OWNER_LABEL
from pyctrd_cache.metadata import DB_NAME, ID_NAME, MetadataStore
from tests.checks import run_killed_child
from tests.fix_containerd import SNAPSHOTTER, Daemon, Managers
from tests.layers import make_tar
from tests.reliability import tally

Trees = dict[str, dict[str, bytes]]
"""Record id -> the files its mounted tree holds."""


def tree_digest(files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def mounted_digest(root: pathlib.Path) -> str:
    return tree_digest(
        {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    )


def populate(cm: Manager, tag: str) -> Trees:
    """Two finalized retained records, one on the other, and a retained mutable one on top."""
    base_files = {f"{tag}/base.txt": b"base " + tag.encode(), "shared/a": os.urandom(3000)}
    child_files = {f"{tag}/child.txt": b"child", "shared/b": os.urandom(5000)}
    trees: Trees = {}
    work = cm.new(cache_policy=CachePolicy.RETAIN, description=f"{tag} base")
    work.apply(make_tar(base_files))
    with work.commit() as base:
        base.finalize()
        trees[base.id] = dict(base_files)
        work = cm.new(base, cache_policy=CachePolicy.RETAIN, description=f"{tag} child")
    work.apply(make_tar(child_files))
    with work.commit() as child:
        child.finalize()
        trees[child.id] = {**base_files, **child_files}
        top = cm.new(child, cache_policy=CachePolicy.RETAIN, description=f"{tag} top")
    top.apply(make_tar({f"{tag}/top.txt": b"top"}))
    trees[top.id] = {**trees[child.id], f"{tag}/top.txt": b"top"}
    top.release()
    return trees


def owned_leases(client: Client, cm: Manager) -> set[str]:
    return {x.id for x in client.leases.list(f'labels."{OWNER_LABEL}"=={cm.manager_id}')}


def check_records(cm: Manager, client: Client, trees: Trees) -> int:
    """The invariants after a fault; returns how many of `trees` were lost."""
    assert owned_leases(client, cm) <= {md.id for md in cm._store.all()}
    present = {s.info.id: s.info.mutable for s in cm.records()}
    for record_id in sorted(present.keys() & trees.keys()):
        ref = (
            cm.get_mutable(record_id)
            if present[record_id]
            else cm.get(record_id, update_last_used=False)
        )
        with ref, ref.mount(readonly=True) as root:
            assert mounted_digest(root) == tree_digest(trees[record_id]), record_id
    return len(trees.keys() - present.keys())


def ctr_rows(daemon: Daemon, namespace: str, *args: str) -> list[str]:
    """The rows (header dropped) of a `ctr` listing of the namespace."""
    assert daemon.ctr is not None, "ctr is needed for the store damage tests"
    out = subprocess.run(
        [daemon.ctr, "-a", daemon.address, "-n", namespace, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.splitlines()[1:]


def left_after_prune(cm: Manager, client: Client, daemon: Daemon) -> list[str]:
    """Prunes everything; the records, leases, snapshots and blobs left, by the manager's,
    containerd's and `ctr`'s listings."""
    cm.prune(PrunePolicy(all=True))
    ns = client.namespace
    return [
        *(f"record {u.id}" for u in cm.disk_usage()),
        *(f"lease {x.id}" for x in client.leases.list()),
        *(f"snapshot {x.name}" for x in client.snapshots(SNAPSHOTTER).list()),
        *(f"blob {x.digest}" for x in client.content.list()),
        *(
            f"ctr snapshot {r}"
            for r in ctr_rows(daemon, ns, "snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        ),
        *(f"ctr blob {r}" for r in ctr_rows(daemon, ns, "content", "ls")),
        *(f"ctr lease {r}" for r in ctr_rows(daemon, ns, "leases", "ls")),
    ]


@dataclass
class Outcome:
    """What reopening after a fault found: whether `open` refused, whether the
    `repair=True` open then succeeded, how many of the records were lost, and what a full
    prune left."""

    refused: bool
    repaired: bool
    lost: int
    left: list[str]

    def tally(self) -> None:
        """Adds the fault to the figures; called once the test's asserts passed."""
        tally.add(
            "store damage",
            faults=1,
            refused=int(self.refused),
            repaired=int(self.repaired),
            records_given_up_by_repair=self.lost if self.repaired else 0,
            records_lost_silently=0 if self.refused else self.lost,
            leaks=len(self.left),
        )


def reopen_after_fault(managers: Managers, client: Client, daemon: Daemon, trees: Trees) -> Outcome:
    """Opens after the fault, with `repair=True` when refused; checks the records left and
    that a reopen keeps them, then prunes everything."""
    damaged: StoreDamagedError | None = None
    repaired = False
    try:
        cm = managers.open()
    except StoreDamagedError as err:
        damaged = err
    if damaged is not None:
        assert str(managers.state_dir / DB_NAME) in str(damaged)
        assert "repair=True" in str(damaged)
        cm = Manager.open(
            daemon.address,
            namespace=managers.namespace,
            snapshotter=SNAPSHOTTER,
            state_dir=managers.state_dir,
            repair=True,
        )
        repaired = True
        managers.opened.append(cm)
    lost = check_records(cm, client, trees)
    # Whatever open kept, it keeps on the next open too.
    kept = sorted(s.info.id for s in cm.records())
    cm.close()
    cm = managers.open()
    assert sorted(s.info.id for s in cm.records()) == kept
    return Outcome(damaged is not None, repaired, lost, left_after_prune(cm, client, daemon))


def truncate_to_nothing(path: pathlib.Path) -> None:
    os.truncate(path, 0)


def truncate_to_half(path: pathlib.Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [truncate_to_nothing, truncate_to_half], ids=["zero", "half"])
def test_truncated_database_is_refused_then_repaired(
    daemon: Daemon,
    managers: Managers,
    client: Client,
    damage: Callable[[pathlib.Path], None],
) -> None:
    cm = managers.open()
    trees = populate(cm, "trunc")
    manager_id = cm.manager_id
    cm.close()
    damage(managers.state_dir / DB_NAME)

    outcome = reopen_after_fault(managers, client, daemon, trees)
    # Every record was in the lost part of the file: nothing is silently forgotten.
    assert outcome.repaired
    assert outcome.lost == len(trees)
    assert outcome.left == []
    assert managers.opened[-1].manager_id == manager_id
    if damage is truncate_to_half:
        assert list(managers.state_dir.glob(DB_NAME + ".damaged-*"))
    outcome.tally()


@pytest.mark.parametrize("which", ["leaf", "parent"])
def test_removed_row_is_refused_then_given_up(
    daemon: Daemon, managers: Managers, client: Client, which: str
) -> None:
    cm = managers.open()
    trees = populate(cm, "row")
    base_id, child_id, _ = trees
    removed = child_id if which == "leaf" else base_id
    cm.close()
    with sqlite3.connect(managers.state_dir / DB_NAME) as db:
        db.execute("DELETE FROM records WHERE id = ?", (removed,))
    db.close()

    with pytest.raises(StoreDamagedError, match=f"lost 1 record.*{removed}") as info:
        managers.open()
    assert info.value.lost == [removed]
    assert info.value.path == str(managers.state_dir / DB_NAME)
    # Refusing changed nothing in containerd.
    assert removed in {lease.id for lease in client.leases.list()}

    outcome = reopen_after_fault(managers, client, daemon, trees)
    assert outcome.repaired
    # Records built on a lost one go with it.
    assert outcome.lost == (2 if which == "leaf" else 3)
    assert outcome.left == []
    outcome.tally()


def test_deleted_write_ahead_log_after_sigkill(
    daemon: Daemon, namespace: str, managers: Managers, client: Client
) -> None:
    out = run_killed_child("tests.reliability.test_store_damage", daemon, managers)
    trees: Trees = {
        record_id: {name: bytes.fromhex(data) for name, data in files.items()}
        for record_id, files in json.loads(out).items()
    }
    wal = managers.state_dir / (DB_NAME + "-wal")
    assert wal.stat().st_size > 0
    wal.unlink()

    outcome = reopen_after_fault(managers, client, daemon, trees)
    assert outcome.repaired
    assert outcome.lost == len(trees)
    assert outcome.left == []
    outcome.tally()


def test_id_file_that_disagrees_with_the_database_is_refused(tmp_path: pathlib.Path) -> None:
    MetadataStore(tmp_path).close()
    id_path = tmp_path / ID_NAME
    assert id_path.stat().st_mode & 0o777 == 0o600
    saved = id_path.read_text()
    id_path.write_text("0" * 32 + "\n")
    with pytest.raises(StoreDamagedError, match="belongs to manager") as info:
        MetadataStore(tmp_path, repair=True)
    assert str(tmp_path / DB_NAME) in str(info.value)
    assert str(id_path) in str(info.value)
    id_path.write_text("not an id")
    with pytest.raises(StoreDamagedError, match="does not hold a manager id"):
        MetadataStore(tmp_path)
    # Without the id file, the database's id is saved again.
    id_path.unlink()
    store = MetadataStore(tmp_path)
    assert store.manager_id + "\n" == saved
    store.close()
    assert id_path.read_text() == saved


def test_garbage_database_is_refused_without_a_raw_sqlite_error(tmp_path: pathlib.Path) -> None:
    MetadataStore(tmp_path).close()
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 300)
    with pytest.raises(StoreDamagedError, match=str(tmp_path / DB_NAME)):
        MetadataStore(tmp_path)
    store = MetadataStore(tmp_path, repair=True)
    assert store.all() == []
    store.close()
    assert len(list(tmp_path.glob(DB_NAME + ".damaged-*"))) == 1


def _child(address: str, namespace: str, state_dir: str) -> None:
    cm = Manager.open(address, namespace=namespace, state_dir=state_dir, snapshotter=SNAPSHOTTER)
    trees = populate(cm, "wal")
    print(json.dumps({i: {n: d.hex() for n, d in files.items()} for i, files in trees.items()}))
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    _child(*sys.argv[1:4])
