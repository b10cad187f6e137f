"""Load published arcface_torch backbone weights into our backbones (`model.pretrained`).

    from fr_trainer.backbones import create_backbone
    from fr_trainer.backbones.pretrained import load_pretrained
    model = create_backbone("iresnet50")
    load_pretrained(model, "ms1mv3_arcface_r50/backbone.pth")

A file is a `torch.save`d state_dict (arcface_torch's `model.pt` / `backbone.pth`), or a
dict holding one under `state_dict_backbone` (its `checkpoint_gpu_*.pt`), `state_dict`,
`model` or `backbone`. It is read with `torch.load(weights_only=True)`: tensors and
plain containers only, never arbitrary pickled objects. `module.` and `_orig_mod.`
prefixes (DDP, torch.compile) are dropped.

Key names:
- iresnet18/34/50/100/200 and vit_t/s/b/l/h use arcface_torch's names and shapes
  already: their files load as they are;
- arcface_torch's MobileFaceNet (`mbf`, "mobilefacenet-0.45G") names its modules
  `layers.i[.layers.j].layers.k.layers.l`, `conv_sep`, `features.layers.*`:
  `convert_arcface_mbf` renames all 333 keys to ours (`stem`, `stages.s.i.block.k.l`,
  `conv_out`, `gdc`, `linear`, `features`); it is applied automatically when the file has
  those names. Its layout is our `mbf` backbone (our `mobilefacenet` is the paper's,
  half as wide).

Anything that does not fit raises `PretrainedError` naming the missing, unexpected and
mis-shaped keys (the first few of each and how many in all) and, where it can tell, the
backbone the file was made for; the model is left untouched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model", "backbone")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 5


class PretrainedError(ValueError):
    """A pretrained-weights file that cannot be read or does not fit the backbone."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """name -> tensor from a torch.save'd file (weights only), wrapper prefixes dropped."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights {path} do not exist; give the path of a backbone .pth/.pt file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (unpickling fails in many ways; all mean "not weights")
        raise PretrainedError(f"{path} is not a torch.save'd state_dict of tensors ({error})") from None
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: object, what: str) -> dict[str, torch.Tensor]:
    """name -> tensor from a loaded object (a state_dict or a dict wrapping one under
    WRAPPER_KEYS), `module.` / `_orig_mod.` prefixes dropped, the file's order kept."""
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{what} does not hold a state_dict (name -> tensor); got {type(obj).__name__}")
    out = {}
    for name, tensor in obj.items():
        for prefix in STRIPPED_PREFIXES:
            name = name.removeprefix(prefix)
        out[name] = tensor
    return out


# -- arcface_torch's MobileFaceNet ---------------------------------------------------------
# Upstream's sequence of inverted-residual blocks: layers.2 (stride 2), layers.3 (4
# residual blocks), layers.4 (stride 2), layers.5 (6), layers.6 (stride 2), layers.7 (2).
# Ours groups the same 15 blocks into stages of 5, 1, 6, 1, 2 (MBF_SETTINGS).
MBF_UPSTREAM_BLOCKS = (("layers.2.", None), ("layers.3.", 4), ("layers.4.", None), ("layers.5.", 6),
                       ("layers.6.", None), ("layers.7.", 2))
MBF_STAGE_DEPTHS = (5, 1, 6, 1, 2)
MBF_FIXED_PREFIXES = {
    "layers.0.layers.": "stem.0.",
    "layers.1.layers.": "stem.1.",
    "conv_sep.layers.": "conv_out.",
    "features.layers.0.layers.": "gdc.",
    "features.layers.2.": "linear.",
    "features.layers.3.": "features.",
}
_BLOCK_INNER = re.compile(r"layers\.(\d+)\.layers\.(\d+)\.(.+)")


def _mbf_block_prefixes() -> list[tuple[str, str]]:
    upstream = []
    for prefix, repeats in MBF_UPSTREAM_BLOCKS:
        upstream += [prefix] if repeats is None else [f"{prefix}layers.{i}." for i in range(repeats)]
    ours = [f"stages.{s}.{i}." for s, n in enumerate(MBF_STAGE_DEPTHS) for i in range(n)]
    assert len(upstream) == len(ours)
    return list(zip(upstream, ours))


