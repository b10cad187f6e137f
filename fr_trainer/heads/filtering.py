"""Inter-class filtering (arcface_torch's `interclass_filtering_threshold`).

A non-target cosine above the threshold is most likely the same identity filed under
another label (a noisy, duplicated class): it is treated as a cosine of 0, so its logit is
the margin's logit of 0 and it carries no gradient (it is not pushed away). The target
column is never filtered. Applied to every row of the global batch and every shard.

`InterclassFiltered` wraps the head's margin for one call of the fused head: it forwards
everything to the margin and filters the cosines of its non-target path (the head then
recomputes the non-target logits in backward, as for any margin whose non-target logits
are not `s cos`). It is not a module: the margin's state and checkpoint keys are untouched.
"""

from __future__ import annotations

import torch

from fr_trainer.margins import Margin
from fr_trainer.margins.base import indicator_above


def check_threshold(threshold: float, margin: Margin) -> float:
    """The threshold as a float in [0, 1] (0: off); a one-line error otherwise."""
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"interclass_filtering_threshold={threshold} must lie in [0, 1] (0 switches it off)")
    if threshold > 0 and not margin.normalized:
        raise ValueError("interclass_filtering_threshold needs cosines; the plain softmax margin has none "
                         "(set it to 0 or pick a normalised margin)")
    return threshold


class InterclassFiltered:
    """The margin `inner` with its non-target cosines above `threshold` replaced by 0."""

    linear_nontarget = False

    def __init__(self, inner: Margin, threshold: float) -> None:
        self.inner, self.threshold = inner, float(threshold)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def kept(self, cos: torch.Tensor) -> torch.Tensor:
        """[N, c] in cos's dtype: 0 at the cosines the filter zeroes, 1 elsewhere."""
        return 1.0 - indicator_above(cos, self.threshold)

    def nontarget_logits(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return self.inner.nontarget_logits(cos.mul_(self.kept(cos)), rows)

    def nontarget_grad(self, cos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        kept = self.kept(cos)
        return self.inner.nontarget_grad(cos * kept, rows) * kept
