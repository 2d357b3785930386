"""The decode-step benchmark on the tiny model: settings, routing checks, outputs."""

import csv

import pytest
import torch

from moe_empathy import bench_decode
from moe_empathy.utils import atomic_write_csv

from .conftest import tiny_base


@pytest.fixture(scope="module")
def systems(tokenizer):
    return bench_decode.build_systems(tiny_base(), tokenizer, [2, 4], rank=4)


def test_every_setting_is_measured_against_the_base_of_the_same_round(systems):
    rows = bench_decode.measure(systems, [1, 2], [8, 16], steps=2, repeats=1, vocab=49152)
    settings = {(r["batch"], r["mixture"], r["context"]) for r in rows}
    assert settings == {(1, "fold", 8), (1, "fold", 16), (2, "fold", 8), (2, "fold", 16), (2, "per_row", 8), (2, "per_row", 16)}
    assert {r["system"] for r in rows} == {"base", "base_copy", "gated_2_layers", "gated_4_layers"}
    for row in rows:
        assert row["ratio_low"] <= row["tokens_per_s_vs_base"] <= row["ratio_high"]
        base = next(r for r in rows if r["system"] == "base" and (r["batch"], r["mixture"], r["context"]) == (row["batch"], row["mixture"], row["context"]))
        assert row["overhead_ms"] == pytest.approx(row["step_ms"] - base["step_ms"], abs=2e-3)
        assert row["steps"] == 2


def test_the_median_interval_holds_the_median_and_narrows_with_more_pairs():
    generator = torch.Generator().manual_seed(0)
    few, many = (1.0 + 0.05 * torch.randn(n, generator=generator) for n in (16, 1024))
    low_few, high_few = bench_decode.median_interval(few.tolist())
    low_many, high_many = bench_decode.median_interval(many.tolist())
    assert low_few <= few.median().item() <= high_few
    assert low_many <= 1.0 <= high_many
    assert high_many - low_many < high_few - low_few
    assert bench_decode.median_interval([0.97] * 8) == pytest.approx((0.97, 0.97))


@pytest.mark.parametrize("fold", [True, False])
def test_a_step_routes_as_its_setting_says_and_keeps_the_context(systems, fold):
    step = bench_decode.DecodeStep(systems["gated_2_layers"], batch=3, context=12, vocab=49152, fold=fold)
    assert bench_decode._shares_one_mixture(step.model, step.cache) == fold
    for _ in range(3):
        step()
        assert step.cache.get_seq_length() == 12  # cropped back after every step


def test_outputs_and_bad_layer_counts(systems, tokenizer, tmp_path):
    rows = bench_decode.measure(systems, [1], [8], steps=1, repeats=1, vocab=49152)
    atomic_write_csv(tmp_path / "decode.csv", rows)
    bench_decode.plot(tmp_path / "decode.png", rows)
    with open(tmp_path / "decode.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert (tmp_path / "decode.png").read_bytes()[:4] == b"\x89PNG"
    report = bench_decode.profile_steps({k: systems[k] for k in ("base", "gated_2_layers")}, [1], 8, 49152, steps=1)
    assert "## base, batch 1" in report and "## gated_2_layers, batch 1" in report
    assert report.count("| operator | ms/step | calls/step |") == 2
    assert "layers.py" in report or "no Python frames" in report  # torch 2.14's profiler records no Python frames
    with pytest.raises(ValueError, match="outside 1..4"):
        bench_decode.build_systems(tiny_base(), tokenizer, [5], rank=4)


def test_the_narrow_base_keeps_the_depth_and_architecture(tokenizer):
    base = tiny_base()
    narrow = bench_decode.narrow_base(base)
    assert type(narrow) is type(base)
    assert narrow.config.num_hidden_layers == base.config.num_hidden_layers
    assert narrow.config.hidden_size == 64 and narrow.config.vocab_size == base.config.vocab_size
    systems = bench_decode.build_systems(narrow, tokenizer, [base.config.num_hidden_layers], rank=4)
    rows = bench_decode.measure(systems, [1], [8], steps=1, repeats=1, vocab=narrow.config.vocab_size)
    assert {r["system"] for r in rows} == {"base", "base_copy", f"gated_{base.config.num_hidden_layers}_layers"}
    assert all(r["step_ms"] > 0 for r in rows)
