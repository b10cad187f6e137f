"""Regularizers over the all-gathered batch: center loss (sharded centres), pair-wise
Circle loss and the triplet ranking loss (batch-hard / semi-hard mining).

Each is called as `loss(local_embeddings [B, D], local_labels [B] int64)`, gathers the
global batch itself over its `process_group`, and returns the same scalar on every rank
with exact gradients for the local embeddings (see LOSSES.md, "Regularizers").
"""

from fr_trainer.regularizers.center import CenterLoss
from fr_trainer.regularizers.pairs import CirclePairLoss, TripletLoss

__all__ = ["CenterLoss", "CirclePairLoss", "TripletLoss"]
