"""Atomic writers and output folders: modes follow the umask, only our own outputs are replaced."""

from __future__ import annotations

import os
import stat

import pytest

from moe_empathy import utils
from moe_empathy.utils import (
    OUTPUT_MARKER,
    atomic_path,
    atomic_write_text,
    check_output_dir,
    make_temp_dir,
    replace_output_dir,
)


@pytest.fixture
def umask_022():
    """Runs the test under umask 022 (the usual default), restoring the caller's afterwards."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write(out, overwrite=False, kind="synth", text="new"):
    with replace_output_dir(out, overwrite, kind) as staging:
        (staging / "data.txt").write_text(text)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.json", "{}")
    with atomic_path(tmp_path / "b.png") as staging:
        assert staging.suffix == ".png"
        staging.write_bytes(b"x")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.png") == 0o644
    assert _mode(make_temp_dir(tmp_path, "t-")) == 0o755
    _write(tmp_path / "out")
    assert _mode(tmp_path / "out") == 0o755
    assert _mode(tmp_path / "out" / OUTPUT_MARKER) == 0o644
    os.umask(0o027)
    atomic_write_text(tmp_path / "c.json", "{}")
    assert _mode(tmp_path / "c.json") == 0o640


def test_overwrite_replaces_only_an_output_of_the_same_kind(tmp_path):
    out = tmp_path / "out"
    _write(out, text="old")
    with pytest.raises(FileExistsError, match=f"{out}.*pass --overwrite"):
        _write(out)
    _write(out, overwrite=True)
    assert (out / "data.txt").read_text() == "new"
    with pytest.raises(FileExistsError, match="is a `moe-empathy synth` output.*nothing was deleted"):
        _write(out, overwrite=True, kind="eval run")
    assert (out / "data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folders left


def test_overwrite_never_deletes_a_folder_we_did_not_write(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=f"{mine} is no `moe-empathy` output.*another --out"):
        _write(mine, overwrite=True)
    assert (mine / "cat.jpg").read_bytes() == b"precious"
    (mine / OUTPUT_MARKER).write_text("not json")  # a damaged marker is no proof either
    with pytest.raises(FileExistsError, match="no `moe-empathy` output"):
        _write(mine, overwrite=True)
    assert (mine / "cat.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_an_empty_folder_is_filled_without_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty")
    assert (tmp_path / "empty" / "data.txt").read_text() == "new"


@pytest.mark.parametrize("target", [".", "..", "sub/..", "../.."])
def test_the_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch, target):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / OUTPUT_MARKER).write_text('{"kind": "synth"}')  # even with our marker
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    with pytest.raises(FileExistsError, match="current folder or one of its parents.*--out results"):
        _write(target, overwrite=True)
    assert (work / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in work.iterdir()) == [OUTPUT_MARKER, "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["work"]


def test_a_file_or_a_link_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_output_dir(tmp_path / "file", True, "synth")
    _write(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FileExistsError, match="symbolic link"):
        _write(tmp_path / "link", overwrite=True)
    assert (tmp_path / "real" / "data.txt").is_file()


def test_a_failure_leaves_the_earlier_output_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, text="old")
    with pytest.raises(RuntimeError):
        with replace_output_dir(out, True, "synth") as staging:
            (staging / "data.txt").write_text("half")
            raise RuntimeError("killed while writing")
    assert (out / "data.txt").read_text() == "old"

    # The final rename fails (e.g. a full or read-only disk): the old folder is moved back.
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".out.tmp-" in str(src):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        _write(out, overwrite=True)
    monkeypatch.undo()
    assert (out / "data.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
