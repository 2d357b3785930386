"""Per-turn empathy scorers, by name.

``get_scorer(name)`` returns an object whose ``.score(responses, contexts)`` gives an
:class:`~.scoring.EmpathyScore` per response. Scorers: ``lexical`` (lexicons and patterns,
:mod:`.lexical`), ``embedding`` (MiniLM similarity to prototype sentences,
:mod:`.embedding`), ``judge`` (a chat model's rubric rating, local or over an
OpenAI-compatible endpoint, :mod:`.judge`). What they share is in :mod:`.scoring`;
calibration to the 1-5 scale is in :mod:`.calibration`; validation against rated replies is
in :mod:`.validate_scorers`.

No scorer reads the dialogue generator's phrase inventory: evaluating with it
would only measure template recall (a test enforces this).
"""

from __future__ import annotations

from .calibration import CalibratedScorer
from .embedding import EmbeddingScorer
from .judge import JudgeScorer
from .lexical import LexicalScorer
from .scoring import Scorer

SCORERS: dict[str, type[Scorer]] = {
    LexicalScorer.name: LexicalScorer,
    EmbeddingScorer.name: EmbeddingScorer,
    JudgeScorer.name: JudgeScorer,
}


def get_scorer(name: str, calibrated: bool = True, **kwargs) -> Scorer:
    """Build a scorer by name.

    Args:
        name: ``lexical``, ``embedding`` or ``judge``.
        calibrated: map its scores through the stored calibration curve
            (:class:`~.calibration.CalibratedScorer`); False gives the raw scores.
        **kwargs: passed to the scorer's constructor (e.g. ``model=`` for the judge).

    Raises:
        ValueError: for an unknown name, listing the known ones, or a calibrated scorer
            without a stored curve (naming the command that fits one).
    """
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose from: {', '.join(SCORERS)}")
    scorer = SCORERS[name](**kwargs)
    return CalibratedScorer(scorer) if calibrated else scorer
