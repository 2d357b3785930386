"""Two CPU processes under `accelerate launch` train like one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from train_support import CONFIGS, corpus_dir  # noqa: F401  (fixture)

STEPS = 20


def _config(corpus, tmp_path, name: str, batch: int):
    values = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    values["data"]["path"] = str(corpus)
    values["data"].pop("synthesize")
    values["data"]["max_eval_dialogues"] = 8
    values["training"].update(
        max_steps=STEPS, per_device_train_batch_size=batch, logging_steps=1, eval_steps=STEPS, progress_bar=False
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _losses(run) -> dict[int, float]:
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {log["step"]: log["loss"] for log in logs if "loss" in log and "eval_loss" not in log}


@pytest.mark.slow
def test_two_processes_reach_the_loss_of_one(corpus_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    module = ["-m", "moe_empathy.train.trainer"]
    one = _config(corpus_dir, tmp_path, "one", batch=8)
    two = _config(corpus_dir, tmp_path, "two", batch=4)
    subprocess.run([sys.executable, *module, "--config", str(one), "--output", str(tmp_path / "one")], check=True, env=env)
    # `--multi_gpu` picks accelerate's torchrun launcher; without CUDA the trainer joins a gloo group
    # on the CPU (`--cpu` alone starts a single process unless MPI is set up).
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    subprocess.run([*launch, *module, "--config", str(two), "--output", str(tmp_path / "two")], check=True, env=env)
    single, double = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(single) == sorted(double) == list(range(1, STEPS + 1))
    assert double[STEPS] == pytest.approx(single[STEPS], rel=1e-4)
    assert double[1] == pytest.approx(single[1], rel=1e-5)
    assert (tmp_path / "two" / "last" / "experts.safetensors").is_file()
