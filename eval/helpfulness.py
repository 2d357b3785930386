"""Helpfulness scorer: does a reply give useful content for what the user asked?

The rubric's helpfulness (``eval/data/rating/RUBRIC.md``, 1-5) asks whether a reply addresses
the user's current request with specific content, whatever its empathy. This scorer reads
three things the rubric names, with the embedding scorer's MiniLM (:mod:`.embedding`):

* **useful content**: each distinct sentence is compared with prototype sentences of concrete
  advice or facts and of everything else (filler, greetings, sympathy, vague hedges, the
  speaker's own feelings, loops); ``p_useful`` is the softmax weight of the first class;
* **on the point**: the sentence's cosine similarity with the user's latest message;
* **not degenerate**: the reply's distinct-2 (a loop repeats its word pairs) and the share of
  its sentences copied from an earlier assistant message of the context.

``raw = 1 + 4 * max over sentences (p_useful * relevance) * distinct-2 * (1 - copied share)``,
then an isotonic curve fitted on the rating sets' fit parts maps it to the raters' helpfulness
(:func:`fit_helpfulness_curve`; stored in ``eval/data/calibration.jsonl`` under ``helpfulness``).
Its agreement with the raters is in ``eval/README.md``; it is a coarse signal (the raters agree
with each other far better), meant to show a system whose replies stop helping, not to rank
close systems.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .calibration import RATING_SETS, IsotonicCurve, SplitConfig, calibration_path, fit_items, load_curves
from .embedding import EmbeddingScorer, distinct_sentences
from .scoring import check_inputs

CURVE_KEY = "helpfulness"
FIT_COMMAND = "python -m moe_empathy.eval.fit_calibration --scorers helpfulness"

# Written for this scorer: concrete advice and facts a user could act on.
USEFUL: tuple[str, ...] = (
    "Restart the device and install the latest driver.",
    "The train takes about two hours and tickets cost thirty euros.",
    "Bring a list of your medicines to the appointment.",
    "Tailor your resume to each job posting.",
    "Fill in the form and send it with a copy of the certificate.",
    "Check the settings menu under network preferences.",
    "You could try going to bed at the same time every night.",
    "Write down the questions before the meeting.",
    "Most banks let you freeze the card in their app.",
    "A good first step is to make a simple budget.",
    "Ask the airline desk for a hotel voucher and a seat on the first flight out.",
    "Try a short walk after dinner and keep screens out of the bedroom.",
    "See a doctor within a week if the pain does not ease.",
    "Call them and ask for a written quote before you agree.",
    "Practise the answers to common questions out loud.",
    "Watch a comedy like Paddington; it is funny for kids and adults.",
)
# Written for this scorer: sentences that do not help with the request.
OTHER: tuple[str, ...] = (
    "Sure, I can sort that out for you.",
    "Hi there! How can I help you today?",
    "Great question!",
    "Thanks for reaching out.",
    "Let me know if you need anything else.",
    "My condolences, this must be awful for you.",
    "What a terrible situation to be in.",
    "How do you feel about all this?",
    "Your feelings are completely valid.",
    "Oh no, how annoying!",
    "I'm crying, I'm so lucky.",
    "It depends on many things.",
    "There are many options to consider.",
    "You raise a good question there.",
    "Okay, here is what I think about that.",
    "The news paper page the news paper page.",
)

_WORDS = re.compile(r"\w+")


@dataclass(frozen=True)
class HelpfulnessConfig:
    """Settings of the helpfulness scorer.

    Attributes:
        temperature: softmax temperature between the useful and the other prototypes.
        top_k: prototypes averaged per class (their closest to the sentence).
    """

    temperature: float = 0.05
    top_k: int = 3


def distinct_2(reply: str) -> float:
    """Share of a reply's word pairs that are distinct (1.0 for fewer than two words).

    Args:
        reply: the text.
    """
    words = _WORDS.findall(reply.lower())
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def copied_share(reply: str, context: list[dict]) -> float:
    """Share of a reply's distinct sentences that an earlier assistant message of the context
    already said (compared lower-cased, as :func:`~.embedding.distinct_sentences` keys them).

    Args:
        reply: the text.
        context: the conversation before it, as ``{"role", "content"}`` messages.
    """
    said = {s.lower() for m in context if m["role"] == "assistant" for s in distinct_sentences(m["content"])}
    sentences = [s.lower() for s in distinct_sentences(reply)]
    return float(np.mean([s in said for s in sentences])) if sentences and said else 0.0


class HelpfulnessScorer:
    """Raw helpfulness (1-5) of replies in context, optionally through the stored curve.

    Args:
        embedder: the MiniLM wrapper to reuse (default: a new :class:`~.embedding.EmbeddingScorer`).
        config: temperature and prototypes per class.
        calibrated: map the raw scores through the stored isotonic curve.

    Raises:
        ValueError: when ``calibrated`` and no curve is stored, naming the command that fits one.
    """

    name = CURVE_KEY

    def __init__(self, embedder: EmbeddingScorer | None = None, config: HelpfulnessConfig = HelpfulnessConfig(), calibrated: bool = True):
        self.embedder = embedder or EmbeddingScorer()
        self.config = config
        self._useful = self.embedder.embed(list(USEFUL))  # [prototypes, H]
        self._other = self.embedder.embed(list(OTHER))  # [prototypes, H]
        self.curve = None
        if calibrated:
            stored = load_curves().get(CURVE_KEY)
            if stored is None:
                raise ValueError(f"no helpfulness calibration is stored in {calibration_path()}; fit one with `{FIT_COMMAND}`")
            self.curve = IsotonicCurve(x=stored["x"], y=stored["y"])

    def score(self, responses, contexts=None) -> list[float]:
        """Helpfulness of each response on the 1-5 scale.

        Args:
            responses: the assistant replies (non-empty strings).
            contexts: the conversation before each reply (messages, or a string read as one
                user message), or None (then nothing is on the point: every reply scores 1).
        """
        responses, contexts = check_inputs(responses, contexts)
        if not responses:
            return []
        raw = self.raw_scores(responses, contexts)
        return [float(v) for v in (self.curve(raw) if self.curve is not None else raw)]

    def raw_scores(self, responses: list[str], contexts: list[list[dict]]) -> np.ndarray:
        """``[n]`` raw scores of checked inputs (see the module docstring).

        Args:
            responses: the replies.
            contexts: their contexts as message lists.
        """
        import torch

        sentences, owners = [], []
        for i, response in enumerate(responses):
            parts = distinct_sentences(response) or [response.strip()]
            sentences += parts
            owners += [i] * len(parts)
        embedded = self.embedder.embed(sentences)  # [sentences, H]
        k = self.config.top_k
        useful = (embedded @ self._useful.T).topk(min(k, len(USEFUL)), dim=1).values.mean(1)  # [sentences]
        other = (embedded @ self._other.T).topk(min(k, len(OTHER)), dim=1).values.mean(1)  # [sentences]
        p_useful = torch.sigmoid((useful - other) / self.config.temperature)  # [sentences]
        users = [next((m["content"] for m in reversed(c) if m["role"] == "user"), "") for c in contexts]
        has_user = [bool(u.strip()) for u in users]
        asked = self.embedder.embed([u if u.strip() else "." for u in users])  # [responses, H]
        owners_t = torch.tensor(owners)
        relevance = (embedded * asked[owners_t]).sum(1).clamp(min=0.0)  # [sentences]
        best = torch.zeros(len(responses)).scatter_reduce(0, owners_t, p_useful * relevance, reduce="amax")  # [responses]
        raw = []
        for i, (response, context) in enumerate(zip(responses, contexts)):
            value = float(best[i]) if has_user[i] else 0.0
            raw.append(1.0 + 4.0 * value * distinct_2(response) * (1.0 - copied_share(response, context)))
        return np.array(raw)


def fit_helpfulness_curve(scorer: HelpfulnessScorer, config: SplitConfig = SplitConfig()) -> dict:
    """Fits the isotonic curve from raw scores to the raters' mean helpfulness on the fit parts
    of the sets of model-written replies (the same fixed split as the empathy curves).

    Args:
        scorer: a helpfulness scorer (its raw scores are used, calibrated or not).
        config: the split.

    Returns:
        The entry stored in the calibration file.
    """
    splits = fit_items(config)
    fit = splits.model_written("fit")
    raw = scorer.raw_scores([i.reply for i in fit], [i.context for i in fit])
    curve = IsotonicCurve.fit(raw, [i.helpfulness for i in fit])
    return {"x": curve.x, "y": curve.y, "target": "raters' mean helpfulness (1-5)", "fitted_on": {name: len(splits.fit[name]) for name in RATING_SETS},
            "split": {"heldout_fraction": config.heldout_fraction, "seed": config.seed}}
