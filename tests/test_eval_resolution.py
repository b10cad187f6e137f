"""TAR@FAR below 1 / (impostor pairs) is reported as not resolvable."""

from __future__ import annotations

import numpy as np

from fr_trainer.eval.resolution import format_tar, is_resolvable, resolution_fields, smallest_resolvable_far
from fr_trainer.eval.verification import evaluate


def test_lfw_sized_set_cannot_resolve_1e_4() -> None:
    rng = np.random.default_rng(0)
    issame = np.repeat([True, False], 3000)  # LFW: 3,000 genuine and 3,000 impostor pairs
    a = rng.standard_normal((6000, 8))
    b = a + rng.standard_normal((6000, 8)) * np.where(issame, 0.5, 5.0)[:, None]
    result = evaluate(a, b, issame, fars=(1e-3, 1e-4))
    assert result["num_impostors"] == 3000
    assert result["smallest_resolvable_far"] == 1 / 3000
    assert result["far_resolvable"] == {1e-3: True, 1e-4: False}


def test_boundary_is_one_over_m() -> None:
    assert is_resolvable(1 / 3000, 3000) and not is_resolvable(np.nextafter(1 / 3000, 0), 3000)
    assert not is_resolvable(0.5, 0)
    assert smallest_resolvable_far(0) == float("inf")
    assert resolution_fields((1e-2,), 50)["far_resolvable"] == {1e-2: False}


def test_format_marks_not_resolvable() -> None:
    assert format_tar(1e-3, 0.975, True, 1 / 3000) == "0.001: 97.50"
    text = format_tar(1e-4, 0.851, False, 1 / 3000)
    assert text.startswith("0.0001: n/r") and "3.3e-04" in text and "85.10" in text


def test_roc_plot_shades_the_unresolvable_range(tmp_path) -> None:
    import pytest

    pytest.importorskip("matplotlib")
    from fr_trainer.eval.plots import plot_roc

    fpr = np.array([0.0, 1 / 3000, 0.01, 1.0])
    tpr = np.array([0.0, 0.9, 0.95, 1.0])
    path = plot_roc({"m": (fpr, tpr)}, tmp_path / "roc.png", min_far=1 / 3000)
    assert path.stat().st_size > 1000
