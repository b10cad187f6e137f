"""`fr-trainer megaface` and `fr-trainer allpairs`: evaluation at the papers' scales."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fr_trainer.eval.cli import _add_model_args, _embedder, _pct, _write_json


def _fail(command: str, error: Exception) -> int:
    print(f"fr-trainer {command}: error: {error}", file=sys.stderr)
    return 1


def _scale_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-budget", type=int, default=1 << 30, help="bytes for the search/score blocks (default 1 GiB)"
    )
    parser.add_argument(
        "--search-device", default="cpu", help="torch device of the GEMMs and top-k merges (cpu, cuda, ...)"
    )


def format_megaface(result: dict) -> list[str]:
    lines = [
        f"MegaFace: {result['identities']} identities, {result['probe_images']} probe images, "
        f"{result['distractors']} distractors (noise list: {result['noise_entries']} entries; "
        f"distractor cache {'reused' if result['distractor_cache_reused'] else 'written'})"
    ]
    for n, ranks in result["cmc"].items():
        lines.append(
            f"  {n:>9} distractors: " + "  ".join(f"rank-{r}: {_pct(v)}" for r, v in ranks.items() if r in (1, 5, 10))
        )
    ver = result["verification"]
    from fr_trainer.eval.resolution import format_tar

    lines.append(
        "  verification TAR@FAR "
        + "  ".join(
            format_tar(f, t, ver["far_resolvable"][f], ver["smallest_resolvable_far"])
            for f, t in ver["tar_at_far"].items()
        )
        + f"  ({ver['num_impostors']} impostor pairs)"
    )
    return lines


def megaface_main(argv: list[str]) -> int:
    """`fr-trainer megaface MODEL --probes DIR --distractors DIR`."""
    parser = argparse.ArgumentParser(
        prog="fr-trainer megaface",
        description="MegaFace-style 1:N identification (CMC rank-1..10 at 10, 100, ..., N distractors) "
        "and TAR@FAR=1e-6 verification against distractors.",
    )
    _add_model_args(parser)
    _scale_args(parser)
    parser.add_argument("--probes", type=Path, required=True, help="probe tree: DIR/<identity>/<image>")
    parser.add_argument("--distractors", type=Path, required=True, help="distractor images (any depth)")
    parser.add_argument("--noise", type=Path, default=None, help="noise list: image paths or ids to ignore")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("megaface_cache"),
        help="distractor embedding cache (default ./megaface_cache)",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument(
        "--counts", type=int, nargs="+", default=None, help="distractor counts (default 10, 100, ..., N)"
    )
    parser.add_argument("--fars", type=float, nargs="+", default=[1e-6], help="verification FARs (default 1e-6)")
    args = parser.parse_args(argv)
    from fr_trainer.eval.imagefolder import read_noise_list
    from fr_trainer.eval.megaface import evaluate_megaface

    try:
        embedder = _embedder(args, "megaface")
        result = evaluate_megaface(
            embedder,
            args.probes,
            args.distractors,
            model_path=args.model,
            cache_dir=None if args.no_cache else args.cache,
            noise=read_noise_list(args.noise),
            counts=args.counts,
            fars=args.fars,
            batch_size=args.batch_size,
            flip=not args.no_flip,
            device=args.search_device,
            memory_budget=args.memory_budget,
            progress=not args.quiet,
        )
    except (FileNotFoundError, ValueError, NotImplementedError, ImportError) as error:
        return _fail("megaface", error)
    print("\n".join(format_megaface(result)))
    _write_json(args.json, result)
    return 0


def allpairs_main(argv: list[str]) -> int:
    """`fr-trainer allpairs MODEL --root IMAGE_DIR`."""
    parser = argparse.ArgumentParser(
        prog="fr-trainer allpairs",
        description="All-pairs verification (Trillion-Pairs / MFR style) of a class-per-folder image tree: "
        "exact TAR@FAR over every pair.",
    )
    _add_model_args(parser)
    _scale_args(parser)
    parser.add_argument("--root", type=Path, required=True, help="images: ROOT/<identity>/<image>")
    parser.add_argument("--fars", type=float, nargs="+", default=[1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    args = parser.parse_args(argv)
    try:
        result = run_allpairs(args)
    except (FileNotFoundError, ValueError, NotImplementedError, ImportError) as error:
        return _fail("allpairs", error)
    print("\n".join(format_allpairs(result)))
    _write_json(args.json, result)
    return 0


def run_allpairs(args: argparse.Namespace) -> dict:
    from fr_trainer.eval.allpairs import all_pairs_verification
    from fr_trainer.eval.embedder import embed_images
    from fr_trainer.eval.imagefolder import ImageList, list_class_folders

    paths, labels, names = list_class_folders(args.root)
    embeddings = embed_images(
        _embedder(args, "allpairs"), ImageList(paths), args.batch_size, not args.no_flip,
        progress=False if args.quiet else "embed",
    )
    res = all_pairs_verification(
        embeddings,
        labels,
        args.fars,
        device=args.search_device,
        memory_budget=min(args.memory_budget, 512 << 20),
        progress=not args.quiet,
    )
    return {"root": str(args.root), "images": len(paths), "identities": len(names), **res.to_json()}


def format_allpairs(result: dict) -> list[str]:
    from fr_trainer.eval.resolution import format_tar

    line = "  ".join(
        format_tar(float(f), t, result["resolvable"][f], result["smallest_resolvable_far"])
        for f, t in result["tar_at_far"].items()
    )
    return [
        f"all pairs of {result['root']}: {result['images']} images, {result['identities']} identities, "
        f"{result['num_genuine']} genuine / {result['num_impostors']} impostor pairs ({result['passes']} pass(es))",
        "  TAR@FAR " + line,
    ]


def dumps(result: dict) -> str:
    from fr_trainer.eval.ijb import to_jsonable

    return json.dumps(to_jsonable(result), indent=2)
