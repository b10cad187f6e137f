"""fr_trainer: distributed face-recognition training with a model-parallel Partial-FC head."""

__version__ = "0.1.0"
