"""Security (issue 6): modes of the state directory and database whatever the umask, the
daemon's socket left as it was, no host path built from a digest or a layout's contents,
and an embedded containerd that listens on no TCP port.

Where the package builds host paths (reviewed with grep over os.path, pathlib and open):
the state directory and its files (metadata.py, fixed names), the temporary mount directory
(refs.py, mkdtemp), the embedded daemon's directory (embedded.py, fixed names), and OCI
layouts (remote.py and oci.py: `blobs/<algorithm>/<hex>` from a digest checked to be sha256
and 64 hex digits first). The tests below aim digests and layout entries at paths outside.

The attacker tests of issue 16 (tests/integration/test_hostile_registry.py,
test_hostile_layouts.py and tests/unit/test_state_dir.py: hostile registries, layouts, tars
and state directories) count in this category too, as `attacks` and `refused`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import stat
from collections.abc import Iterator

import pytest

from pyctrd_cache import (
    DescHandler,
    Descriptor,
    InvalidError,
    Manager,
    OCILayoutProvider,
    PrunePolicy,
)
from pyctrd_cache.client import Client
from pyctrd_cache.metadata import DB_NAME, LOCK_NAME
from pyctrd_cache.oci import pull_layout
from tests.checks import gc, owned_leases, snapshot_names
from tests.fix_containerd import Daemon, Managers
from tests.layers import TAR_GZIP, BytesProvider, digest_of, layer
from tests.reliability import tally

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def passed(ok: bool) -> None:
    tally.add("security checks", checks=1, passed=int(ok))


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o000, 0o077, 0o022])
@pytest.mark.parametrize("exists", [False, True], ids=["new", "existing-0755"])
def test_state_dir_and_database_modes_whatever_the_umask(
    daemon: Daemon, namespace: str, tmp_path: pathlib.Path, mask: int, exists: bool
) -> None:
    state = tmp_path / "state"
    if exists:
        state.mkdir(mode=0o755)
        state.chmod(0o755)
    with umask(mask), Manager.open(daemon.address, namespace=namespace, state_dir=state) as cm:
        cm.new().release()  # a write, so that the WAL files exist
        modes = {p.name: _mode(p) for p in state.iterdir()}
        modes["."] = _mode(state)
    expected = {".": 0o700, DB_NAME: 0o600, LOCK_NAME: 0o600}
    files_ok = all(m & 0o077 == 0 for m in modes.values())
    ok = files_ok and all(modes.get(k) == v for k, v in expected.items())
    passed(ok)
    assert ok, {k: oct(v) for k, v in modes.items()}


@pytest.mark.parametrize("mode", [0o660, 0o600, 0o666])
def test_socket_permissions_are_left_alone(
    daemon: Daemon, namespace: str, tmp_path: pathlib.Path, mode: int
) -> None:
    socket = pathlib.Path(daemon.address)
    original = stat.S_IMODE(os.stat(socket).st_mode)
    owner = (os.stat(socket).st_uid, os.stat(socket).st_gid)
    try:
        socket.chmod(mode)
        with Manager.open(daemon.address, namespace=namespace, state_dir=tmp_path / "s") as cm:
            cm.new().release()
            during = stat.S_IMODE(os.stat(socket).st_mode)
        after = os.stat(socket)
    finally:
        socket.chmod(original)
    ok = during == mode and stat.S_IMODE(after.st_mode) == mode
    ok = ok and (after.st_uid, after.st_gid) == owner
    passed(ok)
    assert ok, (oct(during), oct(after.st_mode))


def _listening_inodes(pid: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        path = pathlib.Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                inodes.add(fields[9])
    return inodes


def test_embedded_containerd_listens_on_no_tcp_port(daemon: Daemon) -> None:
    embedded = daemon.restartable()
    pid = embedded.pid
    assert pid is not None
    listening = _listening_inodes(pid)
    sockets = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            if m := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd)):
                sockets.add(m.group(1))
    own = sorted(sockets & listening)
    ok = bool(sockets) and own == []
    passed(ok)
    assert sockets, "no sockets found: the check would prove nothing"
    assert own == [], f"containerd {pid} listens on TCP sockets {own}"


# OCI layouts with digests and entries aimed outside.


def _write_layout(root: pathlib.Path) -> None:
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def _put(root: pathlib.Path, data: bytes) -> Descriptor:
    digest = digest_of(data)
    (root / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    return Descriptor("application/octet-stream", digest, len(data))


@pytest.fixture
def outside(tmp_path: pathlib.Path) -> pathlib.Path:
    """A file next to the layout that a path trick would reach."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    return secret


