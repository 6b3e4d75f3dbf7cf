"""Evaluation: ADM-compatible image metrics (FID, sFID, Inception Score, precision/recall on a
local FID Inception-V3) and the embedded-data quality metric (a small digits classifier's
accuracy and Fréchet distance in its feature space)."""

from .adm import (
    Activations,
    FIDStatistics,
    compute_activations,
    evaluate,
    format_table,
    frechet_distance_from_stats,
    inception_score,
    manifold_radii,
    precision_recall,
    save_reference_statistics,
    trace_sqrt_product,
)
from .digits import DigitsJudge, digits_report, frechet_distance
from .inception import WEIGHTS_ENV, InceptionOutput, InceptionV3, load_inception

__all__ = [
    "Activations",
    "DigitsJudge",
    "FIDStatistics",
    "InceptionOutput",
    "InceptionV3",
    "WEIGHTS_ENV",
    "compute_activations",
    "digits_report",
    "evaluate",
    "format_table",
    "frechet_distance",
    "frechet_distance_from_stats",
    "inception_score",
    "load_inception",
    "manifold_radii",
    "precision_recall",
    "save_reference_statistics",
    "trace_sqrt_product",
]
