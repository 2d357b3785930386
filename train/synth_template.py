"""Template backend of the dialogue generator: realises a plan (:mod:`.synth_plan`) as
text composed from the phrase data (:mod:`.phrases`).

User messages come from the situation's requests, the task's follow-up questions and
triggers and the user's style; a reply is composed of empathy sentences (one per
mechanism the plan asks for, at its strength) around its helpful content, with leads
and connectives; a question about the user's feelings (strong exploration) comes before the
help, a weak one (a check on the help) ends the reply. The helpful content answers
the user's message: a follow-up question gets that question's answer, any other message
the next one or two items of the situation's (then the task's) advice.
"""

from __future__ import annotations

import random
import re

from .phrases import load_phrases
from .synth_corpus import assistant_turn, record, user_turn
from .synth_plan import SPLITS, DialoguePlan, SynthConfig, plans
from .taxonomy import MAX_STRENGTH, STATE_OFFSET

_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")
_KEEP_CAPITAL = ("I", "I'm", "I'd", "I'll", "I've")


def _capitalise(text: str) -> str:
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def _second_person(text: str) -> str:
    return re.sub(r"\bmy\b", "your", text)


def _lower_first(text: str) -> str:
    """Lower-case the first letter of a template so that it can follow a lead,
    unless it starts with a placeholder, "I" or an acronym."""
    word = text.split(" ", 1)[0].rstrip(",;:")
    if text.startswith("{") or word in _KEEP_CAPITAL or word[1:2].isupper():
        return text
    return text[0].lower() + text[1:]


def _lead(lead: str, text: str) -> str:
    return lead + _lower_first(text) if lead else text


class _Filler:
    """Fills placeholders in the user's voice or the assistant's (second person)."""

    def __init__(self, plan: DialoguePlan, rng):
        spec = load_phrases().tasks[plan.task]
        slots = {**spec.slots, **spec.situations[plan.situation].slots}
        self.user = {
            "detail": plan.detail,
            "emotion": plan.emotion,
            "topic": spec.short,
            **{slot: rng.choice(options) for slot, options in slots.items()},
        }
        self.assistant = {key: _second_person(value) for key, value in self.user.items()}
        self.assistant["topic"] = self.assistant["event"] = spec.topic.format(**self.assistant)

    def __call__(self, template: str, voice: str = "assistant", **extra) -> str:
        values = self.user if voice == "user" else self.assistant
        return _capitalise(template.format(**{**values, **extra}))


def _user_message(plan, turn, filler, rng, used_trigger, asked: list[str]) -> tuple[str, bool, tuple[str, ...] | None]:
    """The user's message at a turn.

    Args:
        plan: the dialogue's plan.
        turn: index of the exchange.
        filler: the dialogue's placeholder filler.
        rng: the dialogue's random stream.
        used_trigger: whether the user already disclosed the plan's trigger.
        asked: follow-up questions asked so far (updated); a question is asked again only
            once all of the task's have been.

    Returns:
        the message, whether the trigger is now disclosed, and the answer (an item of
        helpful content) when the message is a follow-up question, else None.
    """
    phrases = load_phrases()
    spec = phrases.tasks[plan.task]
    style = plan.persona["style"]
    state, previous = plan.states[turn], plan.states[turn - 1] if turn else None
    answer = None
    if turn == 0:
        asks = spec.situations[plan.situation].asks
        greeting, ask = rng.choice(phrases.user.greetings[style]), filler(rng.choice(asks), "user")
        if greeting and greeting[-1] not in ".!?":
            ask = ask[0].lower() + ask[1:] if not ask.startswith("I ") else ask
        text = f"{greeting} {ask}"
    elif state == previous:
        fresh = [q for q in spec.followups if q not in asked] or list(spec.followups)
        question = rng.choice(fresh)
        asked.append(question)
        answer = spec.followups[question]
        text = filler(question, "user")
        if state in ("upset", "distressed") and rng.random() < 0.3:
            text = f"{filler(rng.choice(phrases.user.still), 'user')} {text}"
    elif STATE_OFFSET[state] > STATE_OFFSET[previous] and state != "neutral" and not used_trigger:
        trigger = spec.triggers[plan.trigger]
        filler.assistant["event"] = trigger.event.format(**filler.assistant)
        return filler(trigger.says, "user"), True, None
    elif STATE_OFFSET[state] > STATE_OFFSET[previous]:
        text = filler(rng.choice(phrases.user.relapse[style]), "user")
    elif state == "steady":
        text = filler(rng.choice(phrases.user.practical[style]), "user")
    else:
        text = filler(rng.choice(phrases.user.calmer[style]), "user")
    if style == "casual" and not text.startswith("I "):
        text = text[0].lower() + text[1:]
    return (text + rng.choice(phrases.user.fillers[style])).strip(), used_trigger, answer