TRICKS = [
    "sha256:../../../secret",
    "sha256:/etc/passwd",
    "../../secret",
    "sha512:" + "0" * 128,
    "sha256:" + "0" * 63 + "/",
]


@pytest.mark.parametrize("digest", TRICKS)
def test_layout_provider_refuses_digests_that_make_paths(
    tmp_path: pathlib.Path, outside: pathlib.Path, digest: str
) -> None:
    root = tmp_path / "layout"
    _write_layout(root)
    provider = OCILayoutProvider(root)
    errors = []
    for call in (
        lambda: provider.open(Descriptor(TAR_GZIP, digest, len(b"host secret"))),
        lambda: provider.blob_path(digest),
    ):
        with pytest.raises(InvalidError) as info:
            call()
        errors.append(info.value)
    ok = all(repr(digest) in str(e) for e in errors)
    passed(ok)
    assert ok, errors


def _index(root: pathlib.Path, manifest: dict[str, object]) -> None:
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))


def _layout_with(
    root: pathlib.Path, *, manifest_digest: str | None, layer_digest: str | None, config: bool
) -> None:
    _write_layout(root)
    blob, desc = layer({"f": b"x"})
    layer_desc = _put(root, blob)
    cfg = _put(root, json.dumps({"rootfs": {"diff_ids": []}}).encode())
    layer_entry = {
        "mediaType": TAR_GZIP,
        "digest": layer_digest or layer_desc.digest,
        "size": layer_desc.size,
        "annotations": dict(desc.annotations),
    }
    config_entry = {
        "mediaType": OCI_CONFIG,
        "digest": "sha256:../../../secret" if config else cfg.digest,
        "size": cfg.size,
    }
    manifest = _put(
        root,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_entry,
                "layers": [layer_entry],
            }
        ).encode(),
    )
    _index(
        root,
        {
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest or manifest.digest,
            "size": manifest.size,
        },
    )


@pytest.mark.parametrize(
    ("where", "digest"),
    [
        ("index", "sha256:../../../secret"),
        ("index", "sha256:" + "0" * 64 + "/../../secret"),
        ("layer", "sha256:../../../secret"),
        ("layer", "sha512:" + "1" * 128),
        ("config", "sha256:../../../secret"),
    ],
)
def test_layout_import_refuses_entries_aimed_outside(
    managers: Managers,
    client: Client,
    tmp_path: pathlib.Path,
    outside: pathlib.Path,
    where: str,
    digest: str,
) -> None:
    cm = managers.open()
    root = tmp_path / "layout"
    _layout_with(
        root,
        manifest_digest=digest if where == "index" else None,
        layer_digest=digest if where == "layer" else None,
        config=where == "config",
    )
    with pytest.raises(InvalidError) as info:
        pull_layout(cm, root)
    shown = digest if where != "config" else "sha256:../../../secret"
    cm.prune(PrunePolicy(all=True))
    gc(client)
    left = [
        *owned_leases(client, cm),
        *snapshot_names(client),
        *(b.digest for b in client.content.list()),
    ]
    ok = repr(shown) in str(info.value) and left == [] and cm.disk_usage() == []
    passed(ok)
    assert repr(shown) in str(info.value), info.value
    assert left == []
    assert cm.disk_usage() == []


def test_snapshots_are_named_by_the_package_not_by_input(
    managers: Managers, client: Client
) -> None:
    """Snapshot keys and lease ids come from record ids and chain ids the package computes,
    never from a descriptor's text."""
    cm = managers.open()
    blob, desc = layer({"f": b"named"})
    with cm.get_by_blob(desc, desc_handlers={desc.digest: DescHandler(BytesProvider(blob))}) as ref:
        ref.extract()
        names = snapshot_names(client)
        info = ref.info()
    allowed = re.compile(r"sha256:[0-9a-f]{64}|[0-9a-z]{25}")
    ok = names == [info.snapshot_id] and all(allowed.fullmatch(n) for n in names)
    cm.prune(PrunePolicy(all=True))
    passed(ok)
    assert ok, names
