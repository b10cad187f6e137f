"""Lazy imports of the `onnx` extra with an error that says how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'fr_trainer[onnx]'"


def require(module: str) -> ModuleType:
    """Import `module` (onnx, onnxruntime) or raise ImportError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs the {module!r} package, which is not installed: "
            f"{INSTALL_HINT}  (original error: {error})"
        ) from error
