"""Hostile or broken input (issue 6): malformed descriptors and digests, record ids and
descriptions, providers that lie, stall or never end, layer tars that aim at the host, and
namespaces containerd refuses. Each gives an error of the project's tree that names the
offending value, except the layer tars containerd applies with every path kept inside the
snapshot (counted as applied inside); none leaves anything in containerd once its
collector has run."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyctrd_cache import (
    CacheError,
    ContainerdError,
    DescHandler,
    Descriptor,
    InvalidError,
    Manager,
    NotFoundError,
    PrunePolicy,
    UnavailableError,
)
from pyctrd_cache.client import Client
from tests.checks import gc, owned_leases, snapshot_names
from tests.fix_containerd import Daemon, Managers
from tests.layers import TAR, BytesProvider, digest_of, layer
from tests.reliability import tally

UNCOMPRESSED = "containerd.io/uncompressed"
MTIME = 1_600_000_000


def traces(client: Client, cm: Manager) -> list[str]:
    """What is left in the namespace after a collection: leases of the manager, snapshots,
    blobs and ingests."""
    gc(client)
    return [
        *(f"lease {x}" for x in owned_leases(client, cm)),
        *(f"snapshot {x}" for x in snapshot_names(client)),
        *(f"blob {x.digest}" for x in client.content.list()),
        *(f"ingest {x.ref}" for x in client.content.list_statuses()),
    ]


def settle(cm: Manager, client: Client, err: BaseException | None, *, named: str) -> None:
    """Counts the case, then asserts the error was clear (a `CacheError` naming `named`) and
    that nothing is left once every record is pruned and containerd has collected."""
    clear = isinstance(err, CacheError) and named in str(err)
    cm.prune(PrunePolicy(all=True))
    left = traces(client, cm)
    tally.add("hostile inputs", cases=1, clear_errors=int(clear), traces_left=len(left))
    assert clear, f"unclear error for {named!r}: {err!r}"
    assert left == []


def refused(
    cm: Manager,
    client: Client,
    call: Callable[[], object],
    error: type[CacheError],
    *,
    named: str,
) -> CacheError:
    with pytest.raises(error) as info:
        call()
    settle(cm, client, info.value, named=named)
    return info.value


# Descriptors and digests.

_, GOOD = layer({"f": b"good"})
HEX = GOOD.digest.removeprefix("sha256:")
_LONG = "x" * 5000


def _desc(**changes: object) -> Descriptor:
    fields: dict[str, object] = {
        "media_type": GOOD.media_type,
        "digest": GOOD.digest,
        "size": GOOD.size,
        "annotations": dict(GOOD.annotations),
    }
    fields.update(changes)
    return Descriptor(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BadDesc:
    desc: Descriptor
    named: str


BAD_DESCRIPTORS = {
    "sha512": BadDesc(_desc(digest="sha512:" + HEX * 2), "sha512:" + HEX[:20]),
    "md5": BadDesc(_desc(digest="md5:" + HEX[:32]), "md5:"),
    "path-trick": BadDesc(_desc(digest="sha256:../../x"), "sha256:../../x"),
    "path-in-hex": BadDesc(_desc(digest="sha256:" + HEX[:60] + "/../"), "/../"),
    "uppercase": BadDesc(_desc(digest="sha256:" + HEX.upper()), HEX.upper()[:20]),
    "short-hex": BadDesc(_desc(digest="sha256:" + HEX[:63]), HEX[:40]),
    "no-algorithm": BadDesc(_desc(digest=HEX), HEX[:20]),
    "empty-digest": BadDesc(_desc(digest=""), "''"),
    "newline": BadDesc(_desc(digest=GOOD.digest + "\n"), "\\n"),
    "negative-size": BadDesc(_desc(size=-1), "-1"),
    "media-type": BadDesc(_desc(media_type="application/x-evil"), "application/x-evil"),
    "diff-id": BadDesc(_desc(annotations={UNCOMPRESSED: "sha256:../../etc"}), "sha256:../../etc"),
    "label-size": BadDesc(
        _desc(
            annotations={
                UNCOMPRESSED: GOOD.annotations[UNCOMPRESSED],
                "io.containers.estargz.uncompressed-size": _LONG,
            }
        ),
        "io.containers.estargz.uncompressed-size",
    ),
}


@pytest.mark.parametrize("case", BAD_DESCRIPTORS.values(), ids=BAD_DESCRIPTORS.keys())
def test_get_by_blob_refuses_bad_descriptors(
    managers: Managers, client: Client, case: BadDesc
) -> None:
    cm = managers.open()
    provider = BytesProvider()
    refused(
        cm,
        client,
        lambda: cm.get_by_blob(case.desc, desc_handlers={case.desc.digest: DescHandler(provider)}),
        InvalidError,
        named=case.named,
    )
    assert provider.opened == {}
    assert cm.disk_usage() == []


@pytest.mark.parametrize(
    "name", ["sha512", "path-trick", "uppercase", "negative-size", "media-type", "label-size"]
)
def test_set_blob_and_apply_refuse_bad_descriptors(
    managers: Managers, client: Client, name: str
) -> None:
    cm = managers.open()
    case = BAD_DESCRIPTORS[name]
    work = cm.new()
    with pytest.raises(InvalidError) as applying:
        work.apply(case.desc)
    assert case.named in str(applying.value)
    done = work.commit()
    with pytest.raises(InvalidError) as setting:
        done.set_blob(case.desc)
    assert done.info().blob is None
    done.release()
    settle(cm, client, setting.value, named=case.named)


def test_unknown_media_type_of_a_tar_is_refused(managers: Managers, client: Client) -> None:
    cm = managers.open()
    blob, _ = layer({"f": b"x"}, TAR)
    with cm.new() as work, pytest.raises(InvalidError) as info:
        work.apply(blob, media_type="text/plain")
    settle(cm, client, info.value, named="text/plain")


def test_descriptor_of_a_blob_not_in_the_store_is_not_found(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    absent = _desc(digest=digest_of(b"absent"))
    with cm.new() as work, pytest.raises(NotFoundError) as info:
        work.apply(absent)
    settle(cm, client, info.value, named=absent.digest)


# Record ids and descriptions.

BAD_IDS = {
    "slash": "a/b",
    "dotdot": "../x",
    "absolute": "/etc/passwd",
    "backslash": "a\\b",
    "newline": "abc\n",
    "nul": "ab\x00c",
    "escape": "\x1b[31mred",
    "empty": "",
    "long": "a" * 65,
    "uppercase": "ABC",
    "space": "a b",
    "label-syntax": 'x"==y',
}


@pytest.mark.parametrize("record_id", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_record_ids_no_manager_makes_are_invalid(
    managers: Managers, client: Client, record_id: str
) -> None:
    cm = managers.open()
    errors: list[CacheError] = []
    for call in (cm.get, cm.get_mutable, cm.info):
        with pytest.raises(InvalidError) as info:
            call(record_id)
        errors.append(info.value)
    assert all(repr(record_id) in str(e) for e in errors), errors
    settle(cm, client, errors[0], named=repr(record_id))


def test_well_formed_ids_of_no_record_are_not_found(managers: Managers, client: Client) -> None:
    cm = managers.open()
    record_id = cm.new_id()
    for call in (cm.get, cm.get_mutable, cm.info):
        with pytest.raises(NotFoundError) as info:
            call(record_id)
    settle(cm, client, info.value, named=record_id)


def test_descriptions_over_the_label_limit_are_invalid(managers: Managers, client: Client) -> None:
    cm = managers.open()
    fits = "é" * 2048  # 4096 bytes of UTF-8
    too_long = fits + "x"
    with pytest.raises(InvalidError) as info:
        cm.new(description=too_long)
    assert "4097 bytes" in str(info.value)
    assert owned_leases(client, cm) == []
    with cm.new(description=fits) as work:
        assert work.description == fits
        with pytest.raises(InvalidError):
            work.set_description(too_long)
        assert work.description == fits
        with pytest.raises(InvalidError) as in_blob:
            cm.get_by_blob(GOOD, description=too_long)
    settle(cm, client, in_blob.value, named="4097 bytes")


def test_handler_annotations_over_the_label_limit_are_invalid(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    with pytest.raises(InvalidError) as info:
        DescHandler(BytesProvider(), annotations={"io.containers.estargz.uncompressed-size": _LONG})
    settle(cm, client, info.value, named="io.containers.estargz.uncompressed-size")


# Providers that lie, stall or never end.


class _Serving(BytesProvider):
    """Serves `served` for the blob whatever it really is."""

    def __init__(self, served: Callable[[bytes], io.RawIOBase | io.BytesIO], blob: bytes) -> None:
        super().__init__(blob)
        self._served = served

    def open(self, desc: Descriptor) -> io.RawIOBase | io.BytesIO:  # type: ignore[override]
        blob = self.blobs[desc.digest]
        super().open(desc)
        return self._served(blob)


class _Endless(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        buffer[:] = b"\0" * len(buffer)
        return len(buffer)


class _Stalling(io.RawIOBase):
    """Sends `head`, then blocks until `gate` opens."""

    def __init__(self, head: bytes, gate: threading.Event) -> None:
        super().__init__()
        self._head = head
        self._gate = gate

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        self._gate.wait()
        return 0


class _StallingOpen(BytesProvider):
    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self._gate = gate

    def open(self, desc: Descriptor) -> io.BytesIO:
        self._gate.wait()
        raise NotFoundError("gave up")


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Blocks the stalling providers until the test ends."""
    event = threading.Event()
    yield event
    event.set()


