"""Range checks of the objectives' options, run at construction: out of range, most of them
train without an error (a negative temperature turns a contrastive loss around, a negative
σ_data flips c_out's sign)."""

from __future__ import annotations

import math


def require_positive(**values: float) -> None:
    """Refuse any value that is not a finite number > 0, naming it."""
    for name, value in values.items():
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


def require_fraction(**values: float) -> None:
    """Refuse any value outside [0, 1], naming it."""
    for name, value in values.items():
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def require_finite(**values: float) -> None:
    """Refuse NaN and infinities, naming the value (a NaN mean made every step non-finite)."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
