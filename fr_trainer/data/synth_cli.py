"""`fr-trainer synth OUT_DIR [...]`: write the synthetic face-identity set (see `synthetic`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fr_trainer.data.synthetic import DEFAULT_VAL_SETS, generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fr-trainer synth",
        description="Synthetic face identities in the real formats: train.rec/.idx (insightface "
        "layout), verification .bin files from held-out identities and a mini IJB-C tree.",
    )
    parser.add_argument("out_dir", help="output directory (created if missing)")
    parser.add_argument("--identities", type=int, default=300, help="training identities (classes)")
    parser.add_argument("--images-per-identity", type=int, default=20)
    parser.add_argument(
        "--holdout-identities", type=int, default=100, help="identities of the .bin pairs"
    )
    parser.add_argument("--pairs", type=int, default=1000, help="pairs per .bin (half genuine)")
    parser.add_argument(
        "--ijbc-subjects", type=int, default=40, help="subjects of the mini IJB-C (0: none)"
    )
    parser.add_argument(
        "--megaface-identities", type=int, default=8, help="probe identities of the mini MegaFace tree (0: none)"
    )
    parser.add_argument("--megaface-images", type=int, default=4, help="images per MegaFace probe identity")
    parser.add_argument("--megaface-distractors", type=int, default=200, help="MegaFace distractors")
    parser.add_argument("--image-size", type=int, default=112, help="side of the training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        print(f"fr-trainer synth: error: OUT_DIR {args.out_dir} is a file; give a directory "
              "(created if missing)", file=sys.stderr)
        return 2
    try:
        summary = generate(
            args.out_dir,
            num_identities=args.identities,
            images_per_identity=args.images_per_identity,
            num_holdout_identities=args.holdout_identities,
            num_pairs=args.pairs,
            val_sets=DEFAULT_VAL_SETS,
            num_ijbc_subjects=args.ijbc_subjects,
            image_size=args.image_size,
            seed=args.seed,
            workers=args.workers,
            progress=not args.no_progress,
        )
        megaface = None
        if args.megaface_identities > 0:
            from fr_trainer.data.synth_megaface import write_megaface_tree

            megaface = write_megaface_tree(
                args.out_dir, args.megaface_identities, args.megaface_images, args.megaface_distractors, args.seed
            )
    except (OSError, ValueError) as error:  # bad sizes, OUT_DIR a file or not writable
        print(f"fr-trainer synth: error: {error}", file=sys.stderr)
        return 2
    bins = ", ".join(f"{name}.bin ({pairs} pairs)" for name, pairs in summary.bins.items())
    print(
        f"wrote {summary.out_dir}: train.rec {summary.num_images} images of {summary.num_classes} "
        f"classes; {bins or 'no .bin'}; IJBC {summary.ijbc_images} images, "
        f"{summary.ijbc_templates} templates, {summary.ijbc_pairs} template pairs; "
        f"{summary.images_rendered} images in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.0f} images/s)"
    )
    if megaface is not None:
        print(
            f"wrote {megaface}: {args.megaface_identities} probe identities x {args.megaface_images} images, "
            f"{args.megaface_distractors} distractors, noise.txt"
        )
    return 0
