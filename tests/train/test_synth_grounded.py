import json

import pytest

from moe_empathy.cli import build_parser
from moe_empathy.train.synth_grounded import _write_batch, clean_content, content_prompt, generate_grounded
from moe_empathy.train.synth_llm import LLMSynthConfig, read_progress
from moe_empathy.train.synth_plan import SynthConfig, plans
from moe_empathy.train.synth_template import render_template
from tests.moe_empathy.conftest import tiny_base

CONFIG = SynthConfig(dialogues=7, min_turns=1, max_turns=3, seed=3, shift_rate=0.6)
GREEDY = LLMSynthConfig(batch_size=3, max_new_tokens=4, temperature=0.0, context_messages=6)
CONTENT = "Check that the cable is plugged in. Then restart the router and wait two minutes."


class FixedAnswers:
    """A chat model stand-in that answers every conversation with the same text."""

    llm = GREEDY

    def __init__(self, answer: str):
        self.answer, self.prompts = answer, []

    def __call__(self, conversations):
        self.prompts += conversations
        return [self.answer] * len(conversations)


def test_clean_content_keeps_only_the_help():
    answer = ("**I'm so sorry** to hear that. As an AI, I don't have feelings. 1. Check the cable first.\n"
              "2. Restart the router. I hope this helps! Then call your provider and ask")
    assert clean_content(answer) == "Check the cable first. Restart the router."
    assert clean_content("That sounds really frustrating. I understand how you feel.") is None
    courtesy = ("You're welcome! I'm glad you asked. I am a travel assistant. Let me know if you have any questions. "
                "The old town is best seen on foot in the morning.")
    assert clean_content(courtesy) == "The old town is best seen on foot in the morning."
    assert clean_content("I'm afraid the shop closes at six on Sundays.") == "I'm afraid the shop closes at six on Sundays."
    assert clean_content("Okay.") is None  # too short to carry help
    assert clean_content("One. Two. Three. Four words here. Five.", max_sentences=2) is None
    assert clean_content("Restart the router first. Then check the cable. Then call them.", max_sentences=2) == \
        "Restart the router first. Then check the cable."


def test_replies_compose_the_planned_empathy_around_the_base_content():
    batch = plans(CONFIG)[:4]
    chat = FixedAnswers(CONTENT)
    records = _write_batch(chat, batch)
    for plan, rec in zip(batch, records):
        template = render_template(plan)
        assert rec["backend"] == "grounded" and rec["grounded_turns"] == len(plan.states)
        assert [t["role"] for t in rec["turns"]] == ["user", "assistant"] * len(plan.states)
        assert [t["level"] for t in rec["turns"][1::2]] == plan.levels
        assert [t["mechanisms"] for t in rec["turns"][1::2]] == [t["mechanisms"] for t in template["turns"][1::2]]
        assert rec["turns"][0] == template["turns"][0]  # the same opening message
        for turn, reply in zip(rec["turns"][1::2], [t["content"] for t in rec["turns"][1::2]]):
            assert "restart the router and wait two minutes." in reply.lower()
            if not any(turn["mechanisms"].values()):  # no empathy planned: the content alone, maybe with an opener
                assert len(reply) < len(CONTENT) + 40
    # the base answered each user message with the dialogue so far in view, behind a plain prompt
    first = chat.prompts[0]
    assert first[0]["role"] == "system" and "helpful assistant" in first[0]["content"]
    assert first[-1]["role"] == "user" and first[-1]["content"] == records[0]["turns"][0]["content"]


def test_unusable_answers_keep_the_phrase_datas_advice():
    plan = plans(CONFIG)[0]
    rec = _write_batch(FixedAnswers("I'm so sorry you're dealing with this."), [plan])[0]
    assert rec["grounded_turns"] == 0
    assert [t["content"] for t in rec["turns"]] == [t["content"] for t in render_template(plan)["turns"]]


def test_braces_in_the_base_content_are_kept_as_text():
    plan = plans(CONFIG)[0]
    rec = _write_batch(FixedAnswers("Set the field to {auto} in the config file. Save it and restart."), [plan])[0]
    assert "{auto}" in rec["turns"][1]["content"]


def test_content_prompt_ends_with_the_users_message():
    plan = plans(CONFIG)[0]
    history = [{"role": "user", "content": "hi", "level": None}]
    assert content_prompt(plan, history)[1:] == [{"role": "user", "content": "hi"}]


def test_interrupted_grounded_run_resumes_and_counts_the_grounded_replies(tmp_path, tokenizer):
    model = tiny_base(vocab_size=len(tokenizer)), tokenizer
    progress = tmp_path / "run.partial.jsonl"

    class Interrupted(Exception):
        pass

    def stop_after_two(record):
        if len(read_progress(progress)) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        generate_grounded(CONFIG, GREEDY, progress, model=model, on_dialogue=stop_after_two)
    first = read_progress(progress)
    by_split, settings = generate_grounded(CONFIG, GREEDY, progress, model=model)
    ids = [json.loads(line)["dialogue_id"] for line in progress.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == CONFIG.dialogues
    records = {r["dialogue_id"]: r for split in by_split.values() for r in split}
    assert all("grounded_turns" not in r for r in records.values())  # not part of the corpus schema
    assert all(records[r["dialogue_id"]]["turns"] == r["turns"] for r in first)  # finished work kept
    grounded = sum(r["grounded_turns"] for r in read_progress(progress))
    replies = sum(len(p.states) for p in plans(CONFIG))
    assert settings["backend"] == "grounded" and f"{grounded} of {replies} replies" in settings["content"]


def test_the_synth_command_writes_a_grounded_corpus(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "tiny-chat"
    tiny_base(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "grounded"
    args = build_parser().parse_args(["synth", "--out", str(out), "--dialogues", "24", "--max-turns", "2",
                                      "--backend", "grounded", "--model", str(model_dir), "--max-new-tokens", "4"])
    stats = args.func(args)
    assert sum(stats["dialogues"].values()) == 24
    assert "the base model wrote the helpful part of" in (out / "README.md").read_text()
    assert not (tmp_path / "grounded.partial.jsonl").exists()  # the progress file goes once the corpus is written
    assert "wrote 24 dialogues" in capsys.readouterr().out
