import pytest

from moe_empathy.bench_model import summarise
from moe_empathy.cli import build_parser, main


def test_every_subcommand_is_registered():
    parser = build_parser()
    for argv in (
        ["demo"],
        ["chat"],
        ["info", "--no-model"],
        ["synth", "--out", "x"],
        ["eval", "scorers"],
        ["bench", "model"],
        ["bench", "kernels"],
    ):
        assert callable(parser.parse_args(argv).func)


def test_info_without_model_runs(capsys):
    assert main(["info", "--no-model"]) == 0
    assert "transformers" in capsys.readouterr().out


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().out


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
