"""``moe-empathy bench model``: the ratios against each kind's reference."""

import pytest

from moe_empathy.bench_model import summarise


def test_benchmark_ratios_are_against_the_right_reference():
    samples = {
        ("generate", "base", 1): [1.0, 2.0, 3.0],
        ("generate", "ours", 1): [4.0, 4.0, 4.0],
        ("train_step", "peft_lora", 4): [2.0],
        ("train_step", "ours", 4): [3.0],
    }
    rows = {(r["kind"], r["system"]): r for r in summarise(samples, new_tokens=10, train_tokens=100)}
    assert rows[("generate", "base")]["tokens_per_s"] == pytest.approx(5.0)
    assert rows[("generate", "ours")]["vs_reference"] == pytest.approx(0.5)
    assert rows[("train_step", "ours")]["vs_reference"] == pytest.approx(1.5)
    assert rows[("generate", "ours")]["overhead_ms_per_token"] == pytest.approx((4.0 - 2.0) * 1e3 / 10)
    assert rows[("generate", "base")]["overhead_ms_per_token"] == 0.0
    assert rows[("train_step", "ours")]["overhead_ms_per_token"] is None
