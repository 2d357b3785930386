"""Two CPU processes under `accelerate launch`, data parallel (DDP) or sharded (FSDP), train like one
process on the same global batch, and the sharded run saves the full experts and gate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_support import CONFIGS, DISTRIBUTED_STEPS, SUBPROCESS_ENV, train_losses, write_distributed_config

from moe_empathy.checkpoint import COMPACT_WEIGHTS
from moe_empathy.modeling_moe_empathy import MoeEmpathyForCausalLM

FSDP_ON_CPU = Path(__file__).with_name("fsdp_on_cpu.py")
TRAINER = ["-m", "moe_empathy.train.trainer"]


def _launch(accelerate_args: list[str], script: list[str], config: Path, output: Path, resume: Path | None = None) -> None:
    launch = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args]
    arguments = ["--config", str(config), "--output", str(output)] + (["--resume", str(resume)] if resume else [])
    subprocess.run([*launch, *script, *arguments], check=True, env=SUBPROCESS_ENV)


def _assert_same_losses(single: dict[int, float], double: dict[int, float]) -> None:
    assert sorted(single) == sorted(double) == list(range(1, DISTRIBUTED_STEPS + 1))
    assert double[1] == pytest.approx(single[1], rel=1e-5)
    assert double[DISTRIBUTED_STEPS] == pytest.approx(single[DISTRIBUTED_STEPS], rel=1e-4)


@pytest.mark.slow
def test_two_processes_reach_the_loss_of_one(one_process_run, corpus_dir, tmp_path):
    config = write_distributed_config(corpus_dir, tmp_path / "two.yaml", per_device_batch=4)
    # `--multi_gpu` picks accelerate's torchrun launcher; without CUDA the trainer joins a gloo group
    # on the CPU (`--cpu` alone starts a single process unless MPI is set up).
    _launch(
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29517"],
        TRAINER, config, tmp_path / "two",
    )
    _assert_same_losses(train_losses(one_process_run), train_losses(tmp_path / "two"))
    assert (tmp_path / "two" / "last" / COMPACT_WEIGHTS).is_file()


@pytest.mark.slow
def test_fsdp_over_two_processes_trains_like_one_saves_the_full_experts_and_resumes_exactly(one_process_run, corpus_dir, tmp_path):
    # The shipped launch config, on 2 CPU processes in float32.
    launch = yaml.safe_load((CONFIGS / "accelerate-fsdp.yaml").read_text())
    launch.update(num_processes=2, mixed_precision="no", main_process_port=29518)
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(launch))
    config = write_distributed_config(corpus_dir, tmp_path / "two.yaml", per_device_batch=4)
    run = tmp_path / "two"
    _launch(["--config_file", str(tmp_path / "fsdp.yaml")], [str(FSDP_ON_CPU)], config, run)
    _assert_same_losses(train_losses(one_process_run), train_losses(run))
    # Written only by the Trainer's FSDP path (the model and optimizer state of accelerate's FSDP):
    # the run was sharded.
    assert (run / f"checkpoint-{DISTRIBUTED_STEPS}" / "pytorch_model_fsdp.bin").is_file()

    # Each process held half of every expert and gate tensor; the saved ones are whole: the same
    # names and shapes as the one-process run's. They equal them up to float32 sums taken in
    # another order (the two halves of a batch reduced across processes), about 1e-7 relative
    # per step, which 20 Adam steps grow to about 1e-5 (measured: 6e-6); a shard, a stale or an
    # untrained tensor is off by order 1.
    reference = load_file(one_process_run / "last" / COMPACT_WEIGHTS)
    saved = load_file(run / "last" / COMPACT_WEIGHTS)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    for name, tensor in reference.items():
        assert (saved[name] - tensor).norm() <= 1e-4 * tensor.norm(), name
    assert all(saved[name].abs().sum() > 0 for name in saved if ".lora_B" in name)  # trained (B starts at zero)
    checkpoint = load_file(run / f"checkpoint-{DISTRIBUTED_STEPS}" / COMPACT_WEIGHTS)
    assert all(torch.equal(checkpoint[name], saved[name]) for name in saved)

    model = MoeEmpathyForCausalLM.from_pretrained(run / "last")
    loaded = model.expert_state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)

    # Resumed from the checkpoint at the half (each process loads its shards of the saved tensors,
    # and accelerate's FSDP optimizer state), the second half is repeated bit for bit.
    losses = train_losses(run)
    _launch(["--config_file", str(tmp_path / "fsdp.yaml")], [str(FSDP_ON_CPU)], config, run, resume=run / f"checkpoint-{DISTRIBUTED_STEPS // 2}")
    assert train_losses(run) == losses
    resumed = load_file(run / "last" / COMPACT_WEIGHTS)
    assert all(torch.equal(resumed[name], saved[name]) for name in saved)
