"""`fr-trainer check-data ROOT [--rec train.rec] [--workers N] [--report FILE]`.

Exit status: 0 when the set is clean, 1 when problems were found (listed, and all of them in
the JSON report), 2 on bad arguments (a missing root, .rec or .idx).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "fr-trainer check-data"
SHOWN = 20  # problems printed; the report holds all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check a RecordIO training set: the .idx against the .rec, the insightface "
        "header and identity records, and every image record (reads, label in range and "
        "consistent, image decodes to the expected size), in parallel.",
    )
    parser.add_argument("root", help="the data root (data.root of the training config)")
    parser.add_argument("--rec", default="train.rec", help="the .rec in ROOT (default: train.rec)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--report", type=Path, default=None, help="write the full report as JSON to FILE")
    parser.add_argument(
        "--image-size", type=int, default=112, help="expected image side (default 112; 0: any size)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _summary(report) -> list[str]:
    lines = [
        f"{report.rec}: {report.checked} of {report.images} image records checked "
        f"({report.classes} classes, {'insightface layout' if report.insightface else 'no header'}) "
        f"in {report.seconds:.1f} s"
    ]
    if report.ok:
        return [*lines, "clean: no bad records, index and layout consistent"]
    problems = len(report.problems) + report.more_problems
    lines.append(f"PROBLEMS: {len(report.bad)} bad record(s), {problems} index/layout problem(s)")
    lines += [f"  {text}" for text in report.problems[:SHOWN]]
    lines += [f"  index {b.index} (key {b.key} at offset {b.offset}): {b.reason}" for b in report.bad[:SHOWN]]
    return lines


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.image_size < 0:
        parser.error(f"--image-size must be >= 0, got {args.image_size}")
    from fr_trainer.data.check import check_dataset

    try:
        report = check_dataset(
            args.root,
            args.rec,
            workers=args.workers,
            image_size=args.image_size,
            progress=not args.no_progress,
        )
    except FileNotFoundError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(_summary(report)))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"report: {args.report}")
    elif not report.ok:
        print("pass --report FILE for the full list as JSON")
    if not report.ok:
        print(
            "fix: repack the data (`fr-trainer pack`), rebuild a wrong index (`fr-trainer pack --reindex "
            "REC`), or train around the bad records with data.on_bad=skip"
        )
    return 0 if report.ok else 1
