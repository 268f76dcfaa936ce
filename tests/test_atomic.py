"""Atomic writes, stale temporaries and the release-directory path guard."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ks4release.atomic import (
    ReleasePathError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale_temporaries,
    ensure_inside,
    is_temporary_name,
    temporary_sibling,
)


def test_atomic_path_renames_on_success_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "sub" / "a.fits"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".a.fits.tmp-")
        assert tmp.suffix == ".fits"  # writers that pick the format by extension still work
        tmp.write_bytes(b"data")
        assert not final.exists()  # nothing looks finished before the block ends
    assert final.read_bytes() == b"data"
    assert os.listdir(final.parent) == ["a.fits"]


def test_atomic_path_leaves_no_file_on_exception(tmp_path):
    final = tmp_path / "a.txt"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_path_keeps_the_old_file_on_exception(tmp_path):
    final = tmp_path / "a.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("new, half")
        raise RuntimeError("boom")
    assert final.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_path_requires_something_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"), \
            atomic_path(tmp_path / "a.txt"):
        pass
    assert os.listdir(tmp_path) == []


def test_atomic_path_replaces_a_directory(tmp_path):
    final = tmp_path / "hips"
    (final / "old").mkdir(parents=True)
    with atomic_path(final) as tmp:
        (tmp / "new").mkdir(parents=True)
    assert sorted(os.listdir(final)) == ["new"]
    assert os.listdir(tmp_path) == ["hips"]


def test_atomic_write_text_and_bytes(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "t.txt"]


def test_clean_stale_temporaries_removes_only_temporaries(tmp_path):
    stale_file = temporary_sibling(tmp_path / "a.fits")
    stale_file.write_text("half")
    stale_dir = temporary_sibling(tmp_path / "hips")
    (stale_dir / "x").mkdir(parents=True)
    keep = [tmp_path / "a.fits", tmp_path / ".hidden", tmp_path / "b.tmp-1-deadbeef"]
    for path in keep:
        path.write_text("keep")
    removed = clean_stale_temporaries([tmp_path, tmp_path / "missing"])
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in keep)


@given(st.text(alphabet=st.characters(blacklist_characters="/\x00"), min_size=1, max_size=40)
       .filter(lambda s: s not in (".", "..")))
def test_temporary_names_are_recognised_and_hidden(name):
    tmp = temporary_sibling(f"/x/{name}")
    assert tmp.parent.as_posix() == "/x"
    assert tmp.name.startswith(".") and is_temporary_name(tmp.name)


def test_ensure_inside_accepts_inside_and_refuses_escapes(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    assert ensure_inside("a/b.txt", release) == release.resolve() / "a" / "b.txt"
    assert ensure_inside(release / "c", release) == release.resolve() / "c"
    for bad in ("../x.txt", "a/../../x.txt", tmp_path / "x.txt", "/etc/passwd"):
        with pytest.raises(ReleasePathError, match="outside the release directory"):
            ensure_inside(bad, release, what="output")
    (release / "link").symlink_to(tmp_path)
    with pytest.raises(ReleasePathError):
        ensure_inside("link/x.txt", release)
