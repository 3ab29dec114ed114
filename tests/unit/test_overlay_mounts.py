"""When the overlay upper directory's route may be taken, from the mounts alone."""

from __future__ import annotations

import pathlib

import pytest

from pyctrd_cache.cache.overlay_diff import overlay_layers, parent_mount, upper_dir
from pyctrd_cache.client import Mount


def overlay(*options: str) -> Mount:
    return Mount("overlay", "overlay", options)


def test_layers_are_bottom_first_with_the_upper_directory_last() -> None:
    m = overlay("index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l2:/l1")
    assert overlay_layers(m) == ["/l1", "/l2", "/u"]
    assert overlay_layers(overlay("lowerdir=/top:/bottom", "userxattr")) == ["/bottom", "/top"]


@pytest.mark.parametrize("option", ["redirect_dir=on", "metacopy=on", "index=on", "volatile"])
def test_an_unknown_option_refuses_the_route(option: str) -> None:
    assert overlay_layers(overlay("index=off", "lowerdir=/a:/b", option)) is None


def test_the_parent_mount_is_the_view_containerd_would_give() -> None:
    assert parent_mount([overlay("index=off", "lowerdir=/s2:/s1")]) == [
        Mount("bind", "/s1", ("ro", "rbind"))
    ]
    assert parent_mount([overlay("index=off", "lowerdir=/s3:/s2:/s1")]) == [
        overlay("lowerdir=/s2:/s1")
    ]
    assert parent_mount([Mount("bind", "/s1", ("ro", "rbind"))]) == []
    assert parent_mount([overlay("lowerdir=/s1"), overlay("lowerdir=/s2")]) == []


def test_the_upper_directory_and_why_there_is_none(tmp_path: pathlib.Path) -> None:
    s1, s2, s3 = (tmp_path / n for n in ("s1", "s2", "s3"))
    for d in (s1, s2, s3):
        d.mkdir()
    upper = [overlay("index=off", f"lowerdir={s3}:{s2}:{s1}")]
    assert upper_dir(parent_mount(upper), upper) == (str(s3), "")
    assert upper_dir([], upper)[1].startswith("no parent")
    other = [overlay("index=off", f"lowerdir={s2}:{s3}")]
    assert "not the parent's" in upper_dir(other, upper)[1]
    gone = [overlay("index=off", f"lowerdir={tmp_path / 'gone'}:{s2}:{s1}")]
    assert "not a readable directory here" in upper_dir(parent_mount(gone), gone)[1]
    assert "of type tmpfs" in upper_dir([Mount("tmpfs", "tmpfs")], upper)[1]
