"""Reading an arcface_torch (insightface) run directory, weights-only, as plain facts.

The formats (docs/formats.md, "arcface_torch runs"):

- `checkpoint_gpu_{rank}.pt` (train_v2.py, `save_all_states`): a dict with exactly
  `epoch` (epochs done), `global_step` (steps done), `state_dict_backbone`,
  `state_dict_softmax_fc` (`{"weight": [num_local, D]}`: this rank's centres),
  `state_optimizer` (torch's optimizer state_dict: group 0 = the backbone's parameters,
  group 1 = the centres) and `state_lr_scheduler` (PolynomialLRWarmup: `last_epoch` = steps,
  `warmup_iters`, `total_iters`, `power`, `base_lrs`);
- `softmax_fc_gpu_{rank}.pt` (2022 train.py): the centres only, `{"weight": ...}`;
- `rank_{rank}_softmax_weight.pt` and `rank_{rank}_softmax_weight_mom.pt` (2021
  partial_fc.py): the centres and their SGD momentum as bare tensors;
- the backbone: `model.pt` (also `backbone.pth`, 2021; `model_epoch_{E}.pt` after each
  epoch, 2022). The older formats save no step, epoch or optimizer state of the backbone.

Rank r holds classes [C//W*r + min(r, C%W), +C//W + (r < C%W)): our `ClassShard`.
Every file is read with `torch.load(weights_only=True)`; one that needs full unpickling is
refused with a one-line `InsightfaceFormatError`.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

V2_KEYS = ("epoch", "global_step", "state_dict_backbone", "state_dict_softmax_fc", "state_optimizer",
           "state_lr_scheduler")
BACKBONE_FILES = ("model.pt", "backbone.pth")
SGD_STATE = frozenset({"momentum_buffer"})
ADAMW_STATE = frozenset({"step", "exp_avg", "exp_avg_sq"})
_PATTERNS = {
    "v2": re.compile(r"checkpoint_gpu_(\d+)\.pt"),
    "pfc": re.compile(r"softmax_fc_gpu_(\d+)\.pt"),
    "legacy": re.compile(r"rank_(\d+)_softmax_weight\.pt"),
}
_EPOCH_MODEL = re.compile(r"model_epoch_(\d+)\.pt")


class InsightfaceFormatError(ValueError):
    """An arcface_torch file that is missing, unsafe, or not in the format it should be."""


class ImportFailure(ValueError):
    """The run cannot be imported as asked (one line: what, where, and the fix)."""


def load_weights_only(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; a one-line error otherwise."""
    try:
        try:  # mapped: a rank's centres and their state are copied out once, when written
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # pre-zip format
    except pickle.UnpicklingError as error:
        line = next((s.strip() for s in str(error).splitlines() if "global" in s.lower()), "objects")
        raise InsightfaceFormatError(
            f"{path} needs full unpickling ({line[:160]}); it is not loaded: re-save it as "
            "plain tensors and dicts (e.g. torch.save of the state_dicts) and import that"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InsightfaceFormatError(f"{path} is unreadable (truncated or corrupt: {first[:160]})") from None


@dataclass
class RankHead:
    """One rank's centres and, where the format has it, their optimizer state."""

    path: Path
    weight: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SourceRun:
    """What an arcface_torch run directory holds (the head is read rank by rank)."""

    root: Path
    format: str  # v2 | pfc | legacy | backbone
    world_size: int
    backbone: dict[str, torch.Tensor]
    backbone_file: Path
    epoch: int = 0
    global_step: int = 0
    optimizer: dict | None = None  # rank 0's state_optimizer (v2)
    scheduler: dict | None = None  # rank 0's state_lr_scheduler (v2)
    rank_files: list[Path] = field(default_factory=list)

    def heads(self) -> Iterator[RankHead]:
        """The ranks' centres in rank order, one file at a time."""
        for rank, path in enumerate(self.rank_files):
            yield read_rank_head(self, rank, path)


def _rank_files(root: Path) -> tuple[str, list[Path]]:
    """(format, files in rank order); checks that ranks 0..W-1 are all there."""
    for kind, pattern in _PATTERNS.items():
        found = {int(m.group(1)): p for p in root.iterdir() if (m := pattern.fullmatch(p.name))}
        if not found:
            continue
        missing = [r for r in range(max(found) + 1) if r not in found]
        if missing:
            name = pattern.pattern.replace(r"(\d+)", str(missing[0])).replace("\\", "")
            raise InsightfaceFormatError(
                f"{root}: rank {missing[0]} is missing ({name} absent; ranks found: "
                f"{sorted(found)}); copy every rank's file of the run into {root}"
            )
        return kind, [found[r] for r in range(len(found))]
    return "backbone", []


def _backbone_file(root: Path) -> Path | None:
    """model.pt / backbone.pth, else the newest model_epoch_{E}.pt (2022 train.py, per epoch)."""
    found = next((root / n for n in BACKBONE_FILES if (root / n).is_file()), None)
    epochs = {int(m.group(1)): p for p in root.iterdir() if (m := _EPOCH_MODEL.fullmatch(p.name))}
    return found or (epochs[max(epochs)] if epochs else None)


def _need_dict(path: Path, obj: Any, what: str) -> dict:
    if not isinstance(obj, dict):
        raise InsightfaceFormatError(f"{path}: {what} is a {type(obj).__name__}, expected a dict")
    return obj


def read_v2_file(path: Path) -> dict:
    """A `checkpoint_gpu_{rank}.pt`, its keys checked."""
    data = _need_dict(path, load_weights_only(path), "the file")
    unknown = sorted(set(data) - set(V2_KEYS))
    missing = [k for k in V2_KEYS if k not in data]
    if unknown or missing:
        raise InsightfaceFormatError(
            f"{path}: not an arcface_torch checkpoint_gpu file (unknown keys {unknown}, missing "
            f"{missing}); expected exactly {list(V2_KEYS)}"
        )
    return data


def _head_weight(path: Path, fc_state: Any) -> torch.Tensor:
    fc = _need_dict(path, fc_state, "the softmax fc state")
    unknown = sorted(set(fc) - {"weight"})
    if unknown or not isinstance(fc.get("weight"), torch.Tensor) or fc["weight"].dim() != 2:
        raise InsightfaceFormatError(
            f"{path}: the softmax fc state must be {{'weight': [num_local, D]}}; got keys "
            f"{sorted(fc)} (unknown {unknown})"
        )
    return fc["weight"]


def read_source(root: str | Path) -> SourceRun:
    """The run directory's format, backbone and rank files (centres not read yet)."""
    root = Path(root)
    if not root.is_dir():
        raise InsightfaceFormatError(f"{root} is not a directory; give the arcface_torch run's output folder")
    kind, files = _rank_files(root)
    if kind == "v2":
        first = read_v2_file(files[0])
        backbone = _need_dict(files[0], first["state_dict_backbone"], "state_dict_backbone")
        return SourceRun(root, kind, len(files), backbone, files[0], int(first["epoch"]),
                         int(first["global_step"]), first["state_optimizer"], first["state_lr_scheduler"], files)
    path = _backbone_file(root)
    if path is None:
        raise InsightfaceFormatError(
            f"{root} holds no arcface_torch files (checkpoint_gpu_0.pt, softmax_fc_gpu_0.pt, "
            f"rank_0_softmax_weight.pt or {' / '.join(BACKBONE_FILES)})"
        )
    backbone = _need_dict(path, load_weights_only(path), "the backbone file")
    return SourceRun(root, kind, max(1, len(files)), backbone, path, rank_files=files)


def read_rank_head(source: SourceRun, rank: int, path: Path) -> RankHead:
    """Rank `rank`'s centres (and optimizer state), checked against rank 0's step."""
    if source.format == "v2":
        data = read_v2_file(path)
        for key in ("epoch", "global_step"):
            if int(data[key]) != getattr(source, key):
                raise InsightfaceFormatError(
                    f"{path}: {key} {int(data[key])} differs from rank 0's {getattr(source, key)}; "
                    "the files come from different saves: copy one save's files of every rank"
                )
        weight = _head_weight(path, data["state_dict_softmax_fc"])
        return RankHead(path, weight, head_optimizer_state(path, data["state_optimizer"]))
    if source.format == "pfc":
        return RankHead(path, _head_weight(path, load_weights_only(path)))
    weight = load_weights_only(path)
    mom_path = path.with_name(f"rank_{rank}_softmax_weight_mom.pt")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise InsightfaceFormatError(f"{path}: expected the centres as one [num_local, D] tensor")
    state = {}
    if mom_path.is_file():
        mom = load_weights_only(mom_path)
        if not isinstance(mom, torch.Tensor) or mom.shape != weight.shape:
            raise InsightfaceFormatError(
                f"{mom_path}: the momentum must be a tensor of the centres' shape {list(weight.shape)}"
            )
        state["momentum_buffer"] = mom
    return RankHead(path, weight, state)


def optimizer_groups(path: Path, optimizer: Any) -> tuple[list[int], int, dict]:
    """(backbone param indices, head param index, state by index) of a state_optimizer."""
    opt = _need_dict(path, optimizer, "state_optimizer")
    groups, state = opt.get("param_groups"), opt.get("state")
    if not isinstance(groups, list) or len(groups) != 2 or len(groups[1].get("params", [])) != 1 \
            or not isinstance(state, dict):
        raise InsightfaceFormatError(
            f"{path}: state_optimizer must have 2 param groups (the backbone, then the partial fc "
            f"weight alone) and a state dict; got {len(groups) if isinstance(groups, list) else groups!r} groups"
        )
    return list(groups[0]["params"]), int(groups[1]["params"][0]), state


def optimizer_kind(path: Path, state: dict) -> str:
    """'sgd' (momentum_buffer) or 'adamw' (step, exp_avg, exp_avg_sq); '' with no state."""
    keys = set().union(*(set(s) for s in state.values())) if state else set()
    if not keys:
        return ""
    if keys <= SGD_STATE:
        return "sgd"
    if keys <= ADAMW_STATE:
        return "adamw"
    raise InsightfaceFormatError(
        f"{path}: state_optimizer holds unknown state keys {sorted(keys - SGD_STATE - ADAMW_STATE)}; "
        f"only SGD ({sorted(SGD_STATE)}) and AdamW ({sorted(ADAMW_STATE)}) state can be imported"
    )


def head_optimizer_state(path: Path, optimizer: Any) -> dict[str, torch.Tensor]:
    """The centres' optimizer state of one rank's state_optimizer."""
    _, head_index, state = optimizer_groups(path, optimizer)
    optimizer_kind(path, state)
    return dict(state.get(head_index, {}))
