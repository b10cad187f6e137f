"""Fixtures shared by the test modules: the tiny synthetic training sets, made once per
session (read-only for the tests: a test that damages data copies it first)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_support import make_data, make_data_with_pairs

from fr_trainer.distributed import spawn

# the multi-rank tests' ranks fork from one server that imported torch once (~0.06 s a call
# instead of ~2.3 s for a fresh interpreter per rank; fr_trainer/distributed/spawn.py)
spawn.START_METHOD = "forkserver"


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """12 identities x 8 images (train.rec/.idx), no verification pairs."""
    return make_data(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="session")
def pairs_data(tmp_path_factory) -> Path:
    """The same training set plus two small `.bin` sets of held-out identities."""
    return make_data_with_pairs(tmp_path_factory.mktemp("pairs_data"))
