"""Verification metrics in plain numpy: ROC, TAR at FAR, k-fold accuracy.

Scores are similarities (larger means "more likely the same identity"); labels are
bool or {0, 1} with 1 = genuine pair. A pair is accepted at threshold `t` when
`score >= t`, the convention of `sklearn.metrics.roc_curve`, which the tests compare
against. scikit-learn is never imported here: it is an optional extra (`eval`).

Two conventions for "TAR at FAR f" (see FORMATS.md):

- `"max"` (default): the largest true-accept rate over the ROC points whose
  false-accept rate is at most `f`. Never reports a point whose FAR exceeds `f`.
- `"nearest"`: the ROC point whose FAR is closest to `f` (first one on ties), as
  insightface's IJB scripts report. It may report a point with FAR above `f`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

FarMode = Literal["max", "nearest"]
FAR_MODES: tuple[str, ...] = ("max", "nearest")


def _as_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(
            f"scores has {scores.size} entries but labels has {labels.size}; "
            "pass one label per score"
        )
    if labels.dtype != np.bool_:
        unique = np.unique(labels)
        if not np.isin(unique, (0, 1)).all():
            raise ValueError(f"labels must be bool or 0/1, got values {unique[:10].tolist()}")
        labels = labels.astype(bool)
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))[:5].tolist()
        raise ValueError(f"scores must be finite; non-finite entries at indices {bad}")
    return scores, labels


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full ROC curve, one point per distinct score plus the origin.

    Args:
        scores: [P] similarities.
        labels: [P] bool (or 0/1), True for genuine pairs.
    Returns:
        fpr [K+1], tpr [K+1], thresholds [K+1] for the K distinct scores, in order of
        decreasing threshold; point j accepts the pairs with `score >= thresholds[j]`.
        The first point is (0, 0) at threshold +inf. Equals
        `sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`.
        With no genuine (or no impostor) pair, tpr (or fpr) is all NaN.
    """
    scores, labels = _as_scores_labels(scores, labels)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # The last index of every run of equal scores closes one ROC point.
    if sorted_scores.size:
        ends = np.flatnonzero(np.diff(sorted_scores) != 0)
        ends = np.concatenate([ends, [sorted_scores.size - 1]])
    else:
        ends = np.zeros(0, dtype=np.int64)
    true_pos = np.cumsum(sorted_labels)[ends]
    false_pos = (ends + 1) - true_pos
    num_pos = int(labels.sum())
    num_neg = int(labels.size - num_pos)
    tp = np.concatenate([[0], true_pos]).astype(np.float64)
    fp = np.concatenate([[0], false_pos]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / num_pos if num_pos else np.full_like(tp, np.nan)
        fpr = fp / num_neg if num_neg else np.full_like(fp, np.nan)
    thresholds = np.concatenate([[np.inf], sorted_scores[ends]])
    return fpr, tpr, thresholds


def tar_at_far_from_roc(
    fpr: np.ndarray, tpr: np.ndarray, fars: Iterable[float], mode: FarMode = "max"
) -> dict[float, float]:
    """TAR at each FAR of `fars` read off a ROC curve (see the module doc for `mode`).

    Args:
        fpr, tpr: [K] ROC points (any order for "max"; "nearest" takes the first of
            equally near points in the given order, as `np.argmin` does).
    Returns:
        {far: tar}; NaN where the curve is undefined (no genuine or impostor pair).
    """
    if mode not in FAR_MODES:
        raise ValueError(f"unknown TAR@FAR mode {mode!r}; use one of {FAR_MODES}")
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    result: dict[float, float] = {}
    for far in fars:
        far = float(far)
        if fpr.size == 0 or np.isnan(fpr).all() or np.isnan(tpr).all():
            result[far] = float("nan")
        elif mode == "max":
            allowed = fpr <= far
            result[far] = float(tpr[allowed].max()) if allowed.any() else 0.0
        else:
            result[far] = float(tpr[int(np.argmin(np.abs(fpr - far)))])
    return result


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: Iterable[float], mode: FarMode = "max"
) -> dict[float, float]:
    """True-accept rate at each false-accept rate of `fars`.

    Args:
        scores: [P] similarities; labels: [P] bool, True for genuine pairs.
        fars: the target false-accept rates, e.g. (1e-6, ..., 1e-1).
        mode: "max" (largest TAR with FAR <= f, default) or "nearest" (insightface).
    Returns:
        {far: tar} in the order of `fars`.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    return tar_at_far_from_roc(fpr, tpr, fars, mode)


def kfold_indices(n: int, nfolds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous, unshuffled folds: [(train_idx, test_idx)] like `KFold(nfolds)`.

    The first `n % nfolds` folds hold one item more than the others.
    """
    if nfolds < 2:
        raise ValueError(f"nfolds must be at least 2, got {nfolds}")
    if n < nfolds:
        raise ValueError(f"cannot split {n} pairs into {nfolds} folds; use nfolds <= {n}")
    sizes = np.full(nfolds, n // nfolds, dtype=np.int64)
    sizes[: n % nfolds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    everything = np.arange(n)
    folds = []
    for k in range(nfolds):
        test = everything[bounds[k] : bounds[k + 1]]
        train = np.concatenate([everything[: bounds[k]], everything[bounds[k + 1] :]])
        folds.append((train, test))
    return folds


def accuracy_at_threshold(distances: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    """Fraction of pairs classified right when "same" means `distance < threshold`."""
    predicted = np.asarray(distances) < threshold
    return float(np.mean(predicted == np.asarray(issame, dtype=bool)))


def best_threshold(
    distances: np.ndarray, issame: np.ndarray, grid: Sequence[float] | None = None
) -> tuple[float, float]:
    """The distance threshold that maximises accuracy on these pairs.

    Args:
        distances: [P] (smaller = more similar); issame: [P] bool.
        grid: candidate thresholds (insightface uses `np.arange(0, 4, 0.01)`); the first
            best one wins. With `grid=None` the search is exact: every way of cutting
            the sorted distances is tried, the threshold is the midpoint of the gap at
            the cut, and the cut accepting the fewest pairs wins among equals.
    Returns:
        (threshold, accuracy on these pairs); "same" means `distance < threshold`.
    """
    distances = np.asarray(distances, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if distances.size == 0:
        raise ValueError("best_threshold needs at least one pair")
    if grid is not None:
        grid = np.asarray(grid, dtype=np.float64)
        accs = np.array([accuracy_at_threshold(distances, issame, t) for t in grid])
        best = int(np.argmax(accs))
        return float(grid[best]), float(accs[best])
    order = np.argsort(distances, kind="stable")
    d = distances[order]
    same = issame[order]
    n = d.size
    # Accepting the k smallest distances (k = 0..n): correct = same among them +
    # different among the rest. Only cuts between distinct values are realisable.
    same_in = np.concatenate([[0], np.cumsum(same)])
    diff_in = np.arange(n + 1) - same_in
    correct = same_in + (n - same.sum() - diff_in)
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = d[1:] > d[:-1]
    correct = np.where(valid, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        threshold = d[0]
    elif k == n:
        threshold = np.nextafter(d[-1], np.inf)
    else:
        threshold = 0.5 * (d[k - 1] + d[k])
    return float(threshold), float(correct[k] / n)


def kfold_accuracy(
    distances: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    grid: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k-fold protocol: per fold, pick the threshold on the other folds, test on it.

    Args:
        distances: [P] pair distances (squared L2 of normalised embeddings, in [0, 4]).
        issame: [P] bool.
    Returns:
        (accuracies [nfolds], thresholds [nfolds]).
    """
    distances = np.asarray(distances, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if distances.shape != issame.shape:
        raise ValueError(f"{distances.size} distances but {issame.size} labels")
    accuracies, thresholds = [], []
    for train, test in kfold_indices(distances.size, nfolds):
        threshold, _ = best_threshold(distances[train], issame[train], grid)
        thresholds.append(threshold)
        accuracies.append(accuracy_at_threshold(distances[test], issame[test], threshold))
    return np.asarray(accuracies), np.asarray(thresholds)
