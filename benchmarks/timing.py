"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this imports as `timing`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def time_call(
    fn: Callable[[], Any], reps: int, reduce: Callable[[Sequence[float]], float] = statistics.median
) -> float:
    """`reduce` (default: the median) of the seconds of `reps` calls, each blocked on its result."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return reduce(times)
