"""pytest plugin: the stargz snapshotter daemon the tests build (tests/stargz), a containerd
using it as the proxy snapshotter `stargz`, a counting proxy in front of the test registry,
and eStargz images.

The daemon runs with `-no-background-fetch`, so that file data is fetched only when read.
When it cannot be built, the tests that need it fail, saying why; they do not skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import io
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from pyctrd_cache import estargz
from pyctrd_cache.client import Client
from pyctrd_cache.daemon_config import daemon_config
from pyctrd_cache.embedded import containerd_version
from pyctrd_cache.errors import UnavailableError
from pyctrd_cache.oci import machine_platform
from tests.fix_containerd import INSTALLED, ROOT, Daemon
from tests.layers import TAR_GZIP, digest_of, make_tar
from tests.registry_fix import Registry, serving, stop

BUILD = ROOT / "tests" / "stargz" / "build"
STARGZ = "stargz"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def _tail(path: pathlib.Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _wait_for(path: pathlib.Path, process: subprocess.Popen[bytes], log: pathlib.Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"{process.args!r} exited with {process.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{process.args!r} made no socket {path} in 30 s:\n{_tail(log)}")
        time.sleep(0.05)


def mounts_under(*roots: pathlib.Path) -> list[str]:
    """Mount points at or under `roots`, as /proc/self/mountinfo lists them (deepest last)."""
    found = []
    prefixes = [str(r.resolve()) for r in roots]
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            found.append(point)
    return found


def unmount_all(*roots: pathlib.Path) -> None:
    """Detaches every mount at or under `roots`, deepest first."""
    for point in sorted(mounts_under(*roots), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@pytest.fixture(scope="session")
def stargz_binary() -> str:
    """The proxy-snapshotter daemon, built (or taken from its cache) by tests/stargz/build."""
    try:
        result = subprocess.run(
            [str(BUILD)], capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"cannot build the stargz snapshotter daemon with {BUILD}: {e}")
    binary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not os.access(binary, os.X_OK):
        pytest.fail(
            f"cannot build the stargz snapshotter daemon with {BUILD} (it needs Go 1.19 and "
            f"Debian's golang-github-containerd-stargz-snapshotter-dev); exit status "
            f"{result.returncode}:\n{result.stderr[-3000:]}"
        )
    return binary


# A counting proxy in front of the registry.


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    content_range: str | None = None


@dataclass
class CountingProxy:
    """Forwards every request to the registry and records it; `host` is its own address."""

    host: str
    requests: list[Request] = field(default_factory=list)

    def ref(self, path: str) -> str:
        return f"{self.host}/{path}"

    def blob_requests(self, digest: str) -> list[Request]:
        return [r for r in self.requests if r.path.endswith(f"/blobs/{digest}")]


@pytest.fixture
def registry_proxy(open_registry: Registry) -> Iterator[CountingProxy]:
    upstream = open_registry.host
    proxy = CountingProxy("")
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            with lock:
                proxy.requests.append(
                    Request(
                        self.command,
                        self.path,
                        self.headers.get("Range"),
                        self.headers.get("Content-Range"),
                    )
                )
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            # The Host header goes on as it came: the registry names the proxy in the
            # Location of an upload, so the upload's later requests come through it too.
            headers = dict(self.headers.items())
            connection = http.client.HTTPConnection(upstream, timeout=60)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                # A HEAD answer keeps the registry's length of the body it did not send.
                skipped = ["connection", "transfer-encoding"]
                if self.command != "HEAD":
                    skipped.append("content-length")
                    self.send_header("Content-Length", str(len(data)))
                for key, value in response.getheaders():
                    if key.lower() not in skipped:
                        self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            finally:
                connection.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _forward

    with serving(Handler) as server:
        proxy.host = f"127.0.0.1:{server.server_address[1]}"
        yield proxy


# containerd with the stargz snapshotter.


@dataclass
class StargzDaemon:
    """A containerd whose proxy snapshotter `stargz` is the test-built daemon; `root` holds
    both daemons' state (the snapshotter's FUSE mounts live under it)."""

    address: str
    root: pathlib.Path
    snapshotter_log: pathlib.Path


@pytest.fixture
def stargz_containerd(
    daemon: Daemon, stargz_binary: str, registry_proxy: CountingProxy
) -> Iterator[StargzDaemon]:
    """A containerd (the version under test) with the stargz snapshotter as proxy plugin
    `stargz`, reaching the registry proxy over plain HTTP; both daemons stop afterwards and
    every mount left under their directory is detached."""
    binary = (
        daemon.embedded.binary if daemon.embedded is not None else str(INSTALLED / "containerd-2.1")
    )
    path = shutil.which(binary)
    assert path is not None
    root = pathlib.Path(tempfile.mkdtemp(prefix="sgz-", dir="/tmp"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        snapshotter_socket = root / "stargz.sock"
        snapshotter_log = root / "stargz.log"
        with open(snapshotter_log, "ab") as log:
            processes.append(
                subprocess.Popen(
                    [
                        stargz_binary,
                        "-address",
                        str(snapshotter_socket),
                        "-root",
                        str(root / "stargz"),
                        "-no-background-fetch",
                        "-plain-http",
                        registry_proxy.host,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        _wait_for(snapshotter_socket, processes[0], snapshotter_log)

        address = root / "containerd.sock"
        config = root / "config.toml"
        config.write_text(
            daemon_config(
                root=str(root / "root"),
                state=str(root / "state"),
                address=str(address),
                major=containerd_version(path)[0],
                proxy_snapshotters={STARGZ: str(snapshotter_socket)},
            )
        )
        containerd_log = root / "containerd.log"
        with open(containerd_log, "ab") as log:
            processes.append(
                subprocess.Popen(
                    [path, "--config", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        _wait_for(address, processes[1], containerd_log)
        with Client(str(address), retry_budget=10.0) as client:
            try:
                client.version.get()
            except UnavailableError as e:
                pytest.fail(f"containerd did not answer: {e}\n{_tail(containerd_log)}")
        yield StargzDaemon(str(address), root, snapshotter_log)
    finally:
        for process in reversed(processes):
            stop(process)
        unmount_all(root)
        shutil.rmtree(root, ignore_errors=True)


# eStargz images.


@dataclass(frozen=True)
class Image:
    """An OCI image layout of eStargz layers (parent first) and the merged file tree."""

    layout: pathlib.Path
    tag: str
    layers: list[estargz.EStargzLayer]
    files: dict[str, bytes]


def write_estargz_layout(
    layout: pathlib.Path, trees: Sequence[Mapping[str, bytes]], tag: str, chunk_size: int
) -> Image:
    """An OCI image layout of one eStargz layer per tree in `trees`, tagged `tag`."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def put(data: bytes) -> str:
        digest = digest_of(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    layers = []
    descriptors = []
    merged: dict[str, bytes] = {}
    for tree in trees:
        out = io.BytesIO()
        layer = estargz.write_estargz(io.BytesIO(make_tar(dict(tree))), out, chunk_size=chunk_size)
        put(out.getvalue())
        layers.append(layer)
        descriptors.append(
            {
                "mediaType": TAR_GZIP,
                "digest": layer.digest,
                "size": layer.size,
                "annotations": {
                    estargz.TOC_DIGEST_ANNOTATION: layer.toc_digest,
                    estargz.UNCOMPRESSED_SIZE_ANNOTATION: str(layer.uncompressed_size),
                },
            }
        )
        merged.update(tree)
    config = json.dumps(
        {
            **machine_platform(),
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
            "layers": descriptors,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {REF_NAME: tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return Image(layout, tag, layers, merged)


def sample_trees(scale: int = 1) -> list[dict[str, bytes]]:
    """Two layers: a base with a multi-chunk file, small files and an empty one; a top that
    replaces one file and adds others."""
    big = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(scale * 32768))
    base = {
        "etc/motd": b"hello from the base layer\n",
        "usr/lib/big.bin": big,
        "usr/share/doc/readme": b"read me\n" * 100,
        "var/empty": b"",
    }
    top = {
        "etc/motd": b"hello from the top layer\n",
        "srv/data.bin": big[: len(big) // 3],
        "srv/notes.txt": b"notes\n" * 1000,
    }
    return [base, top]


def read_tree(root: pathlib.Path) -> dict[str, bytes]:
    """Every regular file under `root` by relative path, without eStargz's own entries."""
    files = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            name = path.relative_to(root).as_posix()
            if name not in (estargz.TOC_NAME, estargz.NO_PREFETCH_LANDMARK):
                files[name] = path.read_bytes()
    return files


@contextlib.contextmanager
def detached_on_exit(*roots: pathlib.Path) -> Iterator[None]:
    """Detaches every mount left under `roots` when the block ends, pass or fail."""
    try:
        yield
    finally:
        unmount_all(*roots)