def is_arcface_mbf(state: dict[str, torch.Tensor]) -> bool:
    return "conv_sep.layers.0.weight" in state and "features.layers.0.layers.0.weight" in state


def convert_arcface_mbf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """arcface_torch MobileFaceNet (`get_mbf`, blocks (1, 4, 6, 2)) key names -> ours (`mbf`).

    Shapes are unchanged; keys that are not part of that layout are kept as they are (so
    they show up as unexpected when loading).
    """
    blocks = _mbf_block_prefixes()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        new = _convert_mbf_key(name, blocks)
        if new in out:
            raise PretrainedError(f"two keys of the file map to {new!r}; is it arcface_torch's mbf?")
        out[new] = tensor
    return out


def _convert_mbf_key(name: str, blocks: list[tuple[str, str]]) -> str:
    for old, new in MBF_FIXED_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old):]
    # longest prefix first: "layers.3.layers.1." before "layers.3."
    for old, new in sorted(blocks, key=lambda pair: -len(pair[0])):
        if name.startswith(old):
            inner = _BLOCK_INNER.fullmatch(name[len(old):])
            if inner:
                k, j, param = inner.groups()
                return f"{new}block.{k}.{j}.{param}"
    return name


# -- loading --------------------------------------------------------------------------------
def to_our_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published arcface_torch state_dict to `model`'s key names where they differ."""
    from fr_trainer.backbones.mobilefacenet import MobileFaceNet

    if isinstance(model, MobileFaceNet) and is_arcface_mbf(state):
        return convert_arcface_mbf(state)
    return state


def mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key [file shape] (expected [shape])') of `state`."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    return missing, unexpected, shapes


def _hint(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    from fr_trainer.backbones.mobilefacenet import MobileFaceNet

    name = getattr(model, "backbone_name", type(model).__name__)
    stem = state.get("stem.0.0.weight")
    if isinstance(model, MobileFaceNet) and stem is not None and stem.shape[0] != model.stem[0][0].out_channels:
        return (f"; the file is a MobileFaceNet with a {stem.shape[0]}-channel stem: arcface_torch's mbf "
                f"checkpoints need model.backbone = 'mbf' (not {name!r})")
    for key, label in (("features.weight", "embedding_size"), ("feature.3.weight", "embedding_size")):
        if key in state and key in model.state_dict() and state[key].shape != model.state_dict()[key].shape:
            return f"; the file's embedding is {state[key].shape[0]}-d: set model.{label} = {state[key].shape[0]}"
    if "pos_embed" in state and "blocks.0.attn.qkv.weight" in state:
        width = state["pos_embed"].shape[-1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return f"; the file is a ViT of width {width} and depth {depth} (vit_t 256/12, vit_s 512/12, " \
               f"vit_b 512/24, vit_l 768/24, vit_h 1024/48)"
    if "layer1.0.conv1.weight" in state:
        depths = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
        return f"; the file is an iresnet with blocks {depths} (iresnet18 [2,2,2,2], 50 [3,4,14,3], 100 [3,13,30,3])"
    return ""


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise PretrainedError listing missing / unexpected / mis-shaped keys, if any."""
    missing, unexpected, shapes = mismatches(model, state)
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > SHOWN else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:SHOWN])}{more}")
    if problems:
        name = getattr(model, "backbone_name", type(model).__name__)
        raise PretrainedError(f"{what} does not fit backbone {name!r}: " + "; ".join(problems) + _hint(model, state))


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> int:
    """Load the weights in `path` into `model` (strict: every key, every shape); returns
    the number of tensors loaded. Raises PretrainedError and leaves `model` as it was when
    the file does not fit."""
    state = to_our_names(model, read_state_dict(path))
    check_fits(model, state, f"pretrained weights {path}")
    model.load_state_dict(state, strict=True)
    return len(state)
