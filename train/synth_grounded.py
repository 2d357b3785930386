"""Grounded backend of the dialogue generator: the template backend's plans, user messages
and empathy sentences (:mod:`.synth_template`), around helpful content that the base model
itself wrote.

At each turn the base model answers the user's latest message (greedy, from a plain
helpful-assistant prompt, with the dialogue so far); its reflexive sympathy, courtesy filler,
talk about being an AI and a sentence cut off by the token limit are removed
(:func:`clean_content`), and the planned empathy sentences are composed around what is
left. The replies of every level then share the base's own content, so the experts trained
on them can only learn to differ in empathy, and the low expert has no reason to be less
helpful than the base. A turn whose answer leaves nothing usable keeps the phrase data's
advice; the corpus card counts those turns.

Generation runs in batches, turn by turn, like the LLM backend, and each finished dialogue is
appended to a progress file at once, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import re
from pathlib import Path

from .synth_corpus import record
from .synth_llm import ChatModel, LLMSynthConfig, generate_in_batches
from .synth_plan import DialoguePlan, SynthConfig
from .synth_template import TemplateDialogue
from .taxonomy import TASKS

# Sentences of the base's answer that the planned empathy replaces (sympathy, reassurance) or that
# carry no help (courtesy, thanks, talk about being an AI or about itself).
_DROP = re.compile(
    r"\b(sorry|apologi[sz]e|understand|understandable|imagine|must (be|feel)|i hear you|"
    r"sounds? (so |really |very |quite )?(hard|tough|difficult|frustrating|stressful|overwhelming|scary|awful)|"
    r"(that's|that is|it's|it is) (so |really |very )?(hard|tough|rough|frustrating|stressful|normal to feel)|"
    r"don't worry|feel free|reach out|i'm here|i am here|here to help|happy to help|glad to help|"
    r"hope (this|that|it) helps|great question|good question|as an ai|as a chatbot|language model|"
    r"i'm just an|i am just an|i don't have (personal|feelings|emotions)|i must inform|i'm (not )?(a|an|here)\b|i am (not )?(a|an)\b|"
    r"you're welcome|you are welcome|you're not alone|you'll get through|brave|"
    r"i'm (so |really |very )?(glad|happy|sure|excited|thrilled|proud)|let me know|let's talk|"
    r"(any|more|other) questions|further (assistance|help)|just a (moment|minute|second|little))\b",
    re.IGNORECASE,
)
_SENTENCES = re.compile(r"(?<=[.!?])\s+")
_MARKUP = re.compile(r"\*\*|__|`")
# a list item's marker: at a line's start or right after a sentence ("1. ", "- "), not "costs 30. Then"
_LIST_MARKER = re.compile(r"(?:^\s*|(?<=[.!?:]\s))(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
_TERMINAL = (".", "!", "?")


def content_prompt(plan: DialoguePlan, history: list[dict]) -> list[dict]:
    """Messages that make the base model answer the user's latest message plainly.

    Args:
        plan: the dialogue's plan.
        history: the dialogue so far, ending with the user's message.
    """
    system = (f"You are a helpful assistant for {TASKS[plan.task].title.lower()}. Answer the user's latest "
              "message with concrete, practical help in two or three short sentences.")
    return [{"role": "system", "content": system},
            *[{"role": t["role"], "content": t["content"]} for t in history]]


def clean_content(text: str, max_sentences: int = 3) -> str | None:
    """The helpful part of a base model's answer, or None when nothing usable is left.

    Removes markdown markup, sentences of sympathy, courtesy or talk about being an AI
    (the planned empathy replaces them), and a last sentence without its end.

    Args:
        text: the base model's answer.
        max_sentences: most sentences kept.
    """
    flat = " ".join(_LIST_MARKER.sub("", _MARKUP.sub("", text)).split())
    sentences = [s for s in _SENTENCES.split(flat) if s]
    if sentences and not sentences[-1].endswith(_TERMINAL):
        sentences.pop()
    kept = [s for s in sentences if not _DROP.search(s)][:max_sentences]
    content = " ".join(kept)
    return content if len(content.split()) >= 4 else None


def _write_batch(chat: ChatModel, batch: list[DialoguePlan]) -> list[dict]:
    """Realises a batch of plans turn by turn, the base's answers of a turn in one call.

    Args:
        chat: the model that writes the helpful content.
        batch: the plans, realised together.
    """
    dialogues = {p.dialogue_id: TemplateDialogue(p) for p in batch}
    grounded = dict.fromkeys(dialogues, 0)
    window = chat.llm.context_messages
    for turn in range(max(len(p.states) for p in batch)):
        active = [p for p in batch if turn < len(p.states)]
        for p in active:
            dialogues[p.dialogue_id].user()
        answers = chat([content_prompt(p, dialogues[p.dialogue_id].turns[-window:]) for p in active])
        for p, answer in zip(active, answers):
            content = clean_content(answer)
            grounded[p.dialogue_id] += content is not None
            dialogues[p.dialogue_id].reply(content)
    # the count travels in the progress file and is taken off before the corpus is written
    return [{**record(p, dialogues[p.dialogue_id].turns, backend="grounded"), "grounded_turns": grounded[p.dialogue_id]}
            for p in batch]


def generate_grounded(config: SynthConfig, llm: LLMSynthConfig, progress_file: str | Path,
                      model=None, on_dialogue=None) -> tuple[dict[str, list[dict]], dict]:
    """Generate (or finish generating) a grounded corpus.

    Args:
        config: what to generate (the same plans as the template backend).
        llm: how the base model answers; ``temperature`` 0 (greedy) writes the base's most
            likely answer.
        progress_file: JSONL to which finished dialogues are appended; rerunning with the same
            file and config skips them.
        model: a loaded ``(model, tokenizer)`` pair, overriding ``llm.model``.
        on_dialogue: called with each finished record after it is saved.

    Returns:
        split name -> dialogue records in plan order, and settings for the corpus card (the
        share of replies whose content the base wrote).
    """
    by_split = generate_in_batches(config, llm, progress_file, _write_batch, model, on_dialogue)
    records = [r for split in by_split.values() for r in split]
    grounded = sum(r.pop("grounded_turns") for r in records)
    replies = sum(r["num_turns"] for r in records)
    settings = {"backend": "grounded", "content": f"the base model wrote the helpful part of {grounded} of "
                f"{replies} replies ({grounded / max(replies, 1):.1%}); the others keep the phrase data's advice"}
    return by_split, settings
