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
        ["eval", "run", "--model", "m", "--out", "o"],
        ["inspect", "--model", "m", "--dialogue", "d.json"],
        ["train", "--config", "c.yaml"],
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


@pytest.fixture
def saved_model(model, tokenizer, tmp_path):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_demo_writes_transcript_and_plot(saved_model, tmp_path):
    import json

    assert main(["demo", "--model", str(saved_model), "--out", str(tmp_path / "demo"), "--max-new-tokens", "3"]) == 0
    data = json.loads((tmp_path / "demo" / "demo.json").read_text())
    turns = data["dialogues"]["tech_support_to_thesis_loss"]
    assert len(turns) == 4 and all(abs(sum(t["gate"].values()) - 1) < 1e-5 for t in turns)
    assert (tmp_path / "demo" / "gate_over_turns.png").stat().st_size > 0


def test_chat_shows_the_gate_for_each_reply(saved_model, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nmy cat died\n\n"))
    assert main(["chat", "--model", str(saved_model), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("gate, turn") == 2 and "gate, turn 1" in out
    assert all(name in out for name in ("low", "medium", "high"))
