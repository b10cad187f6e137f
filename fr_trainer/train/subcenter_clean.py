"""Cleaning a Sub-center ArcFace run (Deng et al., ECCV 2020, section 3.2).

Given the centres of a `subcenter_arcface` run [K, k, D] and the training data's
embeddings with their labels:

1. each sample picks the nearest of its class's k sub-centres; the class's *dominant*
   sub-centre is the one most of its samples pick (ties: the lower index; a class with no
   sample keeps sub-centre 0);
2. samples whose angle to their class's dominant sub-centre exceeds `max_angle` degrees
   (the paper: 75) are listed as likely label noise;
3. a merged checkpoint (the format of `checkpoint.merge_shards`) is written with only the
   dominant sub-centre per class (k = 1: plain ArcFace centres [K, D]; the per-row
   optimizer state is cut the same way), `head.margin = "arcface"` in its config;
   `tools/checkpoint_shards.py split` turns it into a checkpoint for N ranks.

    python tools/subcenter_clean.py RUN EMBEDDINGS --noisy noisy.tsv --out arcface_merged.pt [--max-angle 75]

EMBEDDINGS is a `.pt` file holding {"embeddings": [N, D] float, "labels": [N] int64}
(read weights-only) or a `.npz` with arrays `embeddings` and `labels`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fr_trainer.train.checkpoint import CheckpointError, merge_shards
from fr_trainer.train.checkpoint_io import load_trusted


def nearest_subcentres(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per sample [N], the index of its class's nearest sub-centre (largest cosine)."""
    centres = F.normalize(weight, dim=2)[labels]  # [N, k, D]
    return torch.einsum("nd,nkd->nk", F.normalize(embeddings, dim=1), centres).argmax(dim=1)


def dominant_subcentres(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per class [K], the sub-centre most of its samples are nearest to."""
    num_classes, k, _ = weight.shape
    votes = torch.zeros(num_classes, k, dtype=torch.int64)
    votes.index_put_((labels, nearest_subcentres(embeddings, labels, weight)), torch.ones_like(labels),
                     accumulate=True)
    return votes.argmax(dim=1)  # the first maximum: ties go to the lower index


def angles_to_dominant(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                       dominant: torch.Tensor) -> torch.Tensor:
    """Per sample [N], its angle in degrees to its class's dominant sub-centre."""
    centre = F.normalize(weight[labels, dominant[labels]], dim=1)
    cos = (F.normalize(embeddings, dim=1) * centre).sum(dim=1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def single_centre_state(state: dict, dominant: torch.Tensor, k: int) -> dict:
    """`state` with every per-class sub-centre tensor [K, k, ...] cut to [K, ...] at `dominant`."""
    rows = torch.arange(len(dominant))
    out = {}
    for key, value in state.items():
        is_subcentres = (isinstance(value, torch.Tensor) and value.dim() >= 3
                         and value.shape[:2] == (len(dominant), k))
        out[key] = value[rows, dominant].clone() if is_subcentres else value
    return out


def single_centre_merged(merged: dict, dominant: torch.Tensor) -> dict:
    """A merged checkpoint of a sub-centre run -> the same with one centre per class."""
    k = int(merged["head"]["weight"].shape[1])
    common = dict(merged["common"])
    config = dict(common.get("config") or {})
    head_config = dict(config.get("head") or {})
    head_config["margin"] = "arcface"
    head_config["margin_args"] = {key: v for key, v in (head_config.get("margin_args") or {}).items() if key != "k"}
    config["head"] = head_config
    common["config"] = config
    return dict(merged, common=common, head=single_centre_state(merged["head"], dominant, k),
                optim_head={name: single_centre_state(st, dominant, k) for name, st in merged["optim_head"].items()})


def read_embeddings(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [N, D] float, labels [N] int64) from a .pt (weights-only) or .npz file."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            embeddings, labels = torch.from_numpy(data["embeddings"]), torch.from_numpy(data["labels"])
    else:
        data = load_trusted(path)
        embeddings, labels = data["embeddings"], data["labels"]
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"{path}: embeddings must be [N, D] with labels [N], got {tuple(embeddings.shape)} "
                         f"and {tuple(labels.shape)}")
    return embeddings.double(), labels.long()


def clean(run: Path, embeddings_path: Path, noisy_path: Path, out_path: Path, max_angle: float = 75.0) -> dict:
    """Write the noisy-sample list (TSV: index, label, angle) and the k = 1 merged
    checkpoint; return a small summary."""
    embeddings, labels = read_embeddings(embeddings_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        merged = load_trusted(merge_shards(run, Path(tmp) / "merged.pt"))
    weight = merged["head"]["weight"]
    if weight.dim() != 3:
        raise ValueError(f"{run}: the head's centres are {tuple(weight.shape)}, not [K, k, D]: "
                         "not a subcenter_arcface run")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < weight.shape[0]):
        raise ValueError(f"{embeddings_path}: labels outside [0, {weight.shape[0]}) of the run's classes")
    if embeddings.shape[1] != weight.shape[2]:
        raise ValueError(f"{embeddings_path}: embeddings are {embeddings.shape[1]}-d, the run's centres "
                         f"{weight.shape[2]}-d")
    dominant = dominant_subcentres(embeddings, labels, weight.double())
    angles = angles_to_dominant(embeddings, labels, weight.double(), dominant)
    noisy = torch.nonzero(angles > max_angle).squeeze(1)
    noisy_path.write_text("index\tlabel\tangle_deg\n" + "".join(
        f"{int(i)}\t{int(labels[i])}\t{float(angles[i]):.2f}\n" for i in noisy))
    torch.save(single_centre_merged(merged, dominant), out_path)
    return {"samples": int(labels.numel()), "noisy": int(noisy.numel()), "classes": int(weight.shape[0]),
            "max_angle": max_angle, "cos_threshold": math.cos(math.radians(max_angle))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run dir, checkpoints dir or step dir of a subcenter_arcface run")
    parser.add_argument("embeddings", help=".pt {embeddings, labels} or .npz of the training data")
    parser.add_argument("--noisy", required=True, help="TSV of the samples beyond --max-angle")
    parser.add_argument("--out", required=True, help="merged checkpoint with the dominant sub-centres (k = 1)")
    parser.add_argument("--max-angle", type=float, default=75.0, help="degrees (the paper: 75)")
    args = parser.parse_args(argv)
    if not 0.0 < args.max_angle < 180.0:
        print(f"subcenter_clean: error: --max-angle {args.max_angle} must lie in (0, 180) degrees", file=sys.stderr)
        return 2
    try:
        summary = clean(Path(args.run), Path(args.embeddings), Path(args.noisy), Path(args.out), args.max_angle)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"subcenter_clean: error: {error}", file=sys.stderr)
        return 2
    print(f"{summary['noisy']} of {summary['samples']} samples beyond {args.max_angle} degrees of their "
          f"class's dominant sub-centre -> {args.noisy}; k = 1 centres -> {args.out}")
    return 0
