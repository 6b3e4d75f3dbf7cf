"""Evaluation: the embedded-data quality metric (a small digits classifier's accuracy and
Fréchet distance in its feature space)."""

from .digits import DigitsJudge, digits_report, frechet_distance

__all__ = ["DigitsJudge", "digits_report", "frechet_distance"]
