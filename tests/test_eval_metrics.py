"""Metrics against independent computations: sklearn's roc_curve and KFold."""

from __future__ import annotations

import numpy as np
import pytest

from fr_trainer.eval import ijb
from fr_trainer.eval.metrics import (
    best_threshold,
    kfold_accuracy,
    kfold_indices,
    roc_curve,
    tar_at_far,
)
from fr_trainer.eval.verification import evaluate

sklearn_metrics = pytest.importorskip("sklearn.metrics")
KFold = pytest.importorskip("sklearn.model_selection").KFold

FARS = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.3, 1.0)


def random_scores(seed: int, n: int, ties: bool):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 1.5 * labels
    if ties:
        scores = np.round(scores, 1)  # many exact ties, across both classes
    return scores, labels


def sklearn_tar_max(labels, scores, fars):
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    return {f: float(tpr[fpr <= f].max()) for f in fars}


def sklearn_tar_nearest(labels, scores, fars):
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    return {f: float(tpr[np.argmin(np.abs(fpr - f))]) for f in fars}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_matches_sklearn(seed, ties):
    scores, labels = random_scores(seed, 3000, ties)
    fpr, tpr, thr = roc_curve(scores, labels)
    s_fpr, s_tpr, s_thr = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, s_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, s_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], s_thr[1:])
    assert np.isinf(thr[0])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [3, 4])
def test_tar_at_far_both_modes_match_sklearn(seed, ties):
    scores, labels = random_scores(seed, 5000, ties)
    assert tar_at_far(scores, labels, FARS) == pytest.approx(sklearn_tar_max(labels, scores, FARS))
    assert tar_at_far(scores, labels, FARS, mode="nearest") == pytest.approx(
        sklearn_tar_nearest(labels, scores, FARS)
    )
    # the IJB module exposes the same function (contract name)
    assert ijb.tar_at_far(scores, labels, FARS) == tar_at_far(scores, labels, FARS)


def test_tar_at_far_hand_built_with_ties():
    # genuine: 0.9, 0.8, 0.8, 0.5 ; impostor: 0.8, 0.6, 0.4, 0.3, 0.2, 0.1 (6 impostors)
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    # ROC points: thr 0.9 -> (0, 1/4); 0.8 -> (1/6, 3/4) (the tie moves both); 0.6 -> (2/6, 3/4);
    # 0.5 -> (2/6, 1) ...
    result = tar_at_far(scores, labels, [0.0, 0.1, 1 / 6, 0.2, 1 / 3])
    assert result == pytest.approx({0.0: 0.25, 0.1: 0.25, 1 / 6: 0.75, 0.2: 0.75, 1 / 3: 1.0})
    # insightface's nearest point at 0.1: |0 - .1| = .1 vs |1/6 - .1| = .067 -> (1/6, 3/4)
    assert tar_at_far(scores, labels, [0.1], mode="nearest")[0.1] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="mode"):
        tar_at_far(scores, labels, [0.1], mode="closest")


def test_tar_at_far_rejects_bad_labels_and_shapes():
    with pytest.raises(ValueError, match="one label per score"):
        tar_at_far(np.zeros(3), np.zeros(4), [0.1])
    with pytest.raises(ValueError, match="0/1"):
        tar_at_far(np.zeros(3), np.array([0, 1, 2]), [0.1])


@pytest.mark.parametrize("n,k", [(6000, 10), (7000, 10), (103, 10), (25, 4)])
def test_kfold_indices_match_sklearn(n, k):
    ours = kfold_indices(n, k)
    theirs = list(KFold(n_splits=k, shuffle=False).split(np.zeros(n)))
    assert len(ours) == len(theirs)
    for (a_train, a_test), (b_train, b_test) in zip(ours, theirs):
        np.testing.assert_array_equal(a_train, b_train)
        np.testing.assert_array_equal(a_test, b_test)


