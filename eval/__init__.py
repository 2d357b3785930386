"""Evaluation: per-turn empathy scorers and their validation."""

from .scorers import SCORERS, get_scorer
from .scoring import EmpathyScore

__all__ = ["SCORERS", "EmpathyScore", "get_scorer"]
