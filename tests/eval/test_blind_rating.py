"""Blind rating: items carry no source, shared replies are one item, the table's arithmetic."""

from __future__ import annotations

import json

import pytest

from moe_empathy.eval import blind_rating


def _probe(replies: dict[str, dict[str, str]]) -> dict:
    return {"prompts": [
        {"id": pid, "task": "t", "messages": [{"role": "user", "content": f"user {pid}"}], "replies": r}
        for pid, r in replies.items()
    ]}


PROBES = {
    "a": _probe({"p1": {"base": "B1", "low": "a-low1", "medium": "a-med1", "high": "a-high1"},
                 "p2": {"base": "B2", "low": "a-low2", "medium": "a-med2", "high": "a-high2"}}),
    "b": _probe({"p1": {"base": "B1", "low": "b-low1", "medium": "b-med1", "high": "b-high1"},
                 "p2": {"base": "B2", "low": "b-low2", "medium": "a-med2", "high": "b-high2"}}),
}


def test_items_hide_their_source_and_a_shared_reply_is_one_item():
    items, key = blind_rating.build_items(PROBES, seed=7)
    assert len(items) == 2 * 4 + 2 * 4 - 3  # base twice and one medium reply shared
    assert all(set(item) == {"id", "prompt_id", "task", "user", "reply"} for item in items)
    sources = {k["id"]: k["sources"] for k in key}
    shared = next(i["id"] for i in items if i["reply"] == "a-med2")
    assert sorted(sources[shared]) == [["a", "medium"], ["b", "medium"]]
    assert blind_rating.build_items(PROBES, seed=7) == (items, key)
    assert [i["reply"] for i in blind_rating.build_items(PROBES, seed=8)[0]] != [i["reply"] for i in items]


def test_table_means_order_and_flags():
    items, key = blind_rating.build_items(PROBES, seed=7)
    empathy = {"B1": 1, "B2": 2, "a-low1": 1, "a-med1": 2, "a-high1": 4, "a-low2": 2, "a-med2": 2, "a-high2": 2,
               "b-low1": 1, "b-med1": 3, "b-high1": 5, "b-low2": 1, "b-high2": 4}
    ratings = [{"id": i["id"], "empathy": empathy[i["reply"]], "helpfulness": 3,
                "flags": ["repetition"] if i["reply"] == "b-high1" else []} for i in items]
    summary = blind_rating.summarise(key, ratings)
    assert summary["means"]["a"]["high"]["empathy"] == pytest.approx(3.0)
    assert summary["means"]["b"]["base"]["empathy"] == pytest.approx(1.5)
    assert summary["high_minus_low"] == {"a": pytest.approx(1.5), "b": pytest.approx(3.5)}
    assert summary["ordered"] == {"a": [1, 2], "b": [2, 2]}  # a's p2 is flat: 2 <= 2 <= 2 but not low < high
    assert summary["high_flags"] == {"b": {"repetition": 1}}
    assert "| b | 3.50 | 2 of 2 | repetition 1 |" in blind_rating.markdown(summary)


def test_a_missing_rating_is_named(tmp_path):
    items, key = blind_rating.build_items(PROBES, seed=7)
    with pytest.raises(ValueError, match="have no rating"):
        blind_rating.summarise(key, [])


def test_command_line_round_trip(tmp_path):
    for label, probe in PROBES.items():
        (tmp_path / f"{label}.json").write_text(json.dumps(probe))
    out = tmp_path / "blind"
    argv = ["items", "--probe", f"a={tmp_path / 'a.json'}", "--probe", f"b={tmp_path / 'b.json'}", "--out", str(out)]
    assert blind_rating.main(argv) == 0
    items = [json.loads(line) for line in (out / "blind_items.jsonl").read_text().splitlines()]
    (out / "blind_ratings.jsonl").write_text("".join(
        json.dumps({"id": i["id"], "empathy": 2, "helpfulness": 2, "flags": []}) + "\n" for i in items))
    assert blind_rating.main(["table", "--dir", str(out)]) == 0
    assert "high - low" in (out / "blind_table.md").read_text()
    with pytest.raises(ValueError, match="LABEL=PATH"):
        blind_rating.main(["items", "--probe", "no-label", "--out", str(out)])


def _rated_folder(folder, replies: list[tuple[str, str]], strengths: list[int]):
    """A rated folder: items of (prompt id, reply) and ratings with the given emotional-reaction strengths."""
    folder.mkdir()
    items = [{"id": f"q{i:03d}", "prompt_id": p, "task": "t", "user": f"user {p}", "reply": r} for i, (p, r) in enumerate(replies)]
    ratings = [{"id": item["id"], "emotional_reaction": s, "interpretation": 0, "exploration": 0, "empathy": 1 + s, "helpfulness": 2, "flags": []}
               for item, s in zip(items, strengths)]
    (folder / "blind_items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / "blind_ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ratings))
    return folder


def test_agreement_pairs_raters_on_shared_replies_and_scores_every_distinct_reply(tmp_path):
    replies = [("p1", "Restart the router."), ("p2", "I'm so sorry, that sounds awful."), ("p3", "Okay.")]
    a = _rated_folder(tmp_path / "a", replies, [0, 2, 0])
    b = _rated_folder(tmp_path / "b", replies[:2] + [("p4", "Try again later.")], [0, 2, 1])
    folders = {"a": blind_rating.rated_replies(a), "b": blind_rating.rated_replies(b)}
    [pair] = blind_rating.rater_agreement(folders)
    assert pair["n"] == 2 and pair["exact_empathy"] == 1.0
    assert blind_rating.reference({"emotional_reaction": 2, "interpretation": 0, "exploration": 0}) == pytest.approx(1 + 4 * 2 / 6)

    class Echo:  # scores a reply by its raters' reference, so agreement is perfect
        def score(self, responses, contexts):
            return [type("S", (), {"score": 1 + 4 * 2 / 6 if "sorry" in r else 1.0 + (r == "Try again later.") * 4 / 6})() for r in responses]

    result = blind_rating.scorer_agreement(folders, Echo())
    assert result["n"] == 4 and result["mae"] == pytest.approx(0.0) and result["band_agreement"] == 1.0
    assert result["spearman"] == pytest.approx(1.0)


def test_agreement_command_runs_on_rated_folders(tmp_path, capsys):
    replies = [("p1", "Restart the router."), ("p2", "I'm so sorry, that sounds awful.")]
    a = _rated_folder(tmp_path / "a", replies, [0, 2])
    b = _rated_folder(tmp_path / "b", replies, [0, 1])
    assert blind_rating.main(["agreement", "--dir", str(a), "--dir", str(b), "--scorers", "lexical"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["raters"][0]["n"] == 2 and result["scorers"]["lexical"]["n"] == 2 and result["helpfulness"]["n"] == 2
