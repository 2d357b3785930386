"""Small helpers shared across the package: atomic writes of files and output folders, and
reading JSON-lines files.

Everything the package writes goes through these helpers, so that

* a reader never sees a half-written file or folder, and a failed write leaves the old one intact;
* files are created with mode ``0o666 & ~umask`` and folders with ``0o777 & ~umask``, like ``open``
  and ``mkdir`` (``tempfile`` alone would make them private: 0600 and 0700);
* an output folder is replaced only when this package wrote it (it holds :data:`OUTPUT_MARKER`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OUTPUT_MARKER = ".moe-empathy-output"


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """Creates a new uniquely named folder in ``parent`` with the umask's mode (``0o777 & ~umask``).

    Use it instead of ``tempfile.mkdtemp`` for a folder that is renamed into place later.

    Args:
        parent: the folder to create it in (created if missing).
        prefix: start of its name.
    """
    Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file path beside ``path`` (same suffix) to write; when the block ends
    without error it is renamed onto ``path`` (mode ``0o666 & ~umask``), otherwise it is removed.

    Args:
        path: the file to (re)place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    staging = Path(staging)
    try:
        yield staging
        os.chmod(staging, 0o666 & ~current_umask())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder, then renames it,
    so a reader never sees a half-written file and a failed write leaves the old one intact.

    Args:
        path: the file to write.
        text: its new content.
    """
    with atomic_path(path) as staging:
        with open(staging, "w") as out:
            out.write(text)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON-lines file, one per non-blank line.

    Args:
        path: the file to read.
    """
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def atomic_write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Writes ``rows`` (dicts with the same keys, in column order) as a CSV file, atomically.

    Args:
        path: the file to write.
        rows: at least one row; the first row's keys are the header.
    """
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def _marker_kind(folder: Path) -> str | None:
    """The ``kind`` recorded in ``folder``'s marker, or None without a readable marker."""
    try:
        return json.loads((folder / OUTPUT_MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_dir(out: str | os.PathLike, overwrite: bool, kind: str) -> Path:
    """Checks that ``out`` may be written by :func:`replace_output_dir`, before any work is done.

    Allowed: a missing folder, an empty folder, and, with ``overwrite``, a folder that this
    package wrote for the same ``kind`` of output (it holds :data:`OUTPUT_MARKER`).

    Args:
        out: the output folder.
        overwrite: whether an earlier output of ours may be replaced.
        kind: what is written (``synth``, ``eval run``); only an output of the same kind is replaced.

    Returns:
        ``out`` as a path.

    Raises:
        FileExistsError: ``out`` cannot be used; the message names it and the fix.
    """
    out = Path(out)
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FileExistsError(
            f"--out {out} is the current folder or one of its parents; it is never replaced. "
            "Pass a new folder, e.g. --out results"
        )
    if out.is_symlink():
        raise FileExistsError(f"--out {out} is a symbolic link; pass the folder it points to, or a new folder")
    if not out.exists():
        return out
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return out
    if not overwrite:
        raise FileExistsError(
            f"--out {out} already exists; pass --overwrite to replace it (only an earlier "
            f"`moe-empathy {kind}` output is replaced), or choose another folder"
        )
    found = _marker_kind(out)
    if found != kind:
        what = "no `moe-empathy` output" if found is None else f"a `moe-empathy {found}` output"
        raise FileExistsError(
            f"--out {out} is {what} (no {OUTPUT_MARKER} file of `moe-empathy {kind}`), so --overwrite "
            "will not replace it and nothing was deleted; choose another --out, or remove the folder "
            "yourself if you no longer need it"
        )
    return out


@contextmanager
def replace_output_dir(out: str | os.PathLike, overwrite: bool, kind: str) -> Iterator[Path]:
    """Yields an empty staging folder beside ``out``; when the block ends without error, the
    marker file is added and the folder takes the place of ``out`` (an earlier output of the
    same kind is moved aside, then deleted). On error ``out`` is left as it was.

    Args:
        out: the output folder; checked with :func:`check_output_dir`.
        overwrite: whether an earlier output of ours may be replaced.
        kind: what is written (``synth``, ``eval run``), recorded in the marker.

    Raises:
        FileExistsError: ``out`` cannot be used (see :func:`check_output_dir`).
    """
    out = check_output_dir(out, overwrite, kind)
    staging = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield staging
        atomic_write_text(staging / OUTPUT_MARKER, json.dumps({"kind": kind, "written_by": f"moe-empathy {kind}"}) + "\n")
        move_into_place(staging, check_output_dir(out, overwrite, kind))  # re-checked: it may have changed meanwhile
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Renames the complete folder ``staging`` to ``target``. An existing ``target`` is first
    moved into a new folder beside it and deleted once ``staging`` is in place; if that rename
    fails, ``target`` is moved back. Callers check that ``target`` is theirs to replace.

    Args:
        staging: a folder beside ``target`` (same file system), e.g. from :func:`make_temp_dir`.
        target: the folder to (re)place.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    trash = make_temp_dir(target.parent, f".{target.name}.old-")
    os.replace(target, trash / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(trash / target.name, target)
        trash.rmdir()
        raise
    shutil.rmtree(trash)