def _pull(
    cm: Manager, client: Client, provider: BytesProvider, desc: Descriptor, error: type[CacheError]
) -> tuple[CacheError, float]:
    ref = cm.get_by_blob(
        desc, desc_handlers={desc.digest: DescHandler(provider, stall_timeout=1.0)}
    )
    started = time.monotonic()
    with pytest.raises(error) as info:
        ref.extract()
    took = time.monotonic() - started
    assert ref.is_lazy()
    assert client.content.list_statuses() == []  # the ingest was aborted at once
    ref.release()
    return info.value, took


BLOB, DESC = layer({"f": os.urandom(300_000)}, TAR)


@pytest.mark.parametrize(
    ("served", "named"),
    [
        (lambda b: io.BytesIO(b[:-10]), "short of its size"),
        (lambda b: io.BytesIO(b + b"more"), "more than"),
        (lambda b: io.BytesIO(b[:-1] + bytes([b[-1] ^ 1])), "not of " + DESC.digest),
        (lambda b: _Endless(), "more than"),
    ],
    ids=["short", "long", "wrong-digest", "endless"],
)
def test_providers_that_lie_fail_before_commit(
    managers: Managers,
    client: Client,
    served: Callable[[bytes], io.RawIOBase],
    named: str,
) -> None:
    cm = managers.open()
    err, _ = _pull(cm, client, _Serving(served, BLOB), DESC, InvalidError)
    assert DESC.digest in str(err)
    settle(cm, client, err, named=named)