def reference_best_threshold(distances, issame):
    """Best cut via sklearn's ROC on -distance; the fewest-accepting cut among equals.
    Returns the threshold as the midpoint to the next distinct distance."""
    fpr, tpr, thr = sklearn_metrics.roc_curve(issame, -distances, drop_intermediate=False)
    pos, neg = issame.sum(), (~issame).sum()
    correct = tpr * pos + (1 - fpr) * neg
    j = int(np.argmax(np.round(correct, 6)))  # points are in order of more accepted
    distinct = np.unique(distances)
    if j == 0:
        return distinct[0], correct[j] / distances.size
    accepted_max = -thr[j]
    above = distinct[distinct > accepted_max]
    threshold = (
        np.nextafter(accepted_max, np.inf) if above.size == 0 else (accepted_max + above[0]) / 2
    )
    return threshold, correct[j] / distances.size


@pytest.mark.parametrize("ties", [False, True])
def test_best_threshold_and_kfold_against_sklearn(ties):
    rng = np.random.default_rng(7)
    n = 600
    issame = rng.random(n) < 0.5
    distances = np.clip(rng.normal(1.4, 0.35, n) - 0.6 * issame, 0, 4)
    if ties:
        distances = np.round(distances, 1)
    threshold, acc = best_threshold(distances, issame)
    ref_threshold, ref_acc = reference_best_threshold(distances, issame)
    assert acc == pytest.approx(ref_acc)
    assert threshold == pytest.approx(ref_threshold)

    accuracies, thresholds = kfold_accuracy(distances, issame, nfolds=10)
    for k, (train, test) in enumerate(KFold(n_splits=10).split(distances)):
        t, _ = reference_best_threshold(distances[train], issame[train])
        assert thresholds[k] == pytest.approx(t)
        assert accuracies[k] == pytest.approx(np.mean((distances[test] < t) == issame[test]))


def test_best_threshold_grid_is_insightface_search():
    rng = np.random.default_rng(8)
    issame = rng.random(400) < 0.5
    distances = np.clip(rng.normal(1.4, 0.4, 400) - 0.7 * issame, 0, 4)
    grid = np.arange(0, 4, 0.01)
    threshold, acc = best_threshold(distances, issame, grid)
    accs = [np.mean((distances < t) == issame) for t in grid]
    assert threshold == grid[int(np.argmax(accs))]
    assert acc == pytest.approx(max(accs))
    _, exact_acc = best_threshold(distances, issame)
    assert exact_acc >= acc


def test_evaluate_on_separable_and_constructed_embeddings():
    rng = np.random.default_rng(9)
    n, d = 200, 16
    identities = rng.normal(size=(50, d))
    a_ids = rng.integers(0, 50, n)
    issame = np.arange(n) % 2 == 0
    b_ids = np.where(issame, a_ids, (a_ids + 1 + rng.integers(0, 48, n)) % 50)
    emb1 = identities[a_ids] * rng.uniform(0.5, 2, (n, 1))  # scale must not matter
    emb2 = identities[b_ids]
    result = evaluate(emb1, emb2, issame, nfolds=10)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert len(result["thresholds"]) == 10 and len(result["fold_accuracies"]) == 10
    assert set(result["tar_at_far"]) == {1e-3, 1e-4}
    assert result["tar_at_far"][1e-3] == 1.0
    assert result["far_mode"] == "max" and result["num_pairs"] == n

    # distances & protocol recomputed by hand with sklearn's KFold
    noisy2 = emb2 + rng.normal(scale=2.0, size=emb2.shape)
    result = evaluate(emb1, noisy2, issame, nfolds=10)
    a = emb1 / np.linalg.norm(emb1, axis=1, keepdims=True)
    b = noisy2 / np.linalg.norm(noisy2, axis=1, keepdims=True)
    dist = ((a - b) ** 2).sum(1)
    accs = []
    for train, test in KFold(10).split(dist):
        t, _ = reference_best_threshold(dist[train], issame[train])
        accs.append(np.mean((dist[test] < t) == issame[test]))
    assert result["accuracy"] == pytest.approx(np.mean(accs))
    assert result["accuracy_std"] == pytest.approx(np.std(accs))
    cos = (a * b).sum(1)
    assert result["tar_at_far"] == pytest.approx(sklearn_tar_max(issame, cos, (1e-3, 1e-4)))

    with pytest.raises(ValueError, match=r"\[N, D\]"):
        evaluate(emb1, emb2[:-1], issame)
