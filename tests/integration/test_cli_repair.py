"""`pyctrd-cache --repair`: a metadata store that lost a record is refused until the command
is run with `--repair`, which gives the lost record (and what was built on it) up."""

from __future__ import annotations

import json
import pathlib
import sqlite3

from pyctrd_cache import PrunePolicy
from pyctrd_cache.client import Client
from pyctrd_cache.metadata import DB_NAME
from tests.cli_runs import Cli, one_line_error
from tests.fix_containerd import Daemon, Managers
from tests.integration.test_cli import committed


def test_repair_gives_up_a_lost_record(
    daemon: Daemon, managers: Managers, client: Client, tmp_path: pathlib.Path
) -> None:
    cli = Cli(daemon, managers.namespace, tmp_path / "state")
    cm = managers.open(cli.state)
    base = committed(cm, {"base": b"b"}, description="base")
    child = committed(cm, {"child": b"c"}, parent=base, description="child")
    kept = committed(cm, {"kept": b"k"}, description="kept")
    cm.close()
    with sqlite3.connect(cli.state / DB_NAME) as db:
        db.execute("DELETE FROM records WHERE id = ?", (base,))
    db.close()

    # Refused, changing nothing, until --repair.
    one_line_error(cli("du"), "lost 1 record", base, "--repair")
    assert {base, child, kept} <= {lease.id for lease in client.leases.list()}
    repaired = cli("--repair", "du", "--format", "json")
    assert repaired.returncode == 0, repaired.stderr
    # The command says which records the repair gave up.
    assert repaired.stderr == (
        f"pyctrd-cache: reconcile: dropping record {child}, whose containerd objects are gone\n"
    )
    assert [r["id"] for r in json.loads(repaired.stdout)["records"]] == [kept]
    leases = {lease.id for lease in client.leases.list()}
    assert base not in leases
    assert child not in leases
    # Repaired for good: an ordinary run opens the store.
    assert [r["id"] for r in cli.json("du")["records"]] == [kept]
    cm = managers.open(cli.state)
    with cm.get(kept) as ref, ref.mount() as root:
        assert (root / "kept").read_bytes() == b"k"
    cm.prune(PrunePolicy(all=True))
