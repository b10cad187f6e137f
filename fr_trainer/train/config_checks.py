"""Config checks that consult the registries: names (with a "did you mean"), the margin's
keyword arguments (names, types, values), and finite floats everywhere.

Called by `config.validate` before any data is opened; every failure is a one-line
`ConfigError` naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Iterable, Iterator
from typing import Any

from fr_trainer.train.config import ConfigError

_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [c for c in choices if c], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(key: str, value: object, choices: Iterable[str], kind: str | None = None) -> None:
    """`key=value` must be one of `choices`; the message lists them and the nearest one."""
    choices = list(choices)
    if value in choices:
        return
    listed = ", ".join(repr(c) for c in choices)
    what = f"is not a {kind}; choose one of" if kind else "is not one of"
    raise ConfigError(f"{key}={value!r} {what} {listed}{did_you_mean(value, choices)}")


# --------------------------------------------------------------------------- finite floats
def _float_values(obj: Any, where: str) -> Iterator[tuple[str, float]]:
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _float_values(getattr(obj, f.name), f"{where}.{f.name}" if where else f.name)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _float_values(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _float_values(value, f"{where}[{i}]")
    elif isinstance(obj, float):
        yield where, obj


def check_finite(config: Any) -> None:
    """No NaN or infinity in any float of the config (margin and regularizer args too)."""
    defaults = dict(_float_values(type(config)(), ""))
    for key, value in _float_values(config, ""):
        if not math.isfinite(value):
            default = f" (the default is {defaults[key]})" if key in defaults else ""
            raise ConfigError(f"{key}={value} is not a finite number; give a finite value{default}")


# --------------------------------------------------------------------------- names
def check_backbone(name: str) -> None:
    from fr_trainer.backbones import list_backbones

    check_choice("model.backbone", name, list_backbones(), "backbone")


def check_margin(name: str, args: dict[str, Any], num_classes: int | None) -> None:
    """head.margin is registered; head.margin_args are its keywords, of the right types,
    and the margin accepts their values (it is built once, a few floats)."""
    from fr_trainer.margins import MARGINS, create_margin, list_margins

    check_choice("head.margin", name, list_margins(), "margin")
    factory = MARGINS.get(name)
    check_kwargs("head.margin_args", f"margin {name!r}", factory, args, internal=("num_classes",))
    if "num_classes" in inspect.signature(factory).parameters and num_classes is None:
        return  # e.g. coco's default alpha needs the class count of the data: checked at build
    try:
        create_margin(name, num_classes=num_classes, **args)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"head.margin_args={args!r} for margin {name!r}: {error}") from None


def check_kwargs(key: str, owner: str, factory: Any, args: dict[str, Any], internal: Iterable[str] = ()) -> None:
    """`args` (the table at `key`) are keywords of `factory` (a class or a function), each
    of its annotated type; the message lists the accepted keywords with their defaults."""
    internal = set(internal)
    everything = inspect.signature(factory).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in everything.values())
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {p: v for p, v in everything.items() if p not in internal and v.kind in named}
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except (NameError, TypeError):  # annotations naming what only a type checker imports
        hints = {}
    accepted = ", ".join(_describe_param(p) for p in params.values()) or "nothing"
    for arg, value in args.items():
        if arg not in params and not open_ended:
            raise ConfigError(
                f"{key}.{arg}={value!r}: {owner} has no argument {arg!r}{did_you_mean(arg, params)}; "
                f"it accepts {accepted}"
            )
        expected = hints.get(arg, Any)
        if not _fits(value, expected):
            raise ConfigError(
                f"{key}.{arg}={value!r} must be {_type_text(expected)}, got {type(value).__name__}; "
                f"{owner} accepts {accepted}"
            )


def check_regularizer_args(name: str, args: dict[str, Any]) -> None:
    """regularizer.args are keywords of the chosen regularizer, of the right types."""
    if not name:
        return
    from fr_trainer.regularizers import CenterLoss, CirclePairLoss, TripletLoss

    kinds = {"center": CenterLoss, "triplet": TripletLoss, "circle_pair": CirclePairLoss}
    # set by the trainer: the data's classes, model.embedding_size, regularizer.weight, the group
    internal = ("num_classes", "embedding_size", "process_group")
    if name == "center":
        internal += ("loss_weight",)
    check_kwargs("regularizer.args", f"regularizer {name!r}", kinds[name], args, internal)


def _describe_param(p: inspect.Parameter) -> str:
    return p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"


def _options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _fits(value: Any, hint: Any) -> bool:
    for option in _options(hint):
        if option is Any:
            return True
        if option is type(None):
            if value is None:
                return True
            continue
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option is bool:
            if isinstance(value, bool):
                return True
            continue
        base = typing.get_origin(option) or option
        if isinstance(base, type) and isinstance(value, base) and not isinstance(value, bool):
            return True
    return False


def _type_text(hint: Any) -> str:
    parts = [_TYPE_NAMES.get(o, getattr(o, "__name__", str(o))) for o in _options(hint) if o is not type(None)]
    text = " or ".join(parts)
    return text + (" (or left out)" if type(None) in _options(hint) else "")


# --------------------------------------------------------------------------- paths
def check_resume(value: str) -> None:
    """checkpoint.resume is auto, never, or an existing checkpoint folder / run directory."""
    if value in ("auto", "never"):
        return
    from pathlib import Path

    path = Path(value)
    expected = "a checkpoints/step_XXXXXXXX folder, its checkpoints folder or a run directory"
    if not path.exists():
        raise ConfigError(
            f"checkpoint.resume={value!r} does not exist; give {expected}, or auto | never"
        )
    if not path.is_dir():
        raise ConfigError(
            f"checkpoint.resume={value!r} is a file; expected {expected} (a merged file: "
            f"`python tools/checkpoint_shards.py split {value} OUT/checkpoints --world-size N` first)"
        )


def check_output_dir(value: str) -> None:
    """run.output_dir is (or can become) a directory: its nearest existing ancestor is one."""
    from pathlib import Path

    path = Path(value or ".")
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ConfigError(
                    f"run.output_dir={value!r}: {candidate} is a file, not a directory; "
                    "set run.output_dir to a directory (created if missing)"
                )
            return
