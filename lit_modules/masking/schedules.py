"""Mask-ratio schedules f(step, total, initial, final).

Every schedule equals ``initial`` at step 0 and ``final`` at step >= total, and is
monotone in between (non-increasing when initial > final, non-decreasing otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config_errors import ConfigError

# exp(-5) ~ 0.0067: by the end the unscaled exponential has covered 99.3% of the way;
# the rescaling below makes it reach `final` exactly.
_EXP_RATE = 5.0


def constant(step: int, total: int, initial: float, final: float) -> float:
    """Always ``initial`` (``final`` is ignored: a constant schedule has one value)."""
    return initial


def linear(step: int, total: int, initial: float, final: float) -> float:
    return _blend(initial, final, 1.0 - _progress(step, total))


def cosine(step: int, total: int, initial: float, final: float) -> float:
    """Half-cosine: final + (initial - final) * (1 + cos(pi * x)) / 2.

    (The often-printed ``final + (initial - final) * cos(pi * x)`` ends at
    2 * final - initial, e.g. -0.6 for 0.8 -> 0.1.)
    """
    x = _progress(step, total)
    return _blend(initial, final, (1.0 + math.cos(math.pi * x)) / 2.0)


def exponential(step: int, total: int, initial: float, final: float) -> float:
    """final + (initial - final) * (exp(-5x) - exp(-5)) / (1 - exp(-5)): exact endpoints."""
    x = _progress(step, total)
    floor = math.exp(-_EXP_RATE)
    w = (math.exp(-_EXP_RATE * x) - floor) / (1.0 - floor)
    return _blend(initial, final, w)


def _blend(initial: float, final: float, w: float) -> float:
    """The value with weight ``w`` left on ``initial`` (1 at the start, 0 at the end).

    Measured from the nearer endpoint, so both endpoints are exact in floating point
    (``final + (initial - final) * w`` ends 0.1 -> 0.8 at 0.09999999999999998) and each
    half is monotone in ``w``.
    """
    if w >= 0.5:
        return initial - (initial - final) * (1.0 - w)
    return final + (initial - final) * w


def _progress(step: int, total: int) -> float:
    if total <= 0:
        return 1.0
    return min(max(step / total, 0.0), 1.0)


SCHEDULES: dict[str, Callable[[int, int, float, float], float]] = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
    "exponential": exponential,
}


def get_schedule(name: str) -> Callable[[int, int, float, float], float]:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ConfigError("mask_ratio_schedule", name, f"allowed: {', '.join(sorted(SCHEDULES))}") from None
