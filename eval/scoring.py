"""What every empathy scorer shares: the score type, the input checks, the 1-5 mapping and
the :class:`Scorer` base class. The scorers (:mod:`.lexical`, :mod:`.embedding`,
:mod:`.judge`) build on this module; the registry that names them is :mod:`.scorers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_empathy.train.taxonomy import MAX_STRENGTH, MECHANISMS, total_to_score


@dataclass
class EmpathyScore:
    """Empathy of one response.

    Attributes:
        score: 1 (no empathy) to 5 (strong empathy).
        mechanisms: strength 0-2 of ``emotional_reaction``, ``interpretation``
            and ``exploration`` (EPITOME).
    """

    score: float
    mechanisms: dict[str, int] = field(default_factory=dict)


def mechanisms_to_score(strengths: dict[str, float]) -> float:
    """Map mechanism strengths (0-2 each, may be fractional) to the 1-5 scale.

    Args:
        strengths: one value per mechanism; values outside 0-2 are clipped.
    """
    return total_to_score(sum(min(max(float(strengths[m]), 0.0), MAX_STRENGTH) for m in MECHANISMS))


def context_messages(context) -> list[dict]:
    """The conversation before a response, as ``{"role", "content"}`` messages.

    Args:
        context: a list of ``{"role", "content"}`` messages, or a string (read as one user
            message; "" for no context).
    """
    if isinstance(context, str):
        return [{"role": "user", "content": context}] if context.strip() else []
    if isinstance(context, (list, tuple)) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in context
    ):
        return [{"role": m.get("role", "user"), "content": m["content"]} for m in context]
    raise TypeError(
        "a context must be a string or a list of {'role', 'content'} messages, "
        f"got {type(context).__name__}"
    )


def context_text(messages: list[dict]) -> str:
    """A conversation as ``role: content`` lines (for a prompt).

    Args:
        messages: from :func:`context_messages`.
    """
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def check_inputs(responses, contexts) -> tuple[list[str], list[list[dict]]]:
    """Validate a scoring call and normalise each context to messages (:func:`context_messages`).

    Args:
        responses: list of non-empty strings.
        contexts: list of the same length (string or message list each), or None.

    Raises:
        TypeError / ValueError: naming the bad item and what to pass instead.
    """
    if isinstance(responses, str) or not isinstance(responses, (list, tuple)):
        raise TypeError("responses must be a list of strings; wrap a single response as [response]")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise TypeError(f"responses[{i}] is {type(r).__name__}, not a string")
        if not r.strip():
            raise ValueError(f"responses[{i}] is empty; drop it or score a non-empty reply")
    if contexts is None:
        return list(responses), [[] for _ in responses]
    if isinstance(contexts, str) or not isinstance(contexts, (list, tuple)):
        raise TypeError("contexts must be a list with one context per response (or None)")
    if len(contexts) != len(responses):
        raise ValueError(
            f"got {len(responses)} responses but {len(contexts)} contexts; "
            "pass one context per response"
        )
    return list(responses), [context_messages(c) for c in contexts]


class Scorer:
    """Base class: subclasses implement :meth:`_score` on checked inputs."""

    name = "base"

    @property
    def calibration_key(self) -> str:
        """The name its calibration curve is stored under (:mod:`.calibration`): settings that
        change the raw scores (another judge model) need a curve of their own."""
        return self.name

    def score(self, responses, contexts=None) -> list[EmpathyScore]:
        """Score each response in its context.

        Args:
            responses: the assistant replies.
            contexts: the conversation before each reply (messages, or a string read as one
                user message), or None.
        """
        responses, contexts = check_inputs(responses, contexts)
        return self._score(responses, contexts) if responses else []

    def _score(self, responses: list[str], contexts: list[list[dict]]) -> list[EmpathyScore]:
        raise NotImplementedError