def test_descriptor_larger_than_the_blob_fails(managers: Managers, client: Client) -> None:
    cm = managers.open()
    bigger = _desc(digest=DESC.digest, size=DESC.size + 1, annotations=dict(DESC.annotations))
    err, _ = _pull(cm, client, BytesProvider(BLOB), bigger, InvalidError)
    settle(cm, client, err, named=f"short of its size {DESC.size + 1}")


def test_stalled_read_hits_the_deadline(
    managers: Managers, client: Client, gate: threading.Event
) -> None:
    cm = managers.open()
    provider = _Serving(lambda b: _Stalling(b[:100_000], gate), BLOB)
    err, took = _pull(cm, client, provider, DESC, UnavailableError)
    assert "no progress for 1 s" in str(err)
    assert took < 10
    settle(cm, client, err, named=DESC.digest)


def test_stalled_open_hits_the_deadline(
    managers: Managers, client: Client, gate: threading.Event
) -> None:
    cm = managers.open()
    err, took = _pull(cm, client, _StallingOpen(gate), DESC, UnavailableError)
    assert "after 0 of" in str(err)
    assert took < 10
    settle(cm, client, err, named=DESC.digest)


def test_stall_timeout_must_be_positive(managers: Managers, client: Client) -> None:
    cm = managers.open()
    with pytest.raises(InvalidError) as info:
        DescHandler(BytesProvider(), stall_timeout=0)
    settle(cm, client, info.value, named="stall_timeout")


