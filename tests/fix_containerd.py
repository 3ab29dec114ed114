"""pytest plugin: real containerd daemons for the tests, and a fresh namespace per test.

Which daemons:
- `PYCTRD_TEST_ADDRESS=/path/to.sock`: an already-running containerd (the compose setup);
  tests that restart the daemon are skipped.
- otherwise `PYCTRD_TEST_CONTAINERD`: `all` (containerd 1.6, 1.7 and 2.1 as installed by
  scripts/install-containerd), or a comma-separated list of containerd binaries; default
  `containerd` from PATH. Each daemon is started once per test run, embedded in a
  temporary directory.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pyctrd_cache.client import Client
from pyctrd_cache.daemon_config import parse_version
from pyctrd_cache.embedded import EmbeddedContainerd, containerd_version
from pyctrd_cache.errors import CacheError, FailedPreconditionError, NotFoundError
from pyctrd_cache.manager import Manager

ROOT = pathlib.Path(__file__).resolve().parent.parent
INSTALLED = ROOT / ".containerd" / "bin"
SNAPSHOTTER = "overlayfs"


@dataclass
class Daemon:
    """One containerd under test."""

    name: str
    address: str
    version: tuple[int, int, int]
    embedded: EmbeddedContainerd | None
    ctr: str | None

    def restartable(self) -> EmbeddedContainerd:
        if self.embedded is None:
            pytest.skip("needs a daemon started by the test harness (PYCTRD_TEST_ADDRESS is set)")
        return self.embedded


def _specs() -> list[str]:
    if address := os.environ.get("PYCTRD_TEST_ADDRESS"):
        return [f"address:{address}"]
    wanted = os.environ.get("PYCTRD_TEST_CONTAINERD", "containerd")
    if wanted == "all":
        return [str(INSTALLED / f"containerd-{v}") for v in ("1.6", "1.7", "2.1")]
    return [b for b in wanted.split(",") if b]


def _spec_id(spec: str) -> str:
    if spec.startswith("address:"):
        return "external"
    name = pathlib.Path(spec).name
    return name.replace("containerd-", "ctrd-") if name != "containerd" else "ctrd"


@pytest.fixture(scope="session", params=_specs(), ids=_spec_id)
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    spec: str = request.param
    if spec.startswith("address:"):
        address = spec.removeprefix("address:")
        with Client(address) as client:
            raw = client.version.get().version
        yield Daemon("external", address, parse_version(" " + raw), None, shutil.which("ctr"))
        return
    if shutil.which(spec) is None:
        pytest.fail(
            f"containerd binary {spec!r} not found: run scripts/install-containerd "
            "or set PYCTRD_TEST_CONTAINERD"
        )
    version = containerd_version(spec)
    # Short paths: the socket lives inside and Unix socket paths are limited to 107 bytes.
    root = tempfile.mkdtemp(prefix="ctrd-", dir="/tmp")
    embedded = EmbeddedContainerd(root, spec).start()
    ctr = pathlib.Path(spec).with_name(pathlib.Path(spec).name.replace("containerd", "ctr"))
    try:
        yield Daemon(
            _spec_id(spec),
            embedded.address,
            version,
            embedded,
            str(ctr) if ctr.exists() else shutil.which("ctr"),
        )
    finally:
        embedded.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_mount_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the run, no mount is left on the host under the run's temporary directories
    (where the tests' state directories, and so their mount points, live)."""
    yield
    base = os.fsencode(tmp_path_factory.getbasetemp()) + b"/"
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        left = [line.split()[4] for line in mountinfo if line.split()[4].startswith(base)]
    assert not left, f"mounts left on the host: {[os.fsdecode(m) for m in left]}"


_counter = itertools.count()


@pytest.fixture
def namespace(daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of its own for each test, emptied and deleted afterwards."""
    name = f"t{os.getpid()}-{next(_counter)}"
    yield name
    with Client(daemon.address, namespace=name) as client:
        clean_namespace(client)


def clean_namespace(client: Client) -> None:
    """Removes everything the test left in the client's namespace, then the namespace."""
    leases = client.leases.list()
    for i, lease in enumerate(leases):
        # The last deletion waits for a collection, so leased views and ingests are gone.
        client.leases.delete(lease.id, sync=i == len(leases) - 1)
    for status in client.content.list_statuses():
        client.content.abort(status.ref)
    snapshots = client.snapshots(SNAPSHOTTER)
    remaining = snapshots.list()
    while remaining:
        parents = {s.parent for s in remaining}
        for info in remaining:
            if info.name not in parents:
                with contextlib.suppress(NotFoundError, FailedPreconditionError):
                    snapshots.remove(info.name)
        left = snapshots.list()
        if len(left) == len(remaining):
            raise CacheError(f"cannot clean snapshots {[s.name for s in left]}")
        remaining = left
    for stored in client.content.list():
        # The collector may have taken it since the listing.
        with contextlib.suppress(NotFoundError):
            client.content.delete(stored.digest)
    with contextlib.suppress(NotFoundError):
        client.namespaces.delete(client.namespace)


@pytest.fixture
def client(daemon: Daemon, namespace: str) -> Iterator[Client]:
    with Client(daemon.address, namespace=namespace) as c:
        yield c


class Managers:
    """Opens managers on the test's namespace and closes whatever is left open."""

    def __init__(self, daemon: Daemon, namespace: str, state_dir: pathlib.Path) -> None:
        self.daemon = daemon
        self.namespace = namespace
        self.state_dir = state_dir
        self.opened: list[Manager] = []

    def open(self, state_dir: pathlib.Path | None = None) -> Manager:
        cm = Manager.open(
            self.daemon.address,
            namespace=self.namespace,
            snapshotter=SNAPSHOTTER,
            state_dir=state_dir or self.state_dir,
        )
        self.opened.append(cm)
        return cm

    def close_all(self) -> None:
        for cm in self.opened:
            cm.close()


@pytest.fixture
def managers(daemon: Daemon, namespace: str, tmp_path: pathlib.Path) -> Iterator[Managers]:
    opened = Managers(daemon, namespace, tmp_path / "state")
    try:
        yield opened
    finally:
        opened.close_all()
