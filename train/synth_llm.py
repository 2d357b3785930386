"""LLM backend of the dialogue generator: a local Hugging Face chat model realises
the same plans as the template backend (:func:`.synth_plan.plans`).

The model plays both sides: the user from a user-simulator prompt (persona,
situation, the user's state at this turn, the event to disclose when the state
rises) and the assistant from a level-steering system prompt (the task, the target
level, the strength of each empathy mechanism). Dialogues are generated in batches,
turn by turn, and each finished dialogue is appended to a progress file at once;
a rerun skips the dialogues already there, so an interrupted run resumes with no
duplicate and no loss.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .chat_model import load_chat_model
from .phrases import load_phrases
from .synth_corpus import assistant_turn, record, user_turn
from .synth_plan import SPLITS, DialoguePlan, SynthConfig, plans
from .taxonomy import MECHANISMS, TASKS


@dataclass
class LLMSynthConfig:
    """How the chat model generates.

    Attributes:
        model: folder of a local Hugging Face chat model; None = the embedded
            SmolLM2-135M-Instruct (``moe_empathy.load_default_base``).
        batch_size: dialogues generated together.
        max_new_tokens: most tokens per message.
        temperature: sampling temperature; 0 decodes greedily.
        top_p: nucleus sampling threshold.
        no_repeat_ngram_size: a message may not repeat a sequence of this many tokens (0: no limit).
        context_messages: most recent messages shown to the model at each step.
        seed: torch seed, set before each batch.
    """

    model: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 96
    temperature: float = 0.8
    top_p: float = 0.95
    no_repeat_ngram_size: int = 0
    context_messages: int = 8
    seed: int = 0


_STATES = {
    "steady": "composed; you want only practical help and no talk about feelings",
    "neutral": "calm and focused on the task",
    "upset": "upset: you feel {emotion} and it shows in how you write",
    "distressed": "deeply distressed: you feel {emotion} and say so",
}
_LEVELS = {
    "low": "Low empathy: be friendly but matter-of-fact; focus on the help itself.",
    "medium": "Medium empathy: acknowledge the user's situation briefly and warmly, then help.",
    "high": "High empathy: respond to the user's feelings first, with warmth and understanding, then help.",
}
_STRENGTHS = ("none", "a little", "clearly")
_MECHANISM_TEXT = {
    "emotional_reaction": "express your own warmth or concern",
    "interpretation": "show you understand what the user feels or is going through",
    "exploration": "ask about the user's feelings or experience",
}


def user_prompt(plan: DialoguePlan, turn: int, history: list[dict], disclose: str | None) -> list[dict]:
    """Messages that make the model write the user's next message.

    Args:
        plan: the dialogue's plan.
        turn: index of the exchange.
        history: the dialogue so far (user and assistant turns).
        disclose: an event the user reveals in this message, if the state rises.
    """
    p = plan.persona
    task = TASKS[plan.task]
    state = _STATES[plan.states[turn]].format(emotion=plan.emotion)
    system = (
        f"You role-play a user chatting with an AI assistant. You are {p['name']}, {p['age']}, "
        f"a {p['occupation']}, writing in a {p['style']} style. Topic: {task.title.lower()}, "
        f"about {plan.situation.replace('_', ' ')} ({plan.detail}). Right now you are {state}."
        + (f" In this message, tell the assistant about this: {disclose}." if disclose else "")
        + " Write only your next message to the assistant, one to three sentences."
    )
    # from the simulated user's side, the assistant's replies are the other speaker
    swapped = [{"role": "user" if t["role"] == "assistant" else "assistant", "content": t["content"]}
               for t in history]
    return [{"role": "system", "content": system}, *swapped,
            {"role": "user", "content": "(Write your next message.)" if history else "(Start the conversation.)"}]


def assistant_prompt(plan: DialoguePlan, turn: int, history: list[dict]) -> list[dict]:
    """Messages that make the model write the assistant's reply at the target level.

    Args:
        plan: the dialogue's plan.
        turn: index of the exchange.
        history: the dialogue so far, ending with the user's message.
    """
    strengths = plan.mechanisms[turn]
    mechanisms = "; ".join(f"{_MECHANISM_TEXT[m]}: {_STRENGTHS[strengths[m]]}" for m in MECHANISMS)
    system = (
        f"You are a helpful assistant for {TASKS[plan.task].title.lower()}. Always give concrete, "
        f"useful help with the user's request. {_LEVELS[plan.levels[turn]]} "
        f"Empathy in this reply: {mechanisms}. Keep it under 80 words."
    )
    return [{"role": "system", "content": system},
            *[{"role": t["role"], "content": t["content"]} for t in history]]


class ChatModel:
    """Batched generation from a chat model with left padding: one reply per conversation."""

    def __init__(self, llm: LLMSynthConfig, model=None):
        self.llm = llm
        self.model, self.tokenizer = load_chat_model(model if model is not None else llm.model)

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        import torch

        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": True, "temperature": self.llm.temperature, "top_p": self.llm.top_p} \
            if self.llm.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(
                **batch, max_new_tokens=self.llm.max_new_tokens, **sampling,
                no_repeat_ngram_size=self.llm.no_repeat_ngram_size, pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1]:]
        replies = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [r.strip() or "..." for r in replies]


def read_progress(path: Path) -> list[dict]:
    """Finished dialogues of an earlier run, dropping a last line cut off mid-write.

    Args:
        path: the progress file (JSONL, one dialogue per line).
    """
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                records.pop()
                break
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def _generate_batch(chat: ChatModel, batch: list[DialoguePlan]) -> list[dict]:
    histories = {p.dialogue_id: [] for p in batch}
    disclosed = {p.dialogue_id: False for p in batch}
    for turn in range(max(len(p.states) for p in batch)):
        active = [p for p in batch if turn < len(p.states)]
        disclose = {}
        for p in active:
            rises = turn > 0 and p.states[turn] in ("upset", "distressed") and p.states[turn] != p.states[turn - 1]
            if rises and not disclosed[p.dialogue_id]:
                event = load_phrases().tasks[p.task].triggers[p.trigger].event
                disclose[p.dialogue_id] = event.format(detail=p.detail)
                disclosed[p.dialogue_id] = True
        window = chat.llm.context_messages
        users = chat([user_prompt(p, turn, histories[p.dialogue_id][-window:], disclose.get(p.dialogue_id))
                      for p in active])
        for p, text in zip(active, users):
            histories[p.dialogue_id].append(user_turn(text, p.states[turn]))
        replies = chat([assistant_prompt(p, turn, histories[p.dialogue_id][-window:]) for p in active])
        for p, text in zip(active, replies):
            histories[p.dialogue_id].append(assistant_turn(text, p, turn))
    return [record(p, histories[p.dialogue_id], backend="llm") for p in batch]


def generate_llm(config: SynthConfig, llm: LLMSynthConfig, progress_file: str | Path,
                 model=None, on_dialogue=None) -> dict[str, list[dict]]:
    """Generate (or finish generating) a corpus with a chat model.

    Args:
        config: what to generate (the same plans as the template backend).
        llm: how to generate.
        progress_file: JSONL to which finished dialogues are appended; rerunning
            with the same file and config skips them.
        model: a loaded ``(model, tokenizer)`` pair, overriding ``llm.model``.
        on_dialogue: called with each finished record after it is saved.

    Returns:
        split name -> dialogue records, in plan order.
    """
    return generate_in_batches(config, llm, progress_file, _generate_batch, model, on_dialogue)


def generate_in_batches(config: SynthConfig, llm: LLMSynthConfig, progress_file: str | Path, write_batch,
                        model=None, on_dialogue=None) -> dict[str, list[dict]]:
    """Realises the plans in batches with a chat model, appending each finished dialogue to a
    progress file at once; a rerun with the same file skips the dialogues already there.

    Args:
        config: what to generate.
        llm: how to generate.
        progress_file: the progress file (JSONL, one dialogue per line).
        write_batch: ``(ChatModel, plans) -> records`` for one batch of plans.
        model: a loaded ``(model, tokenizer)`` pair, overriding ``llm.model``.
        on_dialogue: called with each finished record after it is saved.

    Returns:
        split name -> dialogue records, in plan order.
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    progress_file = Path(progress_file)
    progress_file.parent.mkdir(parents=True, exist_ok=True)
    all_plans = plans(config)
    wanted = {p.dialogue_id for p in all_plans}
    done = {r["dialogue_id"]: r for r in read_progress(progress_file) if r["dialogue_id"] in wanted}
    pending = [p for p in all_plans if p.dialogue_id not in done]
    if pending:
        chat = ChatModel(llm, model)
        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns) as bar, open(progress_file, "a") as out:
            task = bar.add_task("dialogues", total=len(all_plans), completed=len(done))
            for start in range(0, len(pending), llm.batch_size):
                torch.manual_seed(llm.seed + start)
                for rec in write_batch(chat, pending[start:start + llm.batch_size]):
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    done[rec["dialogue_id"]] = rec
                    bar.advance(task)
                    if on_dialogue is not None:
                        on_dialogue(rec)
    by_split = {name: [] for name in SPLITS}
    for p in all_plans:
        by_split[p.split].append(done[p.dialogue_id])
    return by_split
