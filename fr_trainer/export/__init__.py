"""ONNX export with an onnxruntime parity check (needs the `onnx` extra, imported lazily).

    from fr_trainer.export import export_onnx, export_onnx_with_report
    export_onnx(backbone, "model.onnx")              # -> Path; raises ParityError on mismatch
    report = export_onnx_with_report(backbone, "model.onnx", fp16=False, opset=17)
    print(report.summary())                           # size, parity, onnxruntime latency

`check_onnx_model(path)` / `load_onnx_session(path)` validate any ONNX face model's
interface ([N,3,112,112] float32 -> [N,D]) and raise `OnnxModelError` naming the file.
"""

from fr_trainer.export.model_io import (
    OnnxModelError,
    OnnxModelInfo,
    check_onnx_model,
    load_onnx_session,
)
from fr_trainer.export.onnx_export import (
    TOLERANCE_FP16,
    TOLERANCE_FP32,
    BatchParity,
    ExportReport,
    ParityError,
    export_onnx,
    export_onnx_with_report,
    random_face_batch,
)

__all__ = [
    "TOLERANCE_FP16",
    "TOLERANCE_FP32",
    "BatchParity",
    "ExportReport",
    "OnnxModelError",
    "OnnxModelInfo",
    "ParityError",
    "check_onnx_model",
    "export_onnx",
    "export_onnx_with_report",
    "load_onnx_session",
    "random_face_batch",
]
