"""ONNX export with an onnxruntime parity check (needs the `onnx` extra, imported lazily).

    from fr_trainer.export import export_onnx, export_onnx_with_report
    export_onnx(backbone, "model.onnx")              # -> Path; raises ParityError on mismatch
    report = export_onnx_with_report(backbone, "model.onnx", fp16=False, opset=17)
    print(report.summary())                           # size, parity, onnxruntime latency

`check_onnx_model(path)` / `load_onnx_session(path)` validate any ONNX face model's
interface ([N,3,112,112] float32 -> [N,D]) and raise `OnnxModelError` naming the file.
`check_exportable(model)` raises `ModelNotExportable` for NaN/inf weights or an embedding
that does not depend on the input (`fr-trainer export` runs it first; exit status 2).
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
from fr_trainer.export.sanity import ModelNotExportable, check_exportable

__all__ = [
    "TOLERANCE_FP16",
    "TOLERANCE_FP32",
    "BatchParity",
    "ExportReport",
    "ModelNotExportable",
    "OnnxModelError",
    "OnnxModelInfo",
    "ParityError",
    "check_exportable",
    "check_onnx_model",
    "export_onnx",
    "export_onnx_with_report",
    "load_onnx_session",
    "random_face_batch",
]