# Namespaces containerd refuses.


@pytest.mark.parametrize("namespace", ["bad name!", "../x", "a" * 80, "x/y", "-x", "a\nb"])
def test_refused_namespaces_are_invalid(
    daemon: Daemon, tmp_path: pathlib.Path, namespace: str
) -> None:
    state = tmp_path / "state"
    with pytest.raises(InvalidError) as info:
        Manager.open(daemon.address, namespace=namespace, state_dir=state)
    err = info.value
    clear = repr(namespace) in str(err)
    with Client(daemon.address) as c:
        created = [n.name for n in c.namespaces.list() if n.name == namespace]
    # The state directory is free: another manager opens it at once.
    with Manager.open(daemon.address, namespace="pyctrd-hostile", state_dir=state) as cm:
        assert cm.disk_usage() == []
    with (
        Client(daemon.address, namespace="pyctrd-hostile") as c,
        contextlib.suppress(NotFoundError),
    ):
        c.namespaces.delete("pyctrd-hostile")
    tally.add("hostile inputs", cases=1, clear_errors=int(clear), traces_left=len(created))
    assert clear, err
    assert created == []


# Layer tars that aim at the host.


@dataclass
class Canary:
    """A directory on the host with one file whose content, mode and times must not change."""

    dir: pathlib.Path
    file: pathlib.Path

    def state(self) -> tuple[list[str], bytes, int, int, int]:
        st = self.file.stat()
        return (
            sorted(os.listdir(self.dir)),
            self.file.read_bytes(),
            st.st_mode,
            st.st_mtime_ns,
            st.st_nlink,
        )


@pytest.fixture
def canary(tmp_path: pathlib.Path) -> Canary:
    d = tmp_path / "canary"
    d.mkdir()
    f = d / "secret"
    f.write_bytes(b"host secret\n")
    f.chmod(0o640)
    os.utime(f, ns=(MTIME * 10**9, MTIME * 10**9))
    return Canary(d, f)


