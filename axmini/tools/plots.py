"""The reports' plots (matplotlib, Agg): every measured point is drawn; a line only where a fit was made.

A fitted series also gets the straight line of log(cost) against log(x) over its points; an unfitted one (fewer
than `fit.MIN_POINTS` points) gets its points alone, and its label says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from axmini.tools.fit import Complexity


def series(ax: Any, xs: Sequence[float], ys: Sequence[float], label: str, marker: str, fitted: bool) -> None:
    """Points (y < 1 drawn at 1, as the fits treat them) and, when `fitted`, the log-log line through them."""
    y = np.maximum(np.asarray(ys, float), 1.0)
    points = ax.scatter(xs, y, marker=marker, alpha=0.8, label=label)
    if fitted and len(set(xs)) > 1:
        slope, intercept = np.polyfit(np.log(np.asarray(xs, float)), np.log(y), 1)
        grid = np.array(sorted(set(xs)), float)
        ax.plot(grid, np.exp(intercept) * grid**slope, color=points.get_facecolor()[0], linewidth=1)


def finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str, *, legend_right: bool = False) -> Path:
    """Log-2 axes, labels and legend; saves the figure to `path` and closes it."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if legend_right:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure(wide: bool = False) -> tuple[Any, Any]:
    return plt.subplots(figsize=(8.4, 4.6) if wide else (6.4, 4.2))


def plot_history(
    points: Mapping[str, Sequence[tuple[int, int]]], fits: Mapping[str, Complexity], path: Path, feature: str
) -> Path:
    """Integration LoC against models touched, one series per repository. Changes that touched no model definition
    are drawn hollow at 1/2 (the fits leave them out: integration per model is undefined there)."""
    fig, ax = figure()
    for k, (repo, pairs) in enumerate(sorted(points.items())):
        marker = "osD^dv<>"[k % 8]
        touched = [(x, y) for x, y in pairs if x > 0]
        fitted = fits[repo]
        if touched:
            xs, ys = zip(*touched)
            series(ax, xs, ys, f"{repo}: {fitted.describe()}", marker, fitted.fitted)
        none = [max(y, 1) for x, y in pairs if x == 0]
        if none:
            color = ax.collections[-1].get_facecolor()[0] if touched else f"C{k % 10}"
            label = None if touched else f"{repo}: {fitted.describe()}"
            ax.scatter([0.5] * len(none), none, marker=marker, facecolors="none", edgecolors=color, label=label)
    xlabel = "models touched (hollow at 1/2: none touched)"
    return finish(fig, ax, path, f"History: {feature}", xlabel, "integration LoC")
