"""How the lines sharetune prints write counts and numbers."""

from __future__ import annotations

import math
import numbers


def plural(count: int, noun: str) -> str:
    """`1 epoch`, `3 epochs`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def number(value: float) -> str:
    """A whole number as itself (458573 parameters, not 4.586e+05), any other to four significant figures."""
    if isinstance(value, numbers.Integral) or (isinstance(value, float) and math.isfinite(value) and value.is_integer()
                                               and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.4g}"
