"""Fault injection into training: a checkpoint save killed at every write step, and a disk that
fills up during a save. The newest complete checkpoint must always load, resuming from it must
give the uninterrupted run's parameters and losses exactly, and nothing earlier may be damaged."""

from __future__ import annotations

import errno
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moe_empathy.train.hf_trainer import MoeEmpathyTrainer
from moe_empathy.train.run import resolve_resume
from moe_empathy.train.trainer import train
from train_support import tiny_config

pytestmark = pytest.mark.integration

SAVE_STEP = 4  # the save that is interrupted; checkpoint-2 is the one before it
RUN_FILES = ("config.yaml", "log.jsonl")


def _config(corpus):
    return tiny_config(
        corpus,
        training={"max_steps": 6, "eval_steps": 2, "logging_steps": 1, "save_total_limit": 3},
        data={"max_eval_dialogues": 8, "max_train_dialogues": 64},
    )


def _losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "eval_loss" not in r}


def _copy_run_before_save(reference, folder) -> None:
    """``folder`` as the run folder was when the save of checkpoint-4 began."""
    folder.mkdir()
    shutil.copytree(reference / "checkpoint-2", folder / "checkpoint-2")
    for name in RUN_FILES:
        shutil.copy2(reference / name, folder / name)


def _check_latest(folder, reference) -> int:
    """Asserts that the newest complete checkpoint of ``folder`` loads and equals the reference's
    checkpoint of the same step; returns that step."""
    latest = resolve_resume(folder)
    step = int(latest.rsplit("-", 1)[1])
    assert step in (2, SAVE_STEP), latest
    state = json.loads((folder / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step
    experts, expected = load_file(f"{latest}/experts.safetensors"), load_file(str(reference / f"checkpoint-{step}" / "experts.safetensors"))
    assert experts.keys() == expected.keys() and all(torch.equal(experts[k], expected[k]) for k in expected)
    optimizer = torch.load(f"{latest}/optimizer.pt", weights_only=True)
    reference_optimizer = torch.load(reference / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
    for a, b in zip(optimizer["state"].values(), reference_optimizer["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert (folder / "config.yaml").read_bytes() == (reference / "config.yaml").read_bytes()
    return step


def test_a_save_killed_at_any_write_step_leaves_a_loadable_checkpoint_and_resume_is_exact(corpus_dir, tmp_path, write_faults, monkeypatch):
    config = _config(corpus_dir)
    reference = tmp_path / "reference"
    real_save = MoeEmpathyTrainer._save_checkpoint
    left = []  # run folders as a kill (no clean-up) or a failure (clean-up ran) at one write step left them

    def save_with_faults(self, model, trial):
        if self.state.global_step == SAVE_STEP and not left:
            counted = tmp_path / "counted"
            _copy_run_before_save(reference, counted)
            self.args.output_dir = str(counted)
            with write_faults.armed():
                real_save(self, model, trial)
            steps = list(write_faults.steps)
            assert len(steps) >= 10, steps  # files, renames and clean-up of one save
            # Before every write step once, in a seeded order, and after the last; at least 20 points.
            points = random.Random(13).sample(range(len(steps) + 1), len(steps) + 1)
            points += random.Random(14).choices(range(len(steps) + 1), k=max(0, 20 - len(points)))
            for index, point in enumerate(points):
                killed, failed = tmp_path / f"killed-{index}", tmp_path / f"failed-{index}"
                _copy_run_before_save(reference, failed)
                self.args.output_dir = str(failed)
                photograph = lambda: shutil.copytree(failed, killed, symlinks=True)  # noqa: E731
                if point == len(steps):  # killed just after the save
                    real_save(self, model, trial)
                    photograph()
                    left.append(killed)
                    continue
                with pytest.raises(write_faults.Kill), write_faults.armed(kill_at=point, before_kill=photograph):
                    real_save(self, model, trial)
                left.extend([killed, failed])
            self.args.output_dir = str(reference)
        real_save(self, model, trial)

    monkeypatch.setattr(MoeEmpathyTrainer, "_save_checkpoint", save_with_faults)
    train(config, reference)
    monkeypatch.setattr(MoeEmpathyTrainer, "_save_checkpoint", real_save)
    assert len(left) >= 2 * 20 - 1  # >= 20 points: a killed and a failed folder each (one only after the save)

    latest = {folder: _check_latest(folder, reference) for folder in left}
    assert set(latest.values()) == {2, SAVE_STEP}  # kills before and after the final rename
    expected_losses = _losses(reference)
    for step in (2, SAVE_STEP):
        folder = next(f for f, s in latest.items() if s == step)
        train(config, folder, resume=folder)
        final, expected = load_file(str(folder / "checkpoint-6" / "experts.safetensors")), load_file(str(reference / "checkpoint-6" / "experts.safetensors"))
        assert all(torch.equal(final[k], expected[k]) for k in expected), step
        assert _losses(folder) == expected_losses
        assert not list(folder.glob("tmp-*")) and not list(folder.glob(".*old-*"))


def test_a_full_disk_during_a_save_damages_nothing_and_says_so(corpus_dir, tmp_path, write_faults, monkeypatch):
    config = _config(corpus_dir)
    config.training.max_steps = SAVE_STEP
    reference = tmp_path / "reference"
    real_save = MoeEmpathyTrainer._save_checkpoint
    checked = []

    def save_on_full_disks(self, model, trial):
        if self.state.global_step == SAVE_STEP:
            size = sum(p.stat().st_size for p in (reference / "checkpoint-2").iterdir())
            for free in (0, 100, size // 3, size - 1):  # checkpoint-4 is a little larger than checkpoint-2
                run = tmp_path / f"free-{free}"
                _copy_run_before_save(reference, run)
                self.args.output_dir = str(run)
                with pytest.raises(OSError) as failure, write_faults.armed(free_bytes=free):
                    real_save(self, model, trial)
                message = str(failure.value)
                assert failure.value.errno == errno.ENOSPC, message
                assert f"no space left on the disk while saving checkpoint-{SAVE_STEP} in {run}" in message
                assert "checkpoint-2 and earlier are intact" in message and f"--resume {run}" in message
                checked.append(run)
            self.args.output_dir = str(reference)
        real_save(self, model, trial)

    monkeypatch.setattr(MoeEmpathyTrainer, "_save_checkpoint", save_on_full_disks)
    train(config, reference)
    monkeypatch.setattr(MoeEmpathyTrainer, "_save_checkpoint", real_save)
    assert len(checked) == 4
    for run in checked:
        assert sorted(p.name for p in run.iterdir()) == sorted(["checkpoint-2", *RUN_FILES])  # partial save removed
        assert _check_latest(run, reference) == 2


def test_an_llm_synth_run_cut_by_a_full_disk_resumes_without_loss_or_duplicates(tmp_path, tokenizer, write_faults):
    from moe_empathy.train.synth_llm import LLMSynthConfig, generate_llm, read_progress
    from moe_empathy.train.synth_plan import SynthConfig, plans
    from tests.moe_empathy.conftest import tiny_base

    config, llm = SynthConfig(dialogues=8, min_turns=1, max_turns=2, seed=5), LLMSynthConfig(batch_size=3, max_new_tokens=3)
    chat_model = (tiny_base(vocab_size=len(tokenizer)), tokenizer)
    expected = {p.dialogue_id for p in plans(config)}
    for free in random.Random(7).sample(range(200, 4_000), 3):  # the disk fills mid-record
        progress = tmp_path / f"free-{free}.partial.jsonl"
        with pytest.raises(OSError, match="No space left"), write_faults.armed(free_bytes=free):
            generate_llm(config, llm, progress, model=chat_model)
        assert not progress.read_text().endswith("\n")  # the last record was cut off
        kept = read_progress(progress)  # drops the cut-off line
        by_split = generate_llm(config, llm, progress, model=chat_model)
        ids = [json.loads(line)["dialogue_id"] for line in progress.read_text().splitlines()]
        assert len(ids) == len(set(ids)) == config.dialogues and set(ids) == expected
        records = {r["dialogue_id"]: r for split in by_split.values() for r in split}
        assert set(records) == expected and all(records[r["dialogue_id"]] == r for r in kept)
