"""The margin registry: `create_margin(name, **kwargs)`, `list_margins()`."""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

from fr_trainer.registry import Registry

MARGINS: Registry = Registry("margin")


def register_margin(name: str) -> Callable:
    return MARGINS.register(name)


def list_margins() -> list[str]:
    return MARGINS.names()


def create_margin(name: str, num_classes: int | None = None, **kwargs):
    """Build a margin by name. `num_classes` is passed to margins that use it (COCO's
    default alpha); unknown keywords raise ValueError naming the accepted ones."""
    factory = MARGINS.get(name)
    accepted = inspect.signature(factory).parameters
    if "num_classes" in accepted:
        kwargs["num_classes"] = num_classes
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        public = [p for p in accepted if p != "num_classes"]
        close = difflib.get_close_matches(unknown[0], public, n=1)
        raise ValueError(
            f"margin {name!r} does not take {', '.join(unknown)}; "
            f"it accepts: {', '.join(public) or 'nothing'}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    return factory(**kwargs)
