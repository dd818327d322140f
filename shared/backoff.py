"""Exponential backoff with jitter, capped: one rule for run retries (API) and step retries (worker)."""

from __future__ import annotations

import random
from collections.abc import Callable

Uniform = Callable[[float, float], float]


def backoff_seconds(attempt: int, base: float, cap: float, uniform: Uniform = random.uniform) -> float:
    """The wait after failed try `attempt` (1, 2, ...): uniform(c/2, c) with c = min(cap, base * 2**(attempt-1))."""
    ceiling = min(cap, base * (2 ** max(attempt - 1, 0)))
    return max(uniform(ceiling / 2, ceiling), 0.0) if ceiling > 0 else 0.0
