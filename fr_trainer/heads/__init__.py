"""Model-parallel classification heads."""

from fr_trainer.heads.margin_softmax import MarginSoftmaxCrossEntropy
from fr_trainer.heads.partial_fc import PartialFC
from fr_trainer.heads.sampling import num_sampled, sample_centres

__all__ = ["MarginSoftmaxCrossEntropy", "PartialFC", "num_sampled", "sample_centres"]
