"""The progress of an ``eval run``, kept so that an interrupted run can be resumed (``--resume``).

While the rollouts run, a folder beside the output folder (``OUT.partial``) holds

* ``settings.json``: everything that determines the results (written once, when the run
  starts; a resumed run must give the same, else it is refused naming the keys that differ);
* ``<system>.jsonl`` (``<system>.<mode>.jsonl`` for the ``--compare-reencode`` probe): one line
  per finished batch of dialogues (:func:`~.rollout.make_batches` order), with that batch's
  rollouts and throughput counters, appended, flushed and fsynced line by line.

A resumed run reads the finished batches back and computes only the rest. A last line cut
off mid-write (the process was killed while writing it) is dropped, and that batch is
computed again. The folder is removed once the report is in place.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from moe_empathy.train.config import changed_keys
from moe_empathy.train.synth_llm import read_progress
from moe_empathy.utils import atomic_write_text, make_temp_dir

from .rollout import DialogueRollout, RolloutStats

PROGRESS_SUFFIX = ".partial"
SETTINGS_FILE = "settings.json"
KIND = "eval run progress"  # recorded in settings.json, so that only our own folder is resumed or removed


def progress_dir(out: str | os.PathLike) -> Path:
    """The progress folder of the output folder ``out``: ``OUT.partial`` beside it.

    Args:
        out: the output folder of ``eval run``.
    """
    out = Path(out)
    return out.with_name(out.name + PROGRESS_SUFFIX)


def check_progress(out: str | os.PathLike, resume: bool) -> Path:
    """Checks, before any work is done, that a run writing to ``out`` may start (no progress
    of an interrupted run is there) or, with ``resume``, has progress to continue.

    Args:
        out: the run's output folder (the progress folder is beside it).
        resume: continue an interrupted run instead of starting a new one.

    Returns:
        The progress folder.

    Raises:
        FileExistsError: without ``resume``, when a progress folder is already there.
        FileNotFoundError: with ``resume``, when there is no progress to continue.
    """
    folder = progress_dir(out)
    if not resume and (folder.exists() or folder.is_symlink()):
        raise FileExistsError(
            f"{folder} exists: it holds the progress of an interrupted `eval run` to {out}. Pass --resume "
            f"(with the same arguments) to continue that run, or remove {folder} to start over"
        )
    if resume and not (folder / SETTINGS_FILE).is_file():
        raise FileNotFoundError(
            f"--resume: no progress of an interrupted `eval run` to {out} (no {folder / SETTINGS_FILE}); the "
            "progress is kept beside --out while a run goes on and removed when it finishes. Pass the --out of "
            "the interrupted run, or run without --resume to start"
        )
    return folder


class RunProgress:
    """Finished batches of one ``eval run``, read from and appended to its progress folder.

    Use :meth:`start` to create or reopen one.

    Args:
        folder: the progress folder (it holds ``settings.json``).
    """

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def start(cls, out: str | os.PathLike, settings: dict, resume: bool) -> "RunProgress":
        """Opens the progress of a run writing to ``out``: a new folder, or with ``resume`` the
        folder of an interrupted run with the same settings.

        Args:
            out: the run's output folder (the progress folder is beside it).
            settings: everything that determines the run's results (JSON values).
            resume: continue an interrupted run instead of starting a new one.

        Raises:
            FileExistsError: without ``resume``, when a progress folder is already there.
            FileNotFoundError: with ``resume``, when there is no progress to continue.
            ValueError: with ``resume``, when the settings differ from the recorded ones.
        """
        folder = check_progress(out, resume)
        record = folder / SETTINGS_FILE
        settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
        if not resume:
            staging = make_temp_dir(folder.parent, f".{folder.name}.tmp-")
            atomic_write_text(staging / SETTINGS_FILE, json.dumps({"kind": KIND, "settings": settings}, indent=1) + "\n")
            os.rename(staging, folder)
            return cls(folder)
        recorded = json.loads(record.read_text())
        if not isinstance(recorded, dict) or recorded.get("kind") != KIND:
            raise ValueError(f"{record} was not written by `eval run`; remove {folder} or choose another --out")
        changed = changed_keys(recorded["settings"], settings, ignore=())
        if changed:
            raise ValueError(
                f"--resume: the arguments differ from those of the interrupted run in {record} in {changed}; "
                f"resume with the same arguments, or remove {folder} to start over"
            )
        return cls(folder)

    def _file(self, key: str) -> Path:
        return self.folder / f"{key}.jsonl"

    def finished(self, key: str, batches: list[list[int]], records: list[dict]) -> dict[int, tuple[list[DialogueRollout], RolloutStats]]:
        """The batches an earlier session finished, checked against the batches of this run.

        A last line cut off mid-write is dropped from the file (its batch is computed again).

        Args:
            key: the rollout's name (the system, plus the mode for the ``--compare-reencode`` probe).
            batches: the indices of the records in each batch (:func:`~.rollout.make_batches`).
            records: the run's dialogue records.

        Returns:
            ``{batch index: (rollouts in batch order, the batch's throughput counters)}``.

        Raises:
            ValueError: a line names a batch twice or does not match this run's batches.
        """
        path = self._file(key)
        done = {}
        for n, line in enumerate(read_progress(path), 1):
            index = line["batch"]
            expected = batches[index] if isinstance(index, int) and 0 <= index < len(batches) else None
            ids = [r["dialogue_id"] for r in line["rollouts"]]
            if expected is None or line["dialogues"] != expected or ids != [str(records[i].get("dialogue_id", i)) for i in expected]:
                raise ValueError(f"{path} line {n}: batch {index} does not match this run's batches; remove {self.folder} to start over")
            if index in done:
                raise ValueError(f"{path} line {n}: batch {index} is recorded twice; remove {self.folder} to start over")
            done[index] = ([DialogueRollout(**r) for r in line["rollouts"]], RolloutStats(**line["stats"]))
        return done

    def record(self, key: str, index: int, batch: list[int], rollouts: list[DialogueRollout], stats: RolloutStats) -> None:
        """Appends a finished batch as one line, flushed and fsynced before returning.

        Args:
            key: the rollout's name (see :meth:`finished`).
            index: the batch's position in :func:`~.rollout.make_batches` order.
            batch: the indices of its records.
            rollouts: its rollouts, in batch order.
            stats: its throughput counters.
        """
        line = {"batch": index, "dialogues": batch, "stats": asdict(stats), "rollouts": [asdict(r) for r in rollouts]}
        with open(self._file(key), "a") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        """Deletes the progress folder (its settings and progress files) once the report is in place."""
        for path in self.folder.glob("*.jsonl"):
            path.unlink()
        (self.folder / SETTINGS_FILE).unlink()
        self.folder.rmdir()
