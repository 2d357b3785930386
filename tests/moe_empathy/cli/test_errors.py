"""Expected user errors end as one line on stderr and exit code 2; anything else raises."""

import argparse
import errno
import subprocess
import sys

import pytest

from moe_empathy.cli import main, run_command


def assert_one_line(capsys, *parts: str) -> str:
    """Checks that stderr holds one ``moe-empathy: error:`` line containing every part."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-empathy: error: "), captured.err
    assert "Traceback" not in captured.err and all(part in lines[0] for part in parts), lines[0]
    return lines[0]


def test_an_existing_output_folder_names_it_and_overwrite(tmp_path, capsys):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["synth", "--out", str(out), "--dialogues", "40"]) == 2
    assert_one_line(capsys, str(out), "--overwrite")
    assert (out / "mine.txt").read_text() == "keep"


def test_a_bad_training_config_names_the_file_and_the_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("method: gated\nmodel:\n  base: tiny\n  lora_rnak: 4\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    assert_one_line(capsys, str(config), "lora_rnak")
    assert not (tmp_path / "run").exists()


def test_a_missing_training_config_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert_one_line(capsys, "missing.yaml")


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "nowhere")]) == 2
    assert_one_line(capsys, str(tmp_path / "nowhere"), "no config.json")


def test_no_model_found_lists_the_places_looked_and_how_to_pass_one(tmp_path, monkeypatch, capsys):
    from moe_empathy import loading

    places = [tmp_path / "installed" / "moe-empathy-smollm2", tmp_path / "source" / "moe-empathy-smollm2"]
    monkeypatch.setattr(loading, "shipped_checkpoint_places", lambda: places)
    monkeypatch.delenv(loading.CHECKPOINT_ENV, raising=False)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert_one_line(capsys, *map(str, places), "MOE_EMPATHY_CHECKPOINT", "--model")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("argv, parts", [
    (["bench", "train", "--steps", "0", "--output", "OUT/bench.json"], ["--steps must be >= 1"]),
    (["bench", "prefix", "--lengths", "256,many", "--out", "OUT"], ["--lengths takes comma-separated integers"]),
    (["bench", "kernels", "--quick", "--modes", "diagonal", "--output-dir", "OUT"], ["'diagonal'", "--modes dense,top1,top2"]),
])
def test_a_bad_flag_value_found_by_the_command_is_one_line(argv, parts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([a.replace("OUT", str(out)) for a in argv]) == 2
    assert_one_line(capsys, *parts)
    assert not out.exists()


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("moe_empathy.cli.info.run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", "--no-model"])


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The same error as the installed command reports it (a separate process)."""
    run = subprocess.run(
        [sys.executable, "-m", "moe_empathy.cli", "info", "--model", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("error", [FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError])
def test_every_user_error_class_exits_2_with_one_line(error, capsys):
    def fails(args):
        raise error("x.yaml: model.base is wrong;\n fix it")

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
