import argparse
import errno
import subprocess
import sys

import pytest

from moe_empathy import cli
from moe_empathy.bench_model import summarise
from moe_empathy.cli import build_parser, main, run_command


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
    err = capsys.readouterr().err
    assert "no config.json" in err and str(tmp_path) in err and len(err.splitlines()) == 1


def test_help_and_import_do_not_load_torch():
    """``moe-empathy --help`` and ``import moe_empathy.cli`` stay light (structural, not timed)."""
    code = (
        "import sys\n"
        "import moe_empathy.cli as cli\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'rich') if m in sys.modules)\n"
        "assert not heavy, f'importing moe_empathy.cli imported {heavy}'\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'rich') if m in sys.modules)\n"
        "assert not heavy, f'--help imported {heavy}'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "moe_empathy.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "synth" in run.stdout and "eval" in run.stdout, run.stderr


def test_user_errors_end_as_one_line_without_traceback(tmp_path):
    """An existing output folder, as the installed command reports it (a separate process)."""
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    run = subprocess.run(
        [sys.executable, "-m", "moe_empathy.cli", "synth", "--out", str(out), "--dialogues", "40"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert str(out) in run.stderr and "--overwrite" in run.stderr


@pytest.mark.parametrize("error", [FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError])
def test_every_user_error_class_exits_2_with_one_line(error, capsys):
    def fails(args):
        raise error(f"x.yaml: model.base is wrong;\n fix it")

    assert run_command(fails, argparse.Namespace()) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "moe-empathy: error: x.yaml: model.base is wrong; fix it\n"


def test_a_full_disk_is_one_line_and_other_os_errors_are_not_hidden(capsys):
    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device while saving checkpoint-4; checkpoint-2 is intact")

    def broken(args):
        raise OSError(errno.EIO, "Input/output error")

    assert run_command(disk_full, argparse.Namespace()) == 2
    assert capsys.readouterr().err.startswith("moe-empathy: error: [Errno 28] No space left")
    with pytest.raises(OSError, match="Input/output"):
        run_command(broken, argparse.Namespace())


def test_ctrl_c_in_a_command_exits_130_without_traceback(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert run_command(interrupted, argparse.Namespace()) == 130
    assert "interrupted" in capsys.readouterr().err


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


def test_ctrl_c_during_a_reply_keeps_the_conversation_and_goes_on(saved_model, monkeypatch, capsys):
    import io

    real_reply = cli._reply
    seen = []

    def reply(model, tokenizer, messages, max_new_tokens):
        seen.append([m["content"] for m in messages])
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second reply is generated
        return real_reply(model, tokenizer, messages, max_new_tokens)

    monkeypatch.setattr(cli, "_reply", reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nmy cat died\nare you there?\n"))
    assert main(["chat", "--model", str(saved_model), "--max-new-tokens", "3"]) == 0  # ends at end of input (Ctrl-D)
    out = capsys.readouterr().out
    assert "reply abandoned" in out and "Traceback" not in out
    assert seen[1] == [seen[0][0], seen[2][1], "my cat died"]
    assert seen[2] == [seen[0][0], seen[2][1], "are you there?"]  # the abandoned message is dropped, the rest kept
    assert out.count("gate, turn") == 2 and "gate, turn 1" in out


def test_ctrl_c_at_the_prompt_ends_the_chat(saved_model, monkeypatch):
    class CtrlC:
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", CtrlC())
    assert main(["chat", "--model", str(saved_model), "--max-new-tokens", "3"]) == 0
