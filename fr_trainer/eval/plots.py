"""ROC plots (matplotlib, imported lazily: it is part of the `eval` extra)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("ROC plots need matplotlib: pip install fr_trainer[eval]") from error
    return plt


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str = "ROC",
    far_range: tuple[float, float] = (1e-6, 1.0),
    min_far: float | None = None,
) -> Path:
    """Save a ROC plot (TAR against FAR, log FAR axis) of one or more curves as a PNG.

    Args:
        curves: {label: (fpr [K], tpr [K])}.
        path: the .png to write.
        min_far: the smallest resolvable FAR (1 / impostor pairs); FARs below it are
            shaded and labelled "not resolvable".
    """
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=120)
    try:
        for label, (fpr, tpr) in curves.items():
            fpr = np.asarray(fpr)
            keep = fpr > 0
            axes.plot(fpr[keep], np.asarray(tpr)[keep], label=label, linewidth=1.5)
        axes.set_xscale("log")
        axes.set_xlim(*far_range)
        if min_far is not None and min_far > far_range[0]:
            axes.axvspan(far_range[0], min(min_far, far_range[1]), color="0.85", zorder=0,
                         label=f"not resolvable (FAR < 1/M = {min_far:.1g})")
        axes.set_ylim(0.0, 1.0)
        axes.set_xlabel("False accept rate")
        axes.set_ylabel("True accept rate")
        axes.set_title(title)
        axes.grid(True, which="both", linestyle=":", linewidth=0.5)
        axes.legend(loc="lower right")
        path = _save(figure, path)
    finally:
        plt.close(figure)
    return path


def plot_cmc(cmc: Mapping[int, Mapping[int, float]], path: str | os.PathLike, title: str = "CMC") -> Path:
    """Save MegaFace-style curves as a PNG: CMC (rank 1..10) per distractor count, and
    rank-1 against the number of distractors (log axis).

    Args:
        cmc: {distractors n: {rank r: identification rate}}.
    """
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    try:
        counts = sorted(int(n) for n in cmc)
        for n in counts:
            ranks = sorted(int(r) for r in cmc[n])
            left.plot(ranks, [cmc[n][r] for r in ranks], marker="o", markersize=3, label=f"{n} distractors")
        left.set_xlabel("Rank")
        left.set_ylabel("Identification rate")
        left.set_ylim(0.0, 1.0)
        left.grid(True, linestyle=":", linewidth=0.5)
        left.legend(loc="lower right", fontsize=7)
        right.plot(counts, [cmc[n][1] for n in counts], marker="o")
        right.set_xscale("log")
        right.set_xlabel("Distractors")
        right.set_ylabel("Rank-1 identification rate")
        right.set_ylim(0.0, 1.0)
        right.grid(True, which="both", linestyle=":", linewidth=0.5)
        figure.suptitle(title)
        path = _save(figure, path)
    finally:
        plt.close(figure)
    return path


def _save(figure, path) -> Path:
    """Write `figure` to `path` (its folder created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    return path