def _entry(
    name: str, kind: bytes, *, data: bytes = b"", link: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    info.size = len(data)
    info.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def _tar(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _up(path: pathlib.Path) -> str:
    """`path` reached from a layer's root through enough `..` to leave any snapshot."""
    return "../" * 12 + str(path).lstrip("/")


def _hostile_tars(c: Canary) -> dict[str, bytes]:
    rel = str(c.dir).lstrip("/")
    return {
        "absolute": _tar(_entry(f"{c.dir}/abs", tarfile.REGTYPE, data=b"abs")),
        "dotdot": _tar(_entry(_up(c.dir / "dotdot"), tarfile.REGTYPE, data=b"dotdot")),
        "symlink-absolute": _tar(
            _entry("out", tarfile.SYMTYPE, link=str(c.dir)),
            _entry("out/via-abs-link", tarfile.REGTYPE, data=b"via"),
            _entry("out/secret", tarfile.REGTYPE, data=b"overwritten"),
        ),
        "symlink-dotdot": _tar(
            _entry("up", tarfile.SYMTYPE, link=_up(c.dir)),
            _entry("up/via-up-link", tarfile.REGTYPE, data=b"via"),
        ),
        "symlink-to-file": _tar(
            _entry("secret-link", tarfile.SYMTYPE, link=str(c.file)),
            _entry("secret-link", tarfile.REGTYPE, data=b"replaced"),
        ),
        "hardlink-absolute": _tar(_entry("hl", tarfile.LNKTYPE, link=str(c.file))),
        "hardlink-dotdot": _tar(_entry("hl", tarfile.LNKTYPE, link=_up(c.file))),
        "hardlink-relative-path": _tar(_entry("hl", tarfile.LNKTYPE, link=f"{rel}/secret")),
        "hardlink-through-symlink": _tar(
            _entry("out", tarfile.SYMTYPE, link=str(c.dir)),
            _entry("hl", tarfile.LNKTYPE, link="out/secret"),
        ),
        "device-nodes": _tar(
            _entry("dev", tarfile.DIRTYPE, mode=0o755),
            _entry("dev/mem-like", tarfile.CHRTYPE, mode=0o600),
            _entry(f"{c.dir}/blk", tarfile.BLKTYPE, mode=0o600),
        ),
    }


# What containerd's applier does with each tar, the same on 1.6.20, 1.7.24 and 2.1.9: it
# resolves every name, symlink and hard link target inside the snapshot, so absolute names,
# `..` and symlinks land inside it (the paths, relative to the snapshot's root, that must
# exist), and hard links to files the layer does not have are refused (containerd answers
# "unknown", a `ContainerdError` naming the link).
_INSIDE: dict[str, Callable[[str], list[str]]] = {
    "absolute": lambda rel: [f"{rel}/abs"],
    "dotdot": lambda rel: [f"{rel}/dotdot"],
    "symlink-absolute": lambda rel: ["out", f"{rel}/via-abs-link", f"{rel}/secret"],
    "symlink-dotdot": lambda rel: ["up", f"{rel}/via-up-link"],
    "symlink-to-file": lambda rel: ["secret-link"],
    "device-nodes": lambda rel: ["dev/mem-like", f"{rel}/blk"],
}
_REFUSED: dict[str, type[CacheError]] = {
    "hardlink-absolute": ContainerdError,
    "hardlink-dotdot": ContainerdError,
    "hardlink-relative-path": ContainerdError,
    "hardlink-through-symlink": ContainerdError,
}


def _lexists(root: pathlib.Path, rel: str) -> bool:
    return os.path.lexists(os.path.join(root, rel))


@pytest.mark.parametrize(
    "name",
    [
        "absolute",
        "dotdot",
        "symlink-absolute",
        "symlink-dotdot",
        "symlink-to-file",
        "hardlink-absolute",
        "hardlink-dotdot",
        "hardlink-relative-path",
        "hardlink-through-symlink",
        "device-nodes",
    ],
)
def test_hostile_tars_stay_inside_the_snapshot(
    managers: Managers, client: Client, canary: Canary, name: str
) -> None:
    cm = managers.open()
    before = canary.state()
    tar = _hostile_tars(canary)[name]
    rel = str(canary.dir).lstrip("/")
    err: CacheError | None = None
    landed: dict[str, bool] = {}
    with cm.new() as work:
        try:
            work.apply(tar)
        except CacheError as e:
            err = e
        else:
            with work.mount(readonly=True) as root:
                paths = _INSIDE[name](rel) if name in _INSIDE else []
                landed = {p: _lexists(root, p) for p in paths}
                if name == "symlink-to-file":
                    assert (root / "secret-link").read_bytes() == b"replaced"
                    assert not (root / "secret-link").is_symlink()
                if name == "device-nodes":
                    mode = os.lstat(root / "dev/mem-like").st_mode
                    assert stat.S_ISCHR(mode)
    assert canary.state() == before
    if err is None:
        assert name in _INSIDE, f"{name} was applied, not refused"
        assert landed, name
        assert all(landed.values()), landed
        cm.prune(PrunePolicy(all=True))
        left = traces(client, cm)
        tally.add("hostile inputs", cases=1, applied_inside=1, traces_left=len(left))
        assert left == []
    else:
        assert name in _REFUSED, f"{name} was refused, not applied inside: {err!r}"
        settle(cm, client, err, named="Diff.Apply")
        assert isinstance(err, _REFUSED[name]), err
        assert "/hl" in str(err)
