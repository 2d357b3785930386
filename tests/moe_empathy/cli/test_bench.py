"""``moe-empathy bench``: each benchmark that runs on the tiny model leaves no temporary file."""

import json

import pytest

from moe_empathy.cli import main


@pytest.mark.integration
def test_bench_train_runs_and_cleans_up(tiny_bench_config, system_temp, tmp_path):
    out = tmp_path / "bench" / "train.json"
    assert main(["bench", "train", "--config", str(tiny_bench_config), "--steps", "1", "--warmup", "0", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["tokens_per_second"]) == {"gated (3 experts)", "single LoRA", "peft X-LoRA (3 experts)"}
    assert all(rate > 0 for rate in result["tokens_per_second"].values())
    assert list(system_temp.iterdir()) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.json"]


@pytest.mark.integration
def test_bench_prefix_runs_and_cleans_up(tiny_bench_config, system_temp, tmp_path):
    out = tmp_path / "bench-prefix"
    argv = ["bench", "prefix", "--config", str(tiny_bench_config), "--gate-layers", "1", "--goal-layer", "2",
            "--lengths", "256", "--steps", "1", "--warmup", "0", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "bench_prefix.json").read_text())["rows"]
    assert [(r["gate_layer"], r["length"]) for r in rows] == [(1, 256), (2, 256)]
    assert list(system_temp.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["bench_prefix.csv", "bench_prefix.json", "bench_prefix.png"]


def test_bench_kernels_writes_only_its_outputs(system_temp, tmp_path):
    out = tmp_path / "bench-kernels"
    argv = ["bench", "kernels", "--tokens", "16", "--hidden", "32", "--rank", "4", "--experts", "2", "--modes", "dense",
            "--passes", "fwd", "--methods", "reference,base", "--warmup", "1", "--rep", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    assert list(system_temp.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["bench_dense.png", "results.csv"]
