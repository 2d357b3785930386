"""Sampling of the rating development set on hand-built rollouts (no model)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from moe_empathy.eval.devset import (
    balanced_dialogues,
    choose_turns,
    deduplicate,
    parse_counts,
    parse_ranges,
    reply_context,
    sample_replies,
    shuffle_and_number,
    write_batch,
    write_jsonl,
)
from moe_empathy.eval.rollout import DialogueRollout
from moe_empathy.train.taxonomy import LEVEL_TARGET, TASKS
from moe_empathy.utils import read_jsonl


def _rollout(system: str, dialogue: str, turns: int, gate: bool = False) -> DialogueRollout:
    levels = ["low", "medium", "high"]
    return DialogueRollout(
        system,
        dialogue,
        "grief_support",
        "high",
        users=[f"{dialogue} user {k + 1}" for k in range(turns)],
        replies=[f"{system} {dialogue} reply {k + 1}" for k in range(turns)],
        levels=[levels[k % 3] for k in range(turns)],
        gate=[[0.2, 0.3, 0.5]] * turns if gate else None,
        new_tokens=[5] * turns,
    )


def test_ranges_and_counts_parse_and_reject_mistakes():
    assert parse_ranges("1-6,16-30") == [(1, 6), (16, 30)]
    assert parse_ranges("3") == [(3, 3)]
    for bad in ("0-4", "6-1", "1-6,5-9", "16-30,1-6", "a-b"):
        with pytest.raises(ValueError):
            parse_ranges(bad)
    assert parse_counts("2", 2) == [2, 2]
    assert parse_counts("4,5", 2) == [4, 5]
    for bad in ("0", "1,2,3", "x"):
        with pytest.raises(ValueError):
            parse_counts(bad, 2)


def test_balanced_dialogues_takes_each_task_in_turn():
    records = [{"task": task, "n": i} for i in range(3) for task in reversed(list(TASKS))]
    chosen = balanced_dialogues(records, 2)
    assert [r["task"] for r in chosen[:8]] == list(TASKS)
    assert Counter(r["task"] for r in chosen) == {task: 2 for task in TASKS}
    assert {r["n"] for r in chosen} == {0, 1}  # the first records of each task, in order
    with pytest.raises(ValueError, match="too few"):
        balanced_dialogues(records, 4)


def test_choose_turns_draws_distinct_turns_inside_each_range():
    ranges = [(1, 6), (16, 30)]
    turns = choose_turns(30, ranges, [4, 5], random.Random(0))
    assert len(set(turns)) == 9 and turns == sorted(turns)
    assert sum(1 <= t <= 6 for t in turns) == 4 and sum(16 <= t <= 30 for t in turns) == 5
    assert turns == choose_turns(30, ranges, [4, 5], random.Random(0))
    # A short dialogue: all of a range cut short, none of a range beyond it.
    assert choose_turns(17, ranges, [2, 5], random.Random(1))[-2:] == [16, 17]
    assert all(t <= 6 for t in choose_turns(10, ranges, [2, 5], random.Random(1)))


def test_reply_context_is_the_last_messages_before_the_user_message():
    users, replies = ["u1", "u2", "u3"], ["a1", "a2", "a3"]
    assert reply_context(users, replies, 1, 3) == []
    assert reply_context(users, replies, 2, 3) == [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}]
    assert [m["content"] for m in reply_context(users, replies, 3, 3)] == ["a1", "u2", "a2"]
    assert reply_context(users, replies, 3, 0) == []


def test_sample_replies_hides_labels_and_records_them_in_the_key():
    rollouts = {
        "base": [_rollout("base", "d1", 20), _rollout("base", "d2", 20)],
        "gated": [_rollout("gated", "d1", 20, gate=True), _rollout("gated", "d2", 20, gate=True)],
    }
    pairs = sample_replies(rollouts, [(1, 6), (16, 30)], [2, 1], context_messages=3, seed=5)
    assert len(pairs) == 2 * 2 * 3
    for item, key in pairs:
        assert set(item) == {"task", "turn", "context", "user", "reply"}  # blind: the system is in the key only
        k = item["turn"] - 1
        assert item["reply"] == f"{key['system']} {key['dialogue_id']} reply {item['turn']}"
        assert item["user"] == f"{key['dialogue_id']} user {item['turn']}"
        assert len(item["context"]) == min(3, 2 * k)
        assert key["level"] == ["low", "medium", "high"][k % 3]
        assert key["target"] == pytest.approx(LEVEL_TARGET[key["level"]], abs=1e-4)
        assert (key["mixture"] is None) == (key["system"] == "base")
    # A system's draws do not depend on which other systems were played.
    alone = sample_replies({"gated": rollouts["gated"]}, [(1, 6), (16, 30)], [2, 1], 3, seed=5)
    assert alone == [p for p in pairs if p[1]["system"] == "gated"]


def test_deduplicate_drops_repeats_only_above_the_minimum():
    item = lambda reply: ({"context": [], "user": "hi", "reply": reply}, {})  # noqa: E731
    pairs = [item("a"), item("b"), item("a"), item("a"), item("c")]
    assert [p[0]["reply"] for p in deduplicate(pairs, 3)] == ["a", "b", "c"]
    assert [p[0]["reply"] for p in deduplicate(pairs, 4)] == ["a", "b", "a", "c"]  # the later repeat goes first
    assert len(deduplicate(pairs, 10)) == 5


def test_shuffle_interleaves_and_keeps_items_and_keys_together(tmp_path):
    pairs = [({"system": s, "reply": f"{s}{i}"}, {"system": s, "n": i}) for s in ("base", "gated") for i in range(10)]
    items, keys = shuffle_and_number(pairs, seed=3)
    assert [i["id"] for i in items] == [k["id"] for k in keys] == [f"r{n:03d}" for n in range(1, 21)]
    assert all(i["reply"] == f"{k['system']}{k['n']}" for i, k in zip(items, keys))
    assert [i["system"] for i in items] != sorted(i["system"] for i in items)  # not grouped by system
    assert shuffle_and_number(pairs, seed=3) == (items, keys)
    write_jsonl(tmp_path / "items.jsonl", items)
    assert [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()] == items


def test_an_appended_batch_is_numbered_after_the_set_and_its_settings_are_listed(tmp_path):
    out, key, settings = tmp_path / "replies.jsonl", tmp_path / "replies_key.jsonl", tmp_path / "replies_settings.json"
    first = [({"reply": f"a{i}"}, {"system": "base"}) for i in range(3)]
    second = [({"reply": f"b{i}"}, {"system": "gated"}) for i in range(2)]
    with pytest.raises(ValueError, match="drop --append"):
        write_batch(out, key, settings, second, {"batch": 2}, seed=0, append=True)
    write_batch(out, key, settings, first, {"batch": 1}, seed=0, append=False)
    added = write_batch(out, key, settings, second, {"batch": 2}, seed=0, append=True)
    assert [i["id"] for i in added] == ["r004", "r005"]
    items, keys = read_jsonl(out), read_jsonl(key)
    assert [i["id"] for i in items] == [k["id"] for k in keys] == ["r001", "r002", "r003", "r004", "r005"]
    assert {i["reply"] for i in items[:3]} == {"a0", "a1", "a2"} and {k["system"] for k in keys[3:]} == {"gated"}
    assert json.loads(settings.read_text()) == [{"batch": 1}, {"batch": 2}]


def test_append_without_a_set_is_refused_before_any_rollout(tmp_path, monkeypatch):
    import moe_empathy.eval.devset as devset

    monkeypatch.setattr(devset, "rollout", lambda *a, **k: pytest.fail("rolled out before checking --append"))
    with pytest.raises(ValueError, match="drop --append"):
        devset.main(["--out", str(tmp_path / "replies.jsonl"), "--append"])


def test_from_run_samples_a_finished_evaluation_without_playing(tmp_path, monkeypatch):
    import dataclasses

    import moe_empathy.eval.devset as devset

    run = tmp_path / "run"
    run.mkdir()
    played = {"base": [_rollout("base", f"d{i}", 8) for i in range(2)], "gated": [_rollout("gated", f"d{i}", 8, gate=True) for i in range(2)]}
    settings = {"model": "m", "systems": {"base": "the base", "gated": "the gate"}, "split": "test", "dialogues": 2, "turns": 8, "max_new_tokens": 32}
    (run / "metrics.json").write_text(json.dumps({"settings": settings}))
    write_jsonl(run / "rollouts.jsonl", [dataclasses.asdict(r) for rows in played.values() for r in rows])
    monkeypatch.setattr(devset, "rollout", lambda *a, **k: pytest.fail("played dialogues although --from-run was given"))
    out = tmp_path / "sample" / "replies.jsonl"
    out.parent.mkdir()
    common = ["--out", str(out), "--from-run", str(run), "--ranges", "1-3,6-8", "--per-range", "1", "--min-replies", "1"]
    written = devset.main([*common, "--systems", "gated"])
    items, keys = read_jsonl(out), read_jsonl(tmp_path / "sample" / "replies_key.jsonl")
    assert written["from_run"] and written["turns"] == 8 and written["systems"] == {"gated": "the gate"}
    assert len(items) == 2 * 2 and {k["system"] for k in keys} == {"gated"}
    for item, key in zip(items, keys):
        assert item["reply"] == f"gated {key['dialogue_id']} reply {key['turn']}" and "system" not in item
    devset.main([*common, "--same-turns", "--systems", "base,gated"])
    turns = {(k["system"], k["dialogue_id"]): [] for k in read_jsonl(tmp_path / "sample" / "replies_key.jsonl")}
    for k in read_jsonl(tmp_path / "sample" / "replies_key.jsonl"):
        turns[(k["system"], k["dialogue_id"])].append(k["turn"])
    assert all(sorted(turns[("base", d)]) == sorted(turns[("gated", d)]) for d in ("d0", "d1"))
    with pytest.raises(ValueError, match="no rollouts of external"):
        devset.main([*common, "--systems", "external"])
    with pytest.raises(ValueError, match="played 8 turns"):
        devset.main(["--out", str(out), "--from-run", str(run), "--ranges", "1-3,9-12", "--systems", "base"])
    assert set(devset.main(common)["systems"]) == {"base", "gated"}  # the run's systems by default


def test_exclude_leaves_out_the_items_of_another_rated_set(tmp_path):
    import dataclasses

    import moe_empathy.eval.devset as devset

    run = tmp_path / "run"
    run.mkdir()
    settings = {"model": "m", "systems": {"gated": "the gate"}, "split": "test", "dialogues": 2, "turns": 8, "max_new_tokens": 32}
    (run / "metrics.json").write_text(json.dumps({"settings": settings}))
    write_jsonl(run / "rollouts.jsonl", [dataclasses.asdict(_rollout("gated", f"d{i}", 8, gate=True)) for i in range(2)])
    common = ["--from-run", str(run), "--ranges", "1-8", "--per-range", "3", "--min-replies", "1", "--seed", "5"]
    first = tmp_path / "first" / "replies.jsonl"
    first.parent.mkdir()
    devset.main(["--out", str(first), *common, "--per-range", "2"])
    second = tmp_path / "second" / "replies.jsonl"
    second.parent.mkdir()
    written = devset.main(["--out", str(second), *common, "--exclude", str(first)])
    old = {(r["reply"], r["user"]) for r in read_jsonl(first)}
    new = {(r["reply"], r["user"]) for r in read_jsonl(second)}
    assert not old & new  # a reply rated once is never drawn again
    assert written["sampled"] == 6 and written["kept"] == 6 - written["excluded"] and written["excluded"] >= 1
    with pytest.raises(FileNotFoundError, match="no such file"):
        devset.main(["--out", str(second), *common, "--exclude", str(tmp_path / "missing.jsonl")])
