"""``eval run`` and ``inspect`` end to end on a tiny saved model, and their input errors."""

from __future__ import annotations

import argparse
import json

import pytest
from peft import LoraConfig, get_peft_model

from moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.cli import build_parser
from moe_empathy.eval.dialogues import read_dialogue_file
from moe_empathy.eval.report import PLOTS
from moe_empathy.utils import OUTPUT_MARKER
from tests.moe_empathy.conftest import tiny_base


def _parser() -> argparse.ArgumentParser:
    return build_parser()


def _run(*argv: str):
    args = _parser().parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def baselines(checkpoint, tmp_path_factory):
    """A single peft LoRA on the tiny base, and per-level adapters exported from the gated model."""
    root = tmp_path_factory.mktemp("baselines")
    base_dir = checkpoint.parent / "base"
    lora = get_peft_model(tiny_base(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.peft_config["default"].base_model_name_or_path = str(base_dir)
    lora.save_pretrained(root / "single")
    gated = MoeEmpathyForCausalLM.from_pretrained(checkpoint)
    for name in gated.expert_names:
        gated.export_peft_expert(name, root / "experts" / name)
    return root


@pytest.mark.integration
def test_eval_run_writes_report_metrics_plots(checkpoint, baselines, scripts, tmp_path):
    data = tmp_path / "scripts.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in scripts))
    out = tmp_path / "out"
    metrics = _run(
        "eval", "run", "--model", checkpoint, "--data", data, "--dialogues", 4, "--turns", 2, "--out", out,
        "--max-new-tokens", 3, "--bootstrap", 20, "--single-lora", baselines / "single", "--experts-dir", baselines / "experts",
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "report.md", "metrics.json", "rollouts.jsonl", *PLOTS.values()])
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    systems = metrics["scorers"]["lexical"]
    assert list(systems) == ["base", "system_prompt", "single_lora", "external", "gated"]
    assert systems["base"]["overall"]["gap_reduction_vs_base"]["value"] == pytest.approx(0.0)
    assert set(systems["gated"]["gate"]) >= {"accuracy", "entropy", "switch_rate", "shift_follow_rate", "confusion"}
    assert "experts" in metrics["settings"]["systems"]["external"]
    assert len(metrics["targets"]) == 7
    assert all(1.0 <= systems[name]["repetition"]["helpfulness"]["value"] <= 5.0 for name in systems)
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 4 and all(len(r["replies"]) == len(r["scores"]) == 2 for r in rows)
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "## The gate" in report and "| words per reply | helpfulness |" in report
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run("eval", "run", "--model", checkpoint, "--data", data, "--out", out, "--systems", "base")

    # the same replies scored again with the run's scorer give the run's metrics exactly
    again = _run("eval", "rescore", "--run", out, "--out", tmp_path / "again")
    assert {k: again[k] for k in ("scorers", "references", "targets", "timing", "throughput")} == \
        {k: json.loads(json.dumps(metrics))[k] for k in ("scorers", "references", "targets", "timing", "throughput")}
    assert (tmp_path / "again" / "rollouts.jsonl").read_text() == (out / "rollouts.jsonl").read_text()
    assert again["notes"][-1].startswith("Rescored with lexical from the replies of")
    with pytest.raises(ValueError, match="the run's own folder"):
        _run("eval", "rescore", "--run", out, "--out", out)
    with pytest.raises(FileNotFoundError, match="lacks metrics.json, rollouts.jsonl"):
        _run("eval", "rescore", "--run", tmp_path, "--out", tmp_path / "third")


def test_inspect_prints_the_gate_and_writes_a_png(checkpoint, scripts, tmp_path):
    dialogue = tmp_path / "one.json"
    dialogue.write_text(json.dumps(scripts[0]))
    png = tmp_path / "gate.png"
    weights = _run("inspect", "--model", checkpoint, "--dialogue", dialogue, "--png", png)
    assert len(weights) == len(scripts[0]["turns"]) // 2
    assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in weights)
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("task_level"), "record 1 \\(.*\\): field 'task_level' is missing"),
        (lambda r: r["turns"][3].update(role="bot"), "record 1 \\(.*\\): turns\\[3\\].role is 'bot'"),
        (lambda r: r["turns"][1].update(level="extreme"), "record 1 \\(.*\\): turns\\[1\\].level is 'extreme'"),
    ],
)
def test_a_dialogue_file_with_a_wrong_schema_names_record_and_field(scripts, tmp_path, change, message):
    records = json.loads(json.dumps(scripts[:2]))
    change(records[1])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=message):
        read_dialogue_file(path)


def test_bad_inputs_fail_before_any_work(checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown system.*'oracle'"):
        _run("eval", "run", "--model", checkpoint, "--systems", "base,oracle", "--out", out)
    with pytest.raises(ValueError, match="unknown scorer.*'vibes'"):
        _run("eval", "run", "--model", checkpoint, "--scorers", "vibes", "--out", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        _run("eval", "run", "--model", empty, "--out", out)
    tiny_base().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="holds a 'llama' model"):
        _run("inspect", "--model", tmp_path / "plain", "--dialogue", tmp_path / "missing.json")
    (out / "old").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        _run("eval", "run", "--model", checkpoint, "--out", out)
    with pytest.raises(FileExistsError, match="no `moe-empathy` output.*nothing was deleted"):
        _run("eval", "run", "--model", checkpoint, "--out", out, "--overwrite")
    assert (out / "old").is_dir()
    with pytest.raises(FileNotFoundError, match="--single-lora"):
        _run("eval", "run", "--model", checkpoint, "--systems", "single_lora", "--dialogues", 1, "--turns", 1, "--out", tmp_path / "o2")
