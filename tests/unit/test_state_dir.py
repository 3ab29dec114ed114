"""The state directory is the tool's own (issue 16): one owned by another user, writable by
others, or a symlink is refused, as ssh and gpg refuse theirs, and a symlink planted inside
it (where the lock, the database, its journal files, or the manager id's temporary file go)
is refused or removed, never followed: files outside stay as they were."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

from pyctrd_cache import InvalidError
from pyctrd_cache.metadata import DB_NAME, ID_NAME, LOCK_NAME, MetadataStore
from tests.hostile_fix import refused

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
NOBODY = 65534


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@needs_root
def test_a_state_directory_of_another_user_is_refused(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    state.chmod(0o777)
    with pytest.raises(InvalidError) as info:
        MetadataStore(state)
    after = os.stat(state)
    refused(
        (after.st_uid, _mode(state)) == (NOBODY, 0o777) and list(state.iterdir()) == [],
        (after.st_uid, oct(_mode(state)), list(state.iterdir())),
    )
    assert "owned by uid 65534" in str(info.value)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_state_directory_others_can_write_is_refused(tmp_path: pathlib.Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(InvalidError) as info:
        MetadataStore(state)
    refused(_mode(state) == mode and list(state.iterdir()) == [], oct(_mode(state)))
    assert "lets others write" in str(info.value)


def test_a_state_directory_that_is_a_symlink_is_refused(tmp_path: pathlib.Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    (tmp_path / "state").symlink_to(elsewhere)
    with pytest.raises(InvalidError):
        MetadataStore(tmp_path / "state")
    refused(list(elsewhere.iterdir()) == [] and _mode(elsewhere) == 0o755)


@pytest.mark.parametrize(
    "name", [LOCK_NAME, DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", ID_NAME, ID_NAME + ".tmp"]
)
def test_symlinks_planted_in_the_state_directory_are_not_followed(
    tmp_path: pathlib.Path, name: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o644)
    (state / name).symlink_to(victim)
    try:
        MetadataStore(state).close()
        error: BaseException | None = None
    except InvalidError as err:
        error = err
    intact = victim.read_bytes() == b"precious\n" and _mode(victim) == 0o644
    # The temporary file of the manager id is removed and made anew; every other name is
    # refused.
    if name == ID_NAME + ".tmp":
        ok = error is None and not (state / name).exists() and (state / ID_NAME).is_file()
    else:
        ok = isinstance(error, InvalidError) and "symlink" in str(error)
    refused(intact and ok, (error, victim.read_bytes(), oct(_mode(victim))))


def test_a_missing_lock_target_is_not_created(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "created-outside"
    (state / LOCK_NAME).symlink_to(target)
    with pytest.raises(InvalidError):
        MetadataStore(state)
    refused(not target.exists())


def test_the_users_own_directory_is_narrowed_and_used(tmp_path: pathlib.Path) -> None:
    """The control: a directory of the user's that others may only read becomes 0700."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    MetadataStore(state).close()
    assert _mode(state) == 0o700
    assert {ID_NAME, LOCK_NAME, DB_NAME} <= {p.name for p in state.iterdir()}
