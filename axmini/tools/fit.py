"""LoC-complexity: how a cost grows with the number of targets, fitted only where the points can tell.

A least-squares fit of log(cost) against log(N) (and log(M) when a second dimension varies), classified by the
rounded slopes as O(1), O(N), O(N*M), O(N^2), ... Every fit carries its R^2 (on the log scale, where the fit is
made) and its number of points; with fewer than `MIN_POINTS` points there is no class, only "n/a": three
unrelated commits do not make a growth law.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 4


@dataclass(frozen=True)
class Complexity:
    """A fitted growth law, cost ~ N**slope_n * M**slope_m, with its class `label` (e.g. "O(N*M)") and R^2."""

    label: str
    slope_n: float | None
    slope_m: float | None
    points: int
    r2: float | None = None

    @property
    def fitted(self) -> bool:
        return self.r2 is not None

    def describe(self) -> str:
        if not self.fitted:
            return self.label
        pairs = (("slope_N", self.slope_n), ("slope_M", self.slope_m))
        parts = [f"{axis}={s + 0.0 if abs(s) >= 0.005 else 0.0:.2f}" for axis, s in pairs if s is not None]
        return f"{self.label} ({', '.join([*parts, f'R^2={self.r2:.2f}', f'{self.points} points'])})"


def _order(axis: str, exponent: int) -> str:
    return "" if exponent == 0 else axis if exponent == 1 else f"{axis}^{exponent}"


def fit_complexity(points: Sequence[tuple[int, int, float]], min_points: int = MIN_POINTS) -> Complexity:
    """Fits log(cost) = a + b*log(N) + c*log(M) by least squares over `points` = (N, M, cost).

    A cost of 0 is fitted as 1 (the log of nothing is undefined; constant zero is still O(1)). An axis that does
    not vary is left out of the fit. Each slope is rounded to the nearest integer exponent (|slope| < 0.5 is
    constant). Fewer than `min_points` points, or no axis that varies, give an unfitted "n/a" Complexity.
    """
    if any(n <= 0 or m <= 0 for n, m, _ in points):
        raise ValueError(f"fit_complexity: target counts must be positive, got points {list(points)}")
    if len(points) < min_points:
        return Complexity(f"n/a ({len(points)} points, a fit needs >= {min_points})", None, None, len(points))
    ns = np.array([p[0] for p in points], dtype=float)
    ms = np.array([p[1] for p in points], dtype=float)
    costs = np.log(np.array([max(float(p[2]), 1.0) for p in points]))
    columns, axes = [np.ones_like(ns)], []
    for axis, values in (("N", ns), ("M", ms)):
        if len(set(values.tolist())) > 1:
            columns.append(np.log(values))
            axes.append(axis)
    if not axes:
        return Complexity("n/a (one target count)", None, None, len(points))
    design = np.stack(columns, axis=1)
    coeffs, *_ = np.linalg.lstsq(design, costs, rcond=None)
    residual = float(np.sum((costs - design @ coeffs) ** 2))
    total = float(np.sum((costs - costs.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 1e-12 else (1.0 if residual < 1e-12 else 0.0)
    slopes = dict(zip(axes, (float(c) for c in coeffs[1:])))
    parts = [_order(axis, math.floor(abs(s) + 0.5) * (1 if s >= 0 else -1)) for axis, s in slopes.items()]
    parts = [p for p in parts if p]
    label = f"O({'*'.join(parts)})" if parts else "O(1)"
    return Complexity(label, slopes.get("N"), slopes.get("M"), len(points), r2)