def _empathy(rng, mechanism: str, strength: int) -> str:
    """One sentence (a template) of a mechanism at a strength, composed from a frame's pieces.

    Args:
        rng: the dialogue's random stream.
        mechanism: one of ``taxonomy.MECHANISMS``.
        strength: 1 (weak) or 2 (strong).
    """
    text = ""
    for options in rng.choice(load_phrases().assistant.empathy[mechanism][strength]):
        piece = rng.choice(options)
        if piece:
            text += piece if not text or piece[0] in ",;:.!?" else " " + piece
    return text


def _is_step(item: str) -> bool:
    return item[0].islower()


def _after(opener: str, lead: str) -> str:
    # after an opener, only leads that complete a step ("you could") are kept
    return "" if opener and (":" in lead or lead.endswith(", ")) else lead


def _advice(rng, items: list[tuple[str, str]], opener: str, context: str) -> str:
    """The helpful part of a reply (a template): one or two items with leads and connectives.

    Args:
        rng: the dialogue's random stream.
        items: (paraphrase, kind) pairs in order; a paraphrase is a step or a full
            sentence, kind is ``answer`` (to the user's follow-up question), ``situation``,
            ``extra`` or ``repeat`` (said before).
        opener: what comes before the first item ("" for nothing).
        context: the task's lead placing advice in the scenario's detail.
    """
    assistant = load_phrases().assistant
    (first, kind), rest = items[0], items[1:]
    if kind == "answer":  # an answer speaks for itself ("No, ...", "Only if ..."): no lead, no context
        lead = ""
    elif kind == "repeat":
        lead = rng.choice(assistant.recaps)
    else:
        lead = rng.choice(assistant.step_leads if _is_step(first) else assistant.sentence_leads)
    if kind != "answer" and rng.random() < 0.4:
        opener = _lead(opener, context)
    text = _lead(_after(opener, lead), first)
    if _is_step(first) and rest and _is_step(rest[0][0]) and rest[0][1] == kind and rng.random() < 0.5:
        text += rng.choice(assistant.step_joins) + rest.pop(0)[0]
    sentences = [_lead(opener, text + ("." if _is_step(first) else ""))]
    for item, kind in rest:
        if kind == "repeat":
            connective = rng.choice(assistant.recaps)
        else:
            connective = rng.choice(assistant.step_connectives if _is_step(item) else assistant.sentence_connectives)
        sentences.append(_lead(connective, item) + ("." if _is_step(item) else ""))
    return " ".join(sentences)


def _next_help(plan, rng, help_queue: list, said: set, count: int) -> list[tuple[str, str]]:
    """Take the next ``count`` items of helpful content, refilling the queue with
    the task's general items when it runs dry, and pick a paraphrase of each.

    Args:
        plan: the dialogue's plan.
        rng: the dialogue's random stream.
        help_queue: items still to say, situation items first.
        said: items said so far in the dialogue (updated).
        count: how many items.

    Returns:
        (paraphrase, kind) pairs, kind as in :func:`_advice`.
    """
    spec = load_phrases().tasks[plan.task]
    situation = spec.situations[plan.situation].help
    chosen = []
    for _ in range(count):
        if not help_queue:
            extra = list(spec.extra_help)
            rng.shuffle(extra)
            help_queue.extend(extra)
        item = help_queue.pop(0)
        kind = "repeat" if item in said else "situation" if item in situation else "extra"
        said.add(item)
        chosen.append((rng.choice(item), kind))
    return chosen


