"""Fault injection: ``eval run`` interrupted at seeded points (and killed mid-write), then
resumed with ``--resume``, loses and duplicates nothing and writes the uninterrupted report."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from moe_empathy.eval.progress import SETTINGS_FILE, progress_dir
from moe_empathy.utils import OUTPUT_MARKER

SYSTEMS = ("base", "gated")
BATCHES = 2  # per system: four dialogues in batches of two (see the eval_command fixture)
ALL_BATCHES = [(f"{name}.cached", index) for name in SYSTEMS for index in range(BATCHES)]


class Interrupt:
    """An ``on_batch`` hook that logs every computed batch and raises KeyboardInterrupt (as
    Ctrl-C would) once ``after`` batches were computed in this session."""

    def __init__(self, log: list, after: int | None = None):
        self.log, self.after, self.count = log, after, 0

    def __call__(self, key: str, index: int) -> None:
        self.log.append((key, index))
        self.count += 1
        if self.count == self.after:
            raise KeyboardInterrupt


def _recorded(out) -> dict[str, list[int]]:
    """The batch indices of the complete (newline-ended) lines of each progress file, in file order."""
    return {
        path.stem: [json.loads(line)["batch"] for line in path.read_text().split("\n")[:-1]]
        for path in sorted(progress_dir(out).glob("*.jsonl"))
    }


def _kill_mid_write(out, key: str) -> None:
    """Cuts the last line of ``key``'s progress file in half, as a kill while writing it would."""
    path = progress_dir(out) / f"{key}.jsonl"
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: start + (len(data) - start) // 2])


def _without_timings(metrics: dict) -> dict:
    """The metrics with the wall-clock measurements (which differ between any two runs) blanked."""
    metrics = json.loads(json.dumps(metrics))
    metrics["timing"]["seconds"] = None
    for entry in metrics["throughput"].values():
        entry["seconds"] = entry["turns_per_second"] = entry["tokens_per_second"] = None
    metrics["notes"] = [n for n in metrics["notes"] if not n.startswith("Rollouts took")]
    for target in metrics["targets"]:
        if "within 30 minutes" in target["target"]:
            target["measured"] = None
    return metrics


@pytest.mark.integration
@pytest.mark.parametrize("seed, kills", [(0, [False]), (1, [True]), (2, [True, False])], ids=["interrupt", "kill-mid-write", "interrupt-twice"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_report(eval_command, uninterrupted_eval, tmp_path, seed, kills):
    """Each session is interrupted after a seeded number of computed batches (and, where
    ``kills`` says so, its last progress line is then cut in half); a final ``--resume``
    finishes the run."""
    rng = random.Random(seed)
    out = tmp_path / "out"
    log, redone = [], []
    for session, kill in enumerate(kills):
        left = len(ALL_BATCHES) - sum(len(v) for v in _recorded(out).values())
        hook = Interrupt(log, after=rng.randrange(1, left))
        with pytest.raises(KeyboardInterrupt):
            eval_command(out, *(["--resume"] if session else []), on_batch=hook)
        assert not out.exists(), "an interrupted run wrote a report"
        recorded = _recorded(out)
        assert sum(len(v) for v in recorded.values()) == len(set(log)), "a computed batch was not recorded"
        assert all(len(v) == len(set(v)) for v in recorded.values()), f"a batch was recorded twice: {recorded}"
        if kill:
            key, index = log[-1]
            _kill_mid_write(out, key)
            redone.append((key, index))
            assert index not in _recorded(out).get(key, [])
    eval_command(out, "--resume", on_batch=Interrupt(log))

    assert Counter(log) == Counter(ALL_BATCHES) + Counter(redone), "a batch was lost, or computed twice without being lost"
    assert not progress_dir(out).exists(), "the progress folder outlived the report"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in uninterrupted_eval.iterdir())
    assert (out / OUTPUT_MARKER).is_file()
    assert (out / "rollouts.jsonl").read_text() == (uninterrupted_eval / "rollouts.jsonl").read_text()
    resumed, reference = (json.loads((folder / "metrics.json").read_text()) for folder in (out, uninterrupted_eval))
    assert _without_timings(resumed) == _without_timings(reference)
    for name in SYSTEMS:
        for count in ("prefill_tokens", "decode_tokens"):
            assert resumed["throughput"][name][count] == reference["throughput"][name][count] > 0


@pytest.mark.integration
def test_resume_is_refused_with_other_settings_or_without_progress(eval_command, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        eval_command(out, on_batch=Interrupt([], after=1))
    progress = progress_dir(out)
    before = {p.name: p.read_bytes() for p in progress.iterdir()}
    assert SETTINGS_FILE in before and len(before) == 2

    with pytest.raises(ValueError, match=r"differ .* in \['max_new_tokens', 'systems'\]; resume with the same arguments"):
        eval_command(out, "--resume", "--max-new-tokens", 4, "--systems", "gated")
    with pytest.raises(FileExistsError, match="holds the progress of an interrupted `eval run`.*Pass --resume"):
        eval_command(out)
    with pytest.raises(FileNotFoundError, match="--resume: no progress of an interrupted `eval run`"):
        eval_command(tmp_path / "other", "--resume")
    assert {p.name: p.read_bytes() for p in progress.iterdir()} == before, "a refused run changed the progress"
    assert not out.exists() and not (tmp_path / "other").exists()
