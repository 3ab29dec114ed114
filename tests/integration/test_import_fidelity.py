"""Directory import keeps extended attributes: file capabilities, `user.*` and POSIX ACLs;
import and extraction name the member containerd refuses (issue 15)."""

from __future__ import annotations

import errno
import io
import os
import pathlib
import struct
import tarfile

import pytest

from pyctrd_cache import DescHandler, Descriptor, InvalidError, PrunePolicy
from pyctrd_cache.oci import import_path
from tests.fix_containerd import Managers
from tests.layers import TAR, BytesProvider, digest_of

# VFS_CAP_REVISION_2, CAP_NET_RAW (13) permitted and effective: what `setcap cap_net_raw+ep`
# writes (ping's capability).
NET_RAW = struct.pack("<IIIII", 0x02000001 | 0x1, 1 << 13, 0, 0, 0)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL in the kernel's xattr form: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


# user::rw-, user:1234:r--, group::r--, mask::r--, other::---
ACL = _acl(
    (0x01, 6, 0xFFFFFFFF),
    (0x02, 4, 1234),
    (0x04, 4, 0xFFFFFFFF),
    (0x10, 4, 0xFFFFFFFF),
    (0x20, 0, 0xFFFFFFFF),
)


def _xattrs(path: pathlib.Path) -> dict[str, bytes]:
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
        if not name.startswith(("trusted.overlay.", "security.selinux"))
    }


def test_import_of_a_directory_keeps_xattrs(managers: Managers, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    ping = src / "bin" / "ping"
    ping.write_bytes(b"\x7fELF not really")
    ping.chmod(0o755)
    os.setxattr(ping, "security.capability", NET_RAW)
    os.setxattr(ping, "user.comment", b"binary \xff\x00 value")
    os.setxattr(src / "bin", "user.dir", b"on a directory")
    shared = src / "shared"
    shared.write_text("acl")
    try:
        os.setxattr(shared, "system.posix_acl_access", ACL)
    except OSError as err:
        if err.errno != errno.ENOTSUP:
            raise
        pytest.skip("the file system of the test's temporary directory has no POSIX ACLs")
    wanted = {p: _xattrs(src / p) for p in ("bin", "bin/ping", "shared")}
    assert wanted["bin/ping"]["security.capability"] == NET_RAW

    cm = managers.open()
    with import_path(cm, src) as ref, ref.mount() as root:
        got = {p: _xattrs(root / p) for p in wanted}
    assert got == wanted


def _tar(*members: tuple[str, bytes, str]) -> bytes:
    """A tar of (name, type, link target or data) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value.encode()))
            else:
                info.linkname = value
                tar.addfile(info)
    return buf.getvalue()


HOSTILE = {
    "member": (
        _tar(("etc", tarfile.SYMTYPE, "/etc"), ("etc/passwd", tarfile.REGTYPE, "root::0:0")),
        r"member 'etc/passwd' goes through the symbolic link 'etc' -> '/etc'",
    ),
    "hard link": (
        _tar(("etc", tarfile.SYMTYPE, "../../etc"), ("pw", tarfile.LNKTYPE, "etc/passwd")),
        r"hard link 'pw' \(to 'etc/passwd'\) goes through the symbolic link 'etc'",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_import_and_extract_judge_a_looping_member_alike(
    managers: Managers, tmp_path: pathlib.Path, case: str
) -> None:
    tar, named = HOSTILE[case]
    cm = managers.open()
    path = tmp_path / "hostile.tar"
    path.write_bytes(tar)
    with pytest.raises(InvalidError, match=named):
        import_path(cm, path)

    desc = Descriptor(TAR, digest_of(tar), len(tar), {"containerd.io/uncompressed": digest_of(tar)})
    handlers = {desc.digest: DescHandler(BytesProvider(tar))}
    with (
        cm.get_by_blob(desc, desc_handlers=handlers) as ref,
        pytest.raises(InvalidError, match=named),
    ):
        ref.extract()
    assert cm.prune(PrunePolicy(all=True)) != []
    assert cm.disk_usage() == []
