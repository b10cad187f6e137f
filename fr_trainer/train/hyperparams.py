"""On resume the config's optimizer hyper-parameters win over the checkpoint's.

`optimizer.load_state_dict` restores the saved param groups wholesale, so a resumed run
would silently keep the weight decay, momentum or betas it was saved with while a new lr is
honoured. The trainer takes the hyper-parameters of the freshly built optimizer (which come
from the config) before loading, and puts them back afterwards, naming what changed.
"""

from __future__ import annotations

import torch

# per-group settings that come from the config (lr itself is set by the schedule each step)
HYPERPARAMETERS = ("lr", "lr_scale", "weight_decay", "momentum", "nesterov", "dampening", "betas", "eps")


def config_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The hyper-parameters of each param group, as built from the config."""
    return [{k: group[k] for k in HYPERPARAMETERS if k in group} for group in optimizer.param_groups]


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def restore_hyperparameters(optimizer: torch.optim.Optimizer, configured: list[dict]) -> list[str]:
    """Put the configured values back into the loaded groups; one note per value that the
    checkpoint had differently (the schedule's lr is not reported: it is recomputed)."""
    notes = []
    for index, (group, wanted) in enumerate(zip(optimizer.param_groups, configured)):
        for key, value in wanted.items():
            saved = group.get(key)
            if key != "lr" and saved is not None and not _same(saved, value):
                notes.append(
                    f"optimizer group {index}: {key} {saved!r} (checkpoint) -> {value!r} (config)"
                )
            group[key] = value
    return notes
