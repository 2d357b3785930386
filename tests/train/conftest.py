"""Fixtures of the training tests: a small corpus, a one-process reference run, fault injection
into the steps that write files."""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from moe_empathy.train.synth import SynthConfig, generate, write_corpus
from train_support import SUBPROCESS_ENV, write_distributed_config


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """240 template dialogues of 2-3 turns, written like `moe-empathy synth`."""
    folder = tmp_path_factory.mktemp("corpus") / "synth"
    write_corpus(generate(SynthConfig(dialogues=240, min_turns=2, max_turns=3, seed=0)), folder, {"backend": "template"})
    return folder


@pytest.fixture(scope="session")
def one_process_run(corpus_dir, tmp_path_factory) -> Path:
    """The run folder of the tiny config trained in one process on global batches of 8 dialogues
    (:func:`train_support.write_distributed_config`): the reference of the multi-process runs."""
    folder = tmp_path_factory.mktemp("one-process")
    config = write_distributed_config(corpus_dir, folder / "one.yaml", per_device_batch=8)
    command = [sys.executable, "-m", "moe_empathy.train.trainer", "--config", str(config), "--output", str(folder / "run")]
    subprocess.run(command, check=True, env=SUBPROCESS_ENV)
    return folder / "run"


class InjectedKill(BaseException):
    """Stands for SIGKILL at a write step: no ``except Exception`` of the code under test catches it."""


class _BudgetFile:
    """A file opened for writing whose writes count against the disk's free bytes."""

    def __init__(self, handle, faults: "WriteFaults", path):
        self._handle, self._faults, self._path = handle, faults, path

    def write(self, data):
        free = self._faults.free_bytes
        try:
            self._faults.spend(len(data.encode() if isinstance(data, str) else data), self._path)
        except OSError:
            self._handle.write(data[:free])  # what fits is written, like a real full disk
            raise
        return self._handle.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._handle, name)


class WriteFaults:
    """Counts every step by which the code writes to disk, and fails one on request.

    Steps: opening a file for writing, ``torch.save``, safetensors' ``save_file``, ``os.mkdir``,
    ``os.replace``, ``os.rename`` and ``shutil.rmtree``. While :meth:`armed`, each step is recorded
    in :attr:`steps`; the step numbered ``kill_at`` first calls ``before_kill`` (to photograph the
    disk as a kill would leave it) and then raises :class:`InjectedKill`; with ``free_bytes`` set,
    writes beyond it raise ``OSError(ENOSPC)`` like a full disk (what fits is written).

    Args:
        monkeypatch: pytest's monkeypatch (the patches are undone after the test).
    """

    Kill = InjectedKill

    def __init__(self, monkeypatch):
        import safetensors.torch
        import torch

        import moe_empathy.checkpoint as checkpoint
        import moe_empathy.peft_io as peft_io

        self.steps: list[str] = []
        self.active = False
        self.kill_at: int | None = None
        self.before_kill = None
        self.free_bytes: int | None = None
        real_open, real_save = builtins.open, torch.save
        real_safetensors = safetensors.torch.save_file

        def opened(file, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wax+")
            if writing:
                self.step(f"open {file}")
            handle = real_open(file, mode, *args, **kwargs)
            return _BudgetFile(handle, self, file) if writing and self.active and self.free_bytes is not None else handle

        def saved(obj, f, *args, **kwargs):
            self.step(f"torch.save {f}")
            real_save(obj, f, *args, **kwargs)
            self.spent_file(f)

        def saved_tensors(tensors, filename, *args, **kwargs):
            self.step(f"save_file {filename}")
            real_safetensors(tensors, filename, *args, **kwargs)
            self.spent_file(filename)

        monkeypatch.setattr(builtins, "open", opened)
        monkeypatch.setattr(torch, "save", saved)
        monkeypatch.setattr(safetensors.torch, "save_file", saved_tensors)
        for module in (checkpoint, peft_io):  # the modules that write safetensors files (imported by name)
            monkeypatch.setattr(module, "save_file", saved_tensors)
        for module, name in ((os, "mkdir"), (os, "replace"), (os, "rename"), (shutil, "rmtree")):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, self._counted(name, real))

    def _counted(self, name, real):
        def call(path, *args, **kwargs):
            self.step(f"{name} {path}")
            return real(path, *args, **kwargs)

        return call

    def step(self, what: str) -> None:
        """Records one write step; kills at step ``kill_at``."""
        if not self.active:
            return
        number = len(self.steps)
        self.steps.append(what)
        if number == self.kill_at:
            self.active = False  # the photograph of the disk is not a step
            if self.before_kill is not None:
                self.before_kill()
            raise InjectedKill(f"killed at write step {number}: {what}")

    def spend(self, size: int, path) -> None:
        """Takes ``size`` bytes from the free space; raises ENOSPC when they are not there."""
        if not self.active or self.free_bytes is None:
            return
        if size > self.free_bytes:
            self.free_bytes = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.free_bytes -= size

    def spent_file(self, path) -> None:
        """Charges a file written in one go; a file that did not fit is cut to the free space."""
        if not self.active or self.free_bytes is None or not isinstance(path, (str, os.PathLike)):
            return
        size = Path(path).stat().st_size
        if size > self.free_bytes:
            os.truncate(path, self.free_bytes)
        self.spend(size, path)

    @contextmanager
    def armed(self, kill_at: int | None = None, before_kill=None, free_bytes: int | None = None):
        """Records (and fails) write steps inside the block.

        Args:
            kill_at: the step to kill at (0-based), or None.
            before_kill: called just before the kill.
            free_bytes: free space of the disk, or None for no limit.
        """
        self.steps, self.kill_at, self.before_kill, self.free_bytes = [], kill_at, before_kill, free_bytes
        self.active = True
        try:
            yield self
        finally:
            self.active = False


@pytest.fixture
def write_faults(monkeypatch) -> WriteFaults:
    """A :class:`WriteFaults` patched into this test's process."""
    return WriteFaults(monkeypatch)
