"""`fr-trainer verify` and `fr-trainer ijb`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fr_trainer.eval.metrics import FAR_MODES


def _far(text: str) -> float:
    """An argparse type: a false-accept rate in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a false-accept rate in (0, 1], e.g. 1e-4")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an .onnx file, or a training checkpoint")
    parser.add_argument(
        "--batch-size", type=int, default=128, help="images per batch (default 128)"
    )
    parser.add_argument(
        "--no-flip", action="store_true", help="do not add the flipped image's embedding"
    )
    parser.add_argument(
        "--far-mode",
        choices=FAR_MODES,
        default="max",
        help="TAR@FAR convention: 'max' = largest TAR with FAR <= f (default); "
        "'nearest' = ROC point nearest f (insightface)",
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated onnxruntime providers (default: CUDA when present, else CPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)"
    )
    parser.add_argument(
        "--device", default=None, help="torch device for checkpoints (default: the model's)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the results to this JSON file"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _embedder(args: argparse.Namespace, command: str):
    from fr_trainer.eval.embedder import MIN_EMBEDDING_SIZE, embedding_size, load_embedder

    providers = args.providers.split(",") if args.providers else None
    embedder = load_embedder(
        args.model,
        providers=providers,
        batch_size=args.batch_size * 2,
        num_threads=args.threads,
        device=args.device,
        ema=getattr(args, "ema", False),  # `verify --ema`
    )
    size = embedding_size(embedder, str(args.model))
    if size < MIN_EMBEDDING_SIZE:
        print(
            f"fr-trainer {command}: warning: {args.model} gives {size}-dimensional embeddings (face models give "
            f"{MIN_EMBEDDING_SIZE} or more, usually 128-512); is it the right model?",
            file=sys.stderr,
        )
    return embedder


def _pct(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _tar(result: dict, far: float, tar: float) -> str:
    """One TAR@FAR, marked "n/r" when the set has fewer than 1 / far impostor pairs."""
    from fr_trainer.eval.resolution import format_tar

    resolvable = result.get("far_resolvable", {}).get(far, True)
    return format_tar(far, tar, resolvable, result.get("smallest_resolvable_far", 0.0))


def _write_json(path: Path | None, payload) -> None:
    if path is not None:
        from fr_trainer.eval.ijb import to_jsonable

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_jsonable(payload), indent=2))


# what a bad model, .bin set or IJB directory raises: one line, exit status 2
INPUT_ERRORS = (OSError, ValueError, NotImplementedError, ImportError)


def _fail(command: str, error: Exception) -> int:
    message = " ".join(str(error).split())  # one line, whatever the library wrote
    print(f"fr-trainer {command}: error: {message}", file=sys.stderr)
    return 2


def verify_main(argv: list[str]) -> int:
    """`fr-trainer verify MODEL --bin a.bin [b.bin ...]`."""
    parser = argparse.ArgumentParser(
        prog="fr-trainer verify",
        description="LFW-style verification: 10-fold accuracy and TAR@FAR on .bin pair sets.",
    )
    _add_model_args(parser)
    parser.add_argument("--bin", nargs="+", required=True, type=Path, help=".bin verification sets")
    parser.add_argument("--ema", action="store_true", help="a training checkpoint's moving average "
                        "of the weights (model.ema_decay > 0) instead of its weights")
    parser.add_argument("--nfolds", type=int, default=10, help="folds of the protocol (default 10)")
    parser.add_argument(
        "--fars",
        type=_far,
        nargs="+",
        default=[1e-3, 1e-4],
        help="FARs for TAR@FAR (default 1e-3 1e-4)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="search thresholds on insightface's grid 0:4:0.01 instead of exactly",
    )
    args = parser.parse_args(argv)
    from fr_trainer.eval.verification import verify_bin

    grid = None
    if args.grid:
        import numpy as np

        grid = np.arange(0, 4, 0.01)
    try:
        embedder = _embedder(args, "verify")
        results = []
        for path in args.bin:
            result = verify_bin(
                embedder,
                path,
                batch_size=args.batch_size,
                flip=not args.no_flip,
                progress=not args.quiet,
                nfolds=args.nfolds,
                fars=args.fars,
                far_mode=args.far_mode,
                threshold_grid=grid,
            )
            results.append(result)
            tars = "  ".join("TAR@FAR=" + _tar(result, f, t) for f, t in result["tar_at_far"].items())
            print(
                f"{result['name']}: accuracy {_pct(result['accuracy'])} +- "
                f"{_pct(result['accuracy_std'])} ({result['num_pairs']} pairs)  {tars}  "
                f"[{args.far_mode}]  {result['images_per_second']:.1f} img/s",
                flush=True,
            )
    except INPUT_ERRORS as error:
        return _fail("verify", error)
    _write_json(args.json, {"model": str(args.model), "results": results})
    return 0


def ijb_main(argv: list[str]) -> int:
    """`fr-trainer ijb MODEL --root DIR --target IJBC`."""
    parser = argparse.ArgumentParser(
        prog="fr-trainer ijb",
        description="IJB-C / IJB-B 1:1 verification (TAR@FAR) and 1:N identification.",
    )
    _add_model_args(parser)
    parser.add_argument(
        "--root", type=Path, required=True, help="directory with meta/ and loose_crop/"
    )
    parser.add_argument("--target", default="IJBC", type=str.upper, choices=["IJBC", "IJBB"])
    parser.add_argument(
        "--out", type=Path, default=None, help="output dir (default: ./ijb_<target>)"
    )
    parser.add_argument(
        "--no-det-score", action="store_true", help="do not weight by detection score"
    )
    parser.add_argument("--no-1n", action="store_true", help="skip 1:N identification")
    parser.add_argument("--workers", type=int, default=4, help="image decode/align threads")
    args = parser.parse_args(argv)
    from fr_trainer.eval.ijb import evaluate_ijb

    out = args.out or Path(f"ijb_{args.target.lower()}")
    try:
        embedder = _embedder(args, "ijb")
        result = evaluate_ijb(
            embedder,
            args.root,
            args.target,
            out_dir=out,
            batch_size=args.batch_size,
            flip=not args.no_flip,
            use_det_score=not args.no_det_score,
            far_mode=args.far_mode,
            one_to_n=not args.no_1n,
            num_workers=args.workers,
            progress=not args.quiet,
            model_name=Path(args.model).stem,
        )
    except INPUT_ERRORS as error:
        return _fail("ijb", error)
    print(
        f"{result['target']} 1:1 ({result['num_images']} images, {result['num_templates']} templates, "
        f"{result['num_pairs']} pairs), TAR@FAR [{result['far_mode']}]:"
    )
    print("  " + "  ".join(_tar(result, f, t) for f, t in result["tar_at_far"].items()))
    for gallery, ident in (result["identification"] or {}).items():
        ranks = "  ".join(f"rank-{k}: {_pct(v)}" for k, v in ident["rank"].items())
        tpirs = "  ".join(f"{f:g}: {_pct(v)}" for f, v in ident["tpir_at_fpir"].items())
        print(f"{result['target']} 1:N {gallery}: {ranks}  TPIR@FPIR {tpirs}")
    if result["identification"] is None and not args.no_1n:
        print("1:N skipped: no *_1N_gallery_*.csv in the meta directory")
    print(f"time {result['seconds']['total']:.1f}s; wrote " + ", ".join(result["files"].values()))
    _write_json(args.json, result)
    return 0
