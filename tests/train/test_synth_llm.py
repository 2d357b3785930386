import json

import pytest

from moe_empathy.train.synth_llm import LLMSynthConfig, assistant_prompt, generate_llm, read_progress, user_prompt
from moe_empathy.train.synth_plan import SynthConfig, plans
from tests.moe_empathy.conftest import tiny_base

CONFIG = SynthConfig(dialogues=7, min_turns=1, max_turns=3, seed=3, shift_rate=0.6)
LLM = LLMSynthConfig(batch_size=3, max_new_tokens=4)


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_without_duplicates_or_loss(tmp_path, tokenizer):
    tiny_chat_model = tiny_base(vocab_size=len(tokenizer)), tokenizer
    progress = tmp_path / "run.partial.jsonl"
    seen = []

    def stop_after_four(record):
        seen.append(record["dialogue_id"])
        if len(seen) == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        generate_llm(CONFIG, LLM, progress, model=tiny_chat_model, on_dialogue=stop_after_four)
    first = read_progress(progress)
    assert [r["dialogue_id"] for r in first] == seen
    with open(progress, "a") as f:  # a write cut off by a kill
        f.write('{"dialogue_id": "s3-00000')

    by_split = generate_llm(CONFIG, LLM, progress, model=tiny_chat_model)
    ids = [json.loads(line)["dialogue_id"] for line in progress.read_text().splitlines()]
    expected = {p.dialogue_id for p in plans(CONFIG)}
    assert len(ids) == len(set(ids)) == CONFIG.dialogues and set(ids) == expected
    records = {r["dialogue_id"]: r for split in by_split.values() for r in split}
    assert set(records) == expected
    assert all(records[r["dialogue_id"]] == r for r in first)  # finished work was kept, not redone

    for plan in plans(CONFIG):
        rec = records[plan.dialogue_id]
        assert rec["backend"] == "llm" and rec["num_turns"] == len(plan.states)
        assert [t["role"] for t in rec["turns"]] == ["user", "assistant"] * len(plan.states)
        assert [t["level"] for t in rec["turns"][1::2]] == plan.levels
        assert all(t["content"] for t in rec["turns"])


def test_prompts_carry_persona_state_and_target_level():
    plan = next(p for p in plans(CONFIG) if "high" in p.levels)
    turn = plan.levels.index("high")
    user = user_prompt(plan, turn, [], "your news")[0]["content"]
    assert plan.persona["name"] in user and "your news" in user
    steer = assistant_prompt(plan, turn, [{"role": "user", "content": "hi"}])
    assert "High empathy" in steer[0]["content"] and steer[-1] == {"role": "user", "content": "hi"}


@pytest.mark.slow
def test_embedded_smollm2_writes_a_dialogue(tmp_path):
    config = SynthConfig(dialogues=2, min_turns=1, max_turns=2, seed=0)
    by_split = generate_llm(config, LLMSynthConfig(batch_size=2, max_new_tokens=40), tmp_path / "p.jsonl")
    assert sum(len(v) for v in by_split.values()) == 2
