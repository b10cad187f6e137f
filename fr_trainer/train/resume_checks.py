"""Before a resume loads any tensor: is the checkpoint readable, and was it trained with the
model this run builds? Each mismatch is one `CheckpointError` naming the config keys, the
saved and the new values, and the fix (instead of load_state_dict's size-mismatch dump)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train.config import Config
from fr_trainer.train.load_errors import UNREADABLE, unreadable_message

FIX = "resume with the same model or set checkpoint.resume=never (or a new run.name)"
# backbone options that change no tensor shape (a new dropout rate is a fine resume)
_SHAPELESS_OPTIONS = ("dropout",)


def read_common(folder: Path) -> dict:
    """The checkpoint's common part; a junk or truncated common.pt is a CheckpointError."""
    try:
        common = ckpt.load_common(folder)
    except UNREADABLE as error:
        raise ckpt.CheckpointError(unreadable_message(Path(folder) / ckpt.COMMON, error)) from None
    if not isinstance(common, dict) or "backbone" not in common:
        raise ckpt.CheckpointError(
            f"{Path(folder) / ckpt.COMMON} holds no training state; it was not written by fr-trainer train"
        )
    return common


def _model_keys(backbone: str, embedding_size: Any, kwargs: dict) -> dict[str, Any]:
    keys = {"model.backbone": backbone, "model.embedding_size": embedding_size}
    for name, value in sorted(kwargs.items()):
        if name != "embedding_size" and name not in _SHAPELESS_OPTIONS:
            keys[f"model.{name}"] = value
    return keys


def _describe(keys: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in keys.items())


def check_same_model(folder: Path, common: dict, config: Config, backbone_kwargs: dict) -> None:
    """The saved backbone name, embedding size and shape-changing options are this run's."""
    saved = _model_keys(
        common.get("backbone_name"), common.get("embedding_size"), dict(common.get("backbone_kwargs") or {})
    )
    now = _model_keys(config.model.backbone, config.model.embedding_size, backbone_kwargs)
    saved_regularizer = (common.get("config") or {}).get("regularizer") or {}
    if config.regularizer.name == "triplet" and saved_regularizer.get("name") == "triplet":
        saved["regularizer.second_dim"] = saved_regularizer.get("second_dim")  # the second head's width
        now["regularizer.second_dim"] = config.regularizer.second_dim
    if saved != now:
        raise ckpt.CheckpointError(
            f"{folder} was trained with {_describe(saved)}; this run has {_describe(now)}; {FIX}"
        )


def check_head_state(folder: Path, common: dict, saved_state: dict, head_state: dict, margin: str) -> None:
    """The saved head has the tensors (and shapes) of this run's head: a margin with a bias
    (softmax) cannot take over the centres of one without."""
    def shapes(state: dict) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}

    before, after = shapes(saved_state), shapes(head_state)
    if before == after:
        return
    saved_margin = (common.get("config") or {}).get("head", {}).get("margin", "?")
    raise ckpt.CheckpointError(
        f"{folder} was trained with head.margin={saved_margin!r} (head tensors {before}); this run has "
        f"head.margin={margin!r} (head tensors {after}); resume with the same [head] or set "
        f"checkpoint.resume=never (or a new run.name)"
    )
