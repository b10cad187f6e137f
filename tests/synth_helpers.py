"""A tiny synthetic training set for data tests (no .bin pairs, no IJB-C tree)."""

from __future__ import annotations

from pathlib import Path

from fr_trainer.data.synthetic import generate


def tiny_training_set(out: Path, classes: int, per_class: int, seed: int) -> Path:
    """`classes` identities x `per_class` images in `out` (train.rec/.idx), serially."""
    generate(out, num_identities=classes, images_per_identity=per_class, num_holdout_identities=2,
             num_pairs=0, num_ijbc_subjects=0, workers=0, seed=seed)
    return out
