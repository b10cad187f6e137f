"""`fr-trainer pack IMAGE_DIR OUT_DIR`: class-per-folder images -> OUT_DIR/train.rec/.idx.

`fr-trainer pack --reindex REC [--idx IDX]` rebuilds a lost or wrong `.idx` from the `.rec`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fr_trainer.data.pack import pack_image_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fr-trainer pack",
        description="Pack IMAGE_DIR/<class>/<image> into OUT_DIR/<name>.rec/.idx (insightface layout). "
        "Images that do not decode are reported (stderr, OUT_DIR/bad_images.txt) and skipped.",
    )
    parser.add_argument("image_dir")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--name", default="train", help="file stem of the .rec/.idx (default: train)"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument(
        "--no-verify", action="store_true", help="store bytes without decoding them"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="resize to SIZE x SIZE (re-encodes)"
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 if any image was bad"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def build_reindex_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fr-trainer pack --reindex",
        description="Rebuild the .idx of a .rec by walking its records (keys 0, 1, ... in file "
        "order, as MXNet and insightface write them). A corrupt .rec is an error and leaves any "
        "existing index untouched.",
    )
    parser.add_argument("--reindex", metavar="REC", required=True, help="the .rec to index")
    parser.add_argument("--idx", default=None, help="the index to write (default: REC with .idx)")
    return parser


def reindex_main(argv: list[str]) -> int:
    from fr_trainer.data.recordio import RecordIOError, build_index

    args = build_reindex_parser().parse_args(argv)
    rec = Path(args.reindex)
    idx = Path(args.idx) if args.idx else rec.with_suffix(".idx")
    if not rec.is_file():
        print(f"fr-trainer pack --reindex: {rec} does not exist; pass the path of a .rec file")
        return 2
    try:
        count = build_index(rec, idx)
    except RecordIOError as error:
        print(f"fr-trainer pack --reindex: {error}; the .rec is damaged, {idx} was not changed")
        return 1
    print(f"indexed {count} records of {rec} into {idx}")
    return 0


def main(argv: list[str]) -> int:
    if any(arg == "--reindex" or arg.startswith("--reindex=") for arg in argv):
        return reindex_main(argv)
    args = build_parser().parse_args(argv)
    try:
        summary = pack_image_folder(
            args.image_dir,
            args.out_dir,
            name=args.name,
            workers=args.workers,
            verify=not args.no_verify,
            image_size=args.image_size,
            quality=args.quality,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as error:  # missing/unreadable IMAGE_DIR, OUT_DIR not writable
        print(f"fr-trainer pack: error: {error}", file=sys.stderr)
        return 2
    print(
        f"packed {summary.num_images} images of {summary.num_classes} classes into "
        f"{summary.out_dir}/{args.name}.rec in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.0f} images/s); {len(summary.bad)} bad image(s) skipped"
        + (
            f", {len(summary.dropped_classes)} empty class(es) dropped"
            if summary.dropped_classes
            else ""
        )
        + (
            f" (listed in {summary.out_dir}/bad_images.txt)"
            if summary.bad or summary.dropped_classes
            else ""
        )
    )
    return 1 if args.strict and (summary.bad or summary.dropped_classes) else 0
