"""`fr-trainer export CHECKPOINT OUT.onnx`: ONNX export with a parity check.

Where the backbone comes from (the seam, kept in `load_model`):

1. `fr-trainer export CHECKPOINT OUT.onnx` reads a training checkpoint with
   `fr_trainer.train.checkpoint.load_backbone(path)` (it returns the backbone module, or a
   tuple whose first item is it). Until the trainer provides that function this form
   fails with a message pointing to form 2.
2. `fr-trainer export --backbone NAME [--weights STATE_DICT.pt] OUT.onnx`: builds the
   registry backbone NAME and loads a plain backbone state_dict saved with `torch.save`
   (wrappers {"state_dict"|"model"|"backbone": ...} and "module."/"_orig_mod." prefixes
   are accepted; the embedding size is read from the weights unless --embedding-size is
   given). `fr-trainer export --backbone NAME STATE_DICT.pt OUT.onnx` means the same.

Before exporting, `export.sanity.check_exportable` refuses a model with NaN/inf weights or
whose embedding does not depend on the input (a diverged run passes the parity check).

Exit status: 0 exported and checked; 1 the export or the parity check failed; 2 bad input
(usage, a missing or unreadable checkpoint, weights that do not fit, a model that must not
be exported: non-finite weights, input-independent embeddings), one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

PROG = "fr-trainer export"


class CliError(Exception):
    """A user-facing error about the input: printed as `fr-trainer export: error: ...`, exit 2."""


def _at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    return parse


def _tolerance(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a backbone to ONNX ([N,3,112,112] float32 normalised as "
        "(x/255-0.5)/0.5 -> [N,D]), check onnxruntime against torch, report size and latency.",
    )
    p.add_argument("paths", nargs="+", metavar="CHECKPOINT OUT.onnx",
                   help="training checkpoint and output file (with --backbone: OUT.onnx, "
                   "optionally preceded by a state_dict file)")
    p.add_argument("--backbone", metavar="NAME", help="registry backbone to build "
                   "(instead of reading a training checkpoint)")
    p.add_argument("--weights", metavar="STATE_DICT.pt", help="plain backbone state_dict "
                   "(torch.save) for --backbone; default: random initialisation")
    p.add_argument("--embedding-size", type=int, help="embedding size D for --backbone "
                   "(default: from --weights, else 512)")
    p.add_argument("--ema", action="store_true", help="export the moving average of the "
                   "weights (a run trained with model.ema_decay > 0) instead of the weights")
    p.add_argument("--opset", type=_at_least(7), default=17, help="ONNX opset (default 17)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights (input/output stay fp32)")
    p.add_argument("--tolerance", type=_tolerance, help="relative parity tolerance "
                   "(default 1e-4 fp32, 2e-2 fp16: max|ort-torch| <= tol * max(1, max|torch|))")
    p.add_argument("--cosine-tolerance", type=_tolerance, help="parity also needs min cosine "
                   ">= 1 - this (default 1e-5 fp32, 1e-3 fp16)")
    p.add_argument("--batch-sizes", type=_at_least(1), nargs="+", default=[1, 7],
                   help="batch sizes checked and timed (default 1 7)")
    p.add_argument("--latency-runs", type=_at_least(0), default=5, help="timed runs per batch size")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        source, out = split_paths(args)
        model = load_model(args, source)
        refuse_unusable(model, source)
        report = run_export(model, out, args)
    except (CliError, OSError, ValueError) as error:  # the input: usage, files, checkpoints
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except (RuntimeError, ImportError) as error:  # the export itself (parity, missing onnx)
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return 0


class UsageError(CliError):
    pass


class RefusedModel(UsageError):
    """A model that must not be exported (exit status 2, like a usage error)."""


def refuse_unusable(model: nn.Module, source: Path | None) -> None:
    from fr_trainer.export.sanity import ModelNotExportable, check_exportable

    try:
        check_exportable(model)
    except ModelNotExportable as error:
        raise RefusedModel(f"not exporting {source or 'the model'}: {error}") from None


def split_paths(args: argparse.Namespace) -> tuple[Path | None, Path]:
    """-> (checkpoint or state_dict path or None, output path)."""
    paths = [Path(p) for p in args.paths]
    if len(paths) > 2:
        raise UsageError(f"expected CHECKPOINT OUT.onnx; got {len(paths)} paths")
    if args.backbone is None:
        if len(paths) != 2:
            raise UsageError("expected CHECKPOINT OUT.onnx (or --backbone NAME "
                             "[--weights STATE_DICT.pt] OUT.onnx)")
        if args.weights:
            raise UsageError("--weights goes with --backbone NAME")
        return paths[0], _output(paths[1])
    if len(paths) == 2 and args.weights:
        raise UsageError(f"give the state_dict once: {paths[0]} or --weights {args.weights}")
    weights = paths[0] if len(paths) == 2 else (Path(args.weights) if args.weights else None)
    return weights, _output(paths[-1])


def _output(path: Path) -> Path:
    if path.is_dir():
        raise UsageError(f"OUT.onnx {path} is a directory; give a file name, e.g. {path / 'model.onnx'}")
    return path


def load_model(args: argparse.Namespace, source: Path | None) -> nn.Module:
    """A training checkpoint (run dir, step folder, common.pt or a merged file, read by the
    trainer's `load_backbone`) or a registry backbone + weights."""
    if args.backbone is None:
        if source is None or not source.exists():
            raise CliError(f"checkpoint {source} does not exist; pass a run directory, a "
                           "checkpoints/step_N folder, its common.pt or a merged checkpoint file")
        return load_training_checkpoint(source, ema=args.ema)
    if args.ema:
        raise UsageError("--ema reads a training checkpoint; it does not go with --backbone")
    if source is not None and not source.is_file():
        raise CliError(f"weights file {source} does not exist (or is not a file)")
    return load_registry_backbone(args.backbone, source, args.embedding_size)


def load_training_checkpoint(path: Path, ema: bool = False) -> nn.Module:
    from fr_trainer.train.checkpoint import load_backbone
    from fr_trainer.train.load_errors import UNREADABLE, unreadable_message

    try:
        loaded = load_backbone(path, ema=True) if ema else load_backbone(path)
    except UNREADABLE as error:
        raise CliError(unreadable_message(path, error)) from None
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if not isinstance(model, nn.Module):
        raise CliError(f"load_backbone({path}) returned {type(model).__name__}, not a module")
    return model


def load_registry_backbone(name: str, weights: Path | None, embedding_size: int | None) -> nn.Module:
    from fr_trainer.backbones import create_backbone

    state = read_state_dict(weights) if weights is not None else None
    if embedding_size is None and state is not None and "features.weight" in state:
        embedding_size = int(state["features.weight"].shape[0])
    kwargs = {} if embedding_size is None else {"embedding_size": embedding_size}
    model = create_backbone(name, **kwargs)
    if state is not None:
        check_state_dict_fits(model, state, f"{weights} does not fit backbone {name!r}")
        model.load_state_dict(state, strict=True)
    return model


def check_state_dict_fits(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise CliError listing (a few) missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise CliError(f"{what}: " + "; ".join(problems))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (unpickling fails in many ways; all are "bad file")
        raise CliError(f"{path} is not a torch.save'd state_dict ({error})") from None
    for key in ("state_dict", "model", "backbone"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CliError(f"{path} does not hold a state_dict (name -> tensor); got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def run_export(model: nn.Module, out: Path, args: argparse.Namespace):
    from fr_trainer.export.onnx_export import export_onnx_with_report

    return export_onnx_with_report(
        model, out, opset=args.opset, fp16=args.fp16, check=not args.no_check,
        batch_sizes=tuple(args.batch_sizes), tolerance=args.tolerance,
        cosine_tolerance=args.cosine_tolerance,
        latency_runs=args.latency_runs,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
