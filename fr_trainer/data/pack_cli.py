"""`fr-trainer pack IMAGE_DIR OUT_DIR`: class-per-folder images -> OUT_DIR/train.rec/.idx."""

from __future__ import annotations

import argparse
import sys

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


def main(argv: list[str]) -> int:
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
