"""Checking an ONNX face model's interface, and opening it with onnxruntime.

The interface every fr_trainer tool expects (FORMATS.md, ONNX): one float32 input
`[N, 3, 112, 112]` (RGB, normalised (x/255-0.5)/0.5 outside the graph, batch dimension
dynamic or any size) and one output `[N, D]` (the embedding).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fr_trainer.export._deps import require

EXPECTED_INPUT = (3, 112, 112)
EXPECTED_TEXT = "[N, 3, 112, 112] float32 (RGB 112x112, normalised as (x/255-0.5)/0.5)"


class OnnxModelError(ValueError):
    """An ONNX file that is not a face model with the expected interface."""


@dataclass(frozen=True)
class OnnxModelInfo:
    path: Path
    input_name: str
    input_shape: tuple[Any, ...]   # dims: int, or a name/None where dynamic
    output_name: str
    output_shape: tuple[Any, ...]
    embedding_size: int | None     # None when the output's last dim is dynamic


def _dims(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def validate_io(path: str | os.PathLike, inputs: Sequence[tuple[str, Sequence[Any], str]],
                outputs: Sequence[tuple[str, Sequence[Any], str]]) -> OnnxModelInfo:
    """inputs/outputs: (name, shape, element type as 'float'/'float16'/...) per tensor."""
    path = Path(path)
    if len(inputs) != 1:
        raise OnnxModelError(
            f"{path}: the ONNX model has {len(inputs)} inputs "
            f"({', '.join(n for n, _, _ in inputs)}); expected one input {EXPECTED_TEXT}"
        )
    name, shape, dtype = inputs[0]
    shape = tuple(shape)
    tail = tuple(shape[1:])
    if len(shape) != 4 or tail != EXPECTED_INPUT:
        hint = ""
        if len(shape) == 4 and tuple(shape[1:]) == (112, 112, 3):
            hint = " (this looks like NHWC; fr_trainer models take NCHW)"
        raise OnnxModelError(
            f"{path}: ONNX input {name!r} has shape {_dims(shape)}; expected "
            f"{EXPECTED_TEXT}{hint}"
        )
    if dtype != "float":
        raise OnnxModelError(
            f"{path}: ONNX input {name!r} has element type {dtype}; expected {EXPECTED_TEXT}"
        )
    if len(outputs) != 1:
        raise OnnxModelError(
            f"{path}: the ONNX model has {len(outputs)} outputs "
            f"({', '.join(n for n, _, _ in outputs)}); expected one embedding output [N, D]"
        )
    out_name, out_shape, _ = outputs[0]
    out_shape = tuple(out_shape)
    if len(out_shape) != 2:
        raise OnnxModelError(
            f"{path}: ONNX output {out_name!r} has shape {_dims(out_shape)}; "
            f"expected an embedding [N, D]"
        )
    d = out_shape[1] if isinstance(out_shape[1], int) else None
    return OnnxModelInfo(path, name, shape, out_name, out_shape, d)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist (or is not a file)")


def check_onnx_model(path: str | os.PathLike) -> OnnxModelInfo:
    """Validate the file's interface with `onnx` (no session); raise OnnxModelError."""
    onnx = require("onnx")
    path = Path(path)
    _check_exists(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf DecodeError and friends
        raise OnnxModelError(f"{path}: not a readable ONNX model ({error})") from error
    initializers = {i.name for i in model.graph.initializer}

    def describe(values) -> list[tuple[str, list[Any], str]]:
        out = []
        for v in values:
            if v.name in initializers:  # old exporters list weights as inputs
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in t.shape.dim]
            dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
            out.append((v.name, dims, dtype))
        return out

    return validate_io(path, describe(model.graph.input), describe(model.graph.output))


def load_onnx_session(path: str | os.PathLike, num_threads: int | None = None):
    """An onnxruntime CPU InferenceSession for a checked face model -> (session, info)."""
    ort = require("onnxruntime")
    path = Path(path)
    _check_exists(path)
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise OnnxModelError(f"{path}: onnxruntime cannot load it ({error})") from error

    def describe(values) -> list[tuple[str, list[Any], str]]:
        return [(v.name, list(v.shape), v.type[len("tensor("):-1]) for v in values]

    info = validate_io(path, describe(session.get_inputs()), describe(session.get_outputs()))
    return session, info