def _assistant_message(plan, turn, filler, rng, help_queue, said, answer, content: str | None = None) -> str:
    """The assistant's reply at a turn (see the module's docstring).

    Args:
        plan: the dialogue's plan.
        turn: index of the exchange.
        filler: the dialogue's placeholder filler.
        rng: the dialogue's random stream.
        help_queue: advice still to give (see :func:`_next_help`).
        said: advice given so far (see :func:`_next_help`).
        answer: the answer's paraphrases when the user asked a follow-up question, else None.
        content: finished helpful text written elsewhere (plain text, no placeholders) that
            replaces the composed advice, or None for the phrase data's advice.
    """
    phrases = load_phrases()
    strengths = plan.mechanisms[turn]
    feeling = []
    for mechanism in ("emotional_reaction", "interpretation"):
        if strengths[mechanism]:
            feeling.append(_empathy(rng, mechanism, strengths[mechanism]))
    if len(feeling) == 2 and rng.random() < 0.3:
        feeling.reverse()
    if not feeling:
        opener = rng.choice(phrases.assistant.neutral_openers)
    elif rng.random() < 0.5 and feeling[-1][-1] == "." and len(feeling[-1]) < 40:
        # a short reaction runs on into the advice
        opener = feeling.pop()[:-1] + rng.choice(phrases.assistant.run_ons)
    else:
        opener = rng.choice(phrases.assistant.bridges) if rng.random() < 0.3 else ""
    spec = phrases.tasks[plan.task]
    if content is not None:
        # braces of the outside text must survive the placeholder filling below
        advice = _lead(opener, content.replace("{", "{{").replace("}", "}}"))
    elif answer is not None:
        advice = _advice(rng, [(rng.choice(answer), "answer")], opener, spec.context)
    else:
        advice = _advice(rng, _next_help(plan, rng, help_queue, said, rng.choice((1, 1, 2))), opener, spec.context)
    parts = feeling + [advice]
    if strengths["exploration"]:
        # a question about the user's feelings comes before the help, where a reply cut at a
        # length cap keeps it; a check on the help ("does that work for you?") ends the reply
        question = _empathy(rng, "exploration", strengths["exploration"])
        parts.insert(len(feeling) if strengths["exploration"] == MAX_STRENGTH else len(parts), question)
    about = rng.choice(spec.about).format(**filler.assistant)
    return filler(" ".join(parts), emotion=rng.choice(phrases.assistant.emotion_echoes[plan.emotion]), about=about)


class TemplateDialogue:
    """A planned dialogue written out turn by turn from the phrase inventory: the user's
    message, then the reply (so another writer can supply a reply's helpful content).

    Args:
        plan: the dialogue's plan.
    """

    def __init__(self, plan: DialoguePlan):
        self.plan = plan
        self.turns: list[dict] = []  # alternating user and assistant turns of the schema
        self._rng = random.Random(plan.seed + ":text")
        self._filler = _Filler(plan, self._rng)
        self._help_queue = list(load_phrases().tasks[plan.task].situations[plan.situation].help)
        self._said: set = set()
        self._used_trigger, self._asked, self._answer = False, [], None

    def user(self) -> str:
        """Writes the user's message of the next turn and returns it."""
        turn = len(self.turns) // 2
        text, self._used_trigger, self._answer = _user_message(
            self.plan, turn, self._filler, self._rng, self._used_trigger, self._asked)
        self.turns.append(user_turn(text, self.plan.states[turn]))
        return text

    def reply(self, content: str | None = None) -> str:
        """Writes the reply to the user's latest message and returns it.

        Args:
            content: helpful text to compose the planned empathy around, or None for the
                phrase data's advice (an answer when the user asked a follow-up question).
        """
        turn = len(self.turns) // 2
        text = _assistant_message(self.plan, turn, self._filler, self._rng, self._help_queue, self._said,
                                  self._answer, content)
        self.turns.append(assistant_turn(text, self.plan, turn))
        return text


def render_template(plan: DialoguePlan) -> dict:
    """Write out a planned dialogue from the phrase inventory.

    Args:
        plan: the dialogue's plan.

    Returns:
        one record of the dataset schema (see ``train/README.md``).
    """
    dialogue = TemplateDialogue(plan)
    for _ in plan.states:
        dialogue.user()
        dialogue.reply()
    return record(plan, dialogue.turns, backend="template")


def generate(config: SynthConfig) -> dict[str, list[dict]]:
    """Generate a corpus with the template backend.

    Args:
        config: the run's configuration.

    Returns:
        split name -> dialogue records.
    """
    by_split = {name: [] for name in SPLITS}
    for plan in plans(config):
        by_split[plan.split].append(render_template(plan))
    return by_split
