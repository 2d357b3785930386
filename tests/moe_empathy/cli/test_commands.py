"""The ``moe-empathy`` command table: every command registered one way, ``--help`` light and quick,
a bad command line as one line."""

import resource
import subprocess
import sys

import pytest

from moe_empathy.cli import COMMANDS, build_parser, main

# Every leaf command, with the flags it needs to parse.
EVERY_COMMAND = {
    ("demo",): [],
    ("chat",): [],
    ("info",): ["--no-model"],
    ("synth",): ["--out", "x"],
    ("train",): ["--config", "c.yaml"],
    ("eval", "run"): ["--model", "m", "--out", "o"],
    ("eval", "rescore"): ["--run", "r", "--out", "o"],
    ("eval", "scorers"): [],
    ("inspect",): ["--model", "m", "--dialogue", "d.json"],
    ("bench", "kernels"): ["--quick"],
    ("bench", "model"): [],
    ("bench", "train"): ["--steps", "1"],
    ("bench", "decode"): [],
    ("bench", "prefix"): [],
}


def _leaves(commands: dict, prefix: tuple = ()):
    for name, command in commands.items():
        if command.subcommands:
            yield from _leaves(command.subcommands, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_command_of_the_table_parses_to_its_function():
    assert set(_leaves(COMMANDS)) == set(EVERY_COMMAND)
    full = build_parser()
    for names, flags in EVERY_COMMAND.items():
        args = full.parse_args([*names, *flags])
        assert callable(args.func)
        assert build_parser(words=list(names)).parse_args([*names, *flags]).func is args.func  # as main() builds it


def test_a_command_line_loads_only_the_modules_of_its_command():
    code = (
        "import sys\n"
        "from moe_empathy.cli import build_parser\n"
        "build_parser(words=['bench', 'kernels']).parse_args(['bench', 'kernels', '--quick'])\n"
        "loaded = sorted(m for m in ('moe_empathy.kernels.bench', 'moe_empathy.bench_model', 'moe_empathy.train.bench_train',"
        " 'moe_empathy.train.trainer', 'moe_empathy.eval.cli') if m in sys.modules)\n"
        "print(loaded)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['moe_empathy.kernels.bench']"


def test_help_and_import_do_not_load_torch():
    """``moe-empathy --help`` and ``import moe_empathy.cli`` stay light (structural), and the
    whole ``--help`` process takes under 2 s of CPU."""
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
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run([sys.executable, "-m", "moe_empathy.cli", "--help"], capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert run.returncode == 0 and all(name in run.stdout for name in COMMANDS), run.stderr
    seconds = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # CPU time: a busy machine does not count
    assert seconds < 2, f"moe-empathy --help took {seconds:.1f} s of CPU"


def test_a_group_lists_its_members_without_importing_them(capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("kernels", "model", "train", "decode", "prefix"))


@pytest.mark.parametrize("argv, problem, fix", [
    (["train", "--config", "c.yaml", "--max-steps", "many"], "argument --max-steps: invalid int value: 'many'", "moe-empathy train --help"),
    (["train"], "the following arguments are required: --config", "moe-empathy train --help"),
    (["bench", "kernels", "--tokens", "1,x"], "argument --tokens", "moe-empathy bench kernels --help"),
    (["bench", "nonsense"], "invalid choice: 'nonsense'", "moe-empathy bench --help"),
    (["demo", "--colour"], "unrecognized arguments: --colour", "moe-empathy --help"),
    ([], "the following arguments are required: COMMAND", "moe-empathy --help"),
])
def test_a_bad_command_line_is_one_line_naming_the_flag_and_the_help(argv, problem, fix, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith("moe-empathy: error: ") and problem in captured.err and f"`{fix}`" in captured.err
