"""Seeds for torch's generators from epg's seed formulas (seed·1_000_003 + epoch and the like)."""

from __future__ import annotations


def torch_seed(value: int) -> int:
    """``value`` mod 2^64: torch takes 64-bit seeds and reduces every value it accepts this way
    (a negative one too), so a formula's result gives the stream it always gave, and one past
    64 bits (a large user seed) a stream instead of "Overflow when unpacking long long"."""
    return value % 2**64
