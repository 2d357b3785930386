"""Evaluation: per-turn empathy scorers and their validation."""

from .scorers import SCORERS, EmpathyScore, get_scorer

__all__ = ["SCORERS", "EmpathyScore", "get_scorer"]
