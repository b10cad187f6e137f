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
) -> Path:
    """Save a ROC plot (TAR against FAR, log FAR axis) of one or more curves as a PNG.

    Args:
        curves: {label: (fpr [K], tpr [K])}.
        path: the .png to write.
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
        axes.set_ylim(0.0, 1.0)
        axes.set_xlabel("False accept rate")
        axes.set_ylabel("True accept rate")
        axes.set_title(title)
        axes.grid(True, which="both", linestyle=":", linewidth=0.5)
        axes.legend(loc="lower right")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path
