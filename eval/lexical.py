"""Lexicon-and-pattern scorer.

Emotional reaction: the responder voicing feeling (first-person sympathy patterns,
VADER's affect intensity, Empath's sympathy/affection categories, NRC emotion
words). Interpretation: statements that name or validate the other's state.
Exploration: questions addressed to the user, strong when they ask about feelings
or experience rather than facts.
"""

from __future__ import annotations

import re

from moe_empathy.train.taxonomy import MECHANISMS

from .scoring import EmpathyScore, Scorer, mechanisms_to_score

_WORDS = re.compile(r"[a-z']+")
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")

# first-person expressions of feeling about the other's situation
_REACTION = [re.compile(p) for p in (
    r"\bi(?:'m| am)\s+(?:so\s+|really\s+|truly\s+|very\s+)?(?:sorry|saddened|sad to|moved|touched|heartbroken)\b",
    r"\bmy (?:heart|thoughts)\b",
    r"\bcondolences\b",
    r"\b(?:oh no|oh,|ugh|oof|gosh|aw+)\b",
    r"\b(?:how|that(?:'s| is)|what an?)\s+(?:awful|terrible|horrible|heartbreaking|painful|rough|brutal|devastating|maddening|frightening|scary)\b",
    r"\bi(?:'m| am) (?:really )?glad you (?:told|shared|reached)\b",
    r"\bi(?:'m| am) here (?:with|for) you\b",
)]
# statements of understanding: inferring or validating the user's feelings
_INTERPRETATION = [re.compile(p) for p in (
    r"\b(?:it |that )?(?:sounds|seems|looks) (?:like|as if|really|so|very|incredibly|agonising|exhausting|hard|heavy)\b",
    r"\bmust (?:be|feel|have)\b",
    r"\bi (?:can )?(?:only )?(?:imagine|understand|see why|get why|hear)\b",
    r"\b(?:makes?|made) (?:complete |total |a lot of |perfect )?sense\b",
    r"\b(?:no wonder|of course (?:it|you)|it's no surprise|understandabl[ey])\b",
    r"\b(?:natural|normal|okay|understandable|common) (?:to|reaction|response)\b",
    r"\byou(?:'re| are) not alone\b",
    r"\b(?:would|could) (?:wear|weigh|shake) (?:anyone|on anyone)\b",
    r"\bwould (?:feel|make anyone)\b",
)]
_FEELING_QUESTION = re.compile(
    r"\b(?:feel|feeling|felt|holding up|coping|cope|going through|doing right now|how are you"
    r"|talk about|tell me (?:about|more)|mind|on your mind|need|support|someone|anyone"
    r"|mean to you|hardest|like for you|before|love|memory)\b"
)
_YOU = re.compile(r"\byou(?:r|rs|'re|'ve|'d)?\b")


class LexicalScorer(Scorer):
    """Scores with VADER, Empath and NRCLex plus hand-written patterns.

    Args:
        None: the lexicons ship with their packages.
    """

    name = "lexical"

    def __init__(self):
        from empath import Empath
        from nrclex import NRCLex
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()
        self._empath = Empath()
        self._nrc = NRCLex()

    def mechanism_evidence(self, response: str) -> dict[str, float]:
        """Continuous strength (0-2) of each mechanism in one response.

        Args:
            response: the reply to analyse.
        """
        text = response.lower()
        words = _WORDS.findall(text)
        sentences = [s for s in _SENTENCES.split(text) if s.strip()]
        affect = self._empath.analyze(text, categories=["sympathy", "affection", "sadness", "suffering"],
                                      normalize=True) or {}
        self._nrc.load_token_list(words)
        emotional = sum(v for k, v in self._nrc.raw_emotion_scores.items() if k not in ("positive", "negative"))
        vader = self._vader.polarity_scores(response)
        reaction = sum(bool(p.search(text)) for p in _REACTION)
        reaction += 0.5 * (sum(affect.values()) > 0.02) + 0.25 * min(emotional, 4) / 4
        reaction += 0.25 * (abs(vader["compound"]) > 0.5)
        interpretation = sum(bool(p.search(text)) for p in _INTERPRETATION)
        questions = [s for s in sentences if s.rstrip().endswith("?") and _YOU.search(s)]
        exploration = 0.0
        if questions:
            exploration = 1.0 + sum(bool(_FEELING_QUESTION.search(q)) for q in questions)
        return {
            "emotional_reaction": min(reaction, 2.0),
            "interpretation": min(interpretation * 0.8, 2.0),
            "exploration": min(exploration, 2.0),
        }

    def _score(self, responses, contexts):
        results = []
        for response in responses:
            evidence = self.mechanism_evidence(response)
            mechanisms = {m: int(round(evidence[m] + 1e-9)) for m in MECHANISMS}
            results.append(EmpathyScore(score=mechanisms_to_score(evidence), mechanisms=mechanisms))
        return results
