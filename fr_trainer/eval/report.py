"""`fr-trainer eval MODEL ROOT`: every evaluation set found under ROOT, one report.

Found under ROOT (ROOT itself and two levels of sub-directories):
- `*.bin` files: LFW-style 10-fold verification (`verify`);
- IJB trees: a directory named IJBC or IJBB (case-insensitive) with `meta/` (`ijb`);
- MegaFace trees: a directory with `facescrub/` and `megaface/` (`megaface`; `noise.txt`
  inside it is used as the noise list);
- image folders: a directory whose sub-directories (at least two) all hold images
  directly, outside the trees above (`allpairs`).

Writes OUT/report.md (tables; TAR@FAR that a set cannot resolve is shown as "n/r"),
OUT/report.json (every result) and the plots: the IJB ROCs, the MegaFace CMC and
rank-1-vs-distractors curves, and the all-pairs TAR-vs-FAR points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fr_trainer.eval.imagefolder import IMAGE_SUFFIXES


@dataclass
class FoundSets:
    bins: list[Path] = field(default_factory=list)
    ijb: list[tuple[Path, str]] = field(default_factory=list)
    megaface: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.bins or self.ijb or self.megaface or self.folders)


def _has_images(directory: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in directory.iterdir() if p.is_file())


def _is_class_folder_tree(directory: Path) -> bool:
    subdirs = [d for d in directory.iterdir() if d.is_dir()]
    return len(subdirs) >= 2 and all(_has_images(d) for d in subdirs)


def discover(root: str | Path, depth: int = 2) -> FoundSets:
    """The evaluation sets under `root` (see the module doc for the rules)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation root {root} is not a directory")
    found = FoundSets()
    claimed: list[Path] = []

    def inside_claimed(path: Path) -> bool:
        return any(path == c or c in path.parents for c in claimed)

    levels = [root]
    frontier = [root]
    for _ in range(depth):
        frontier = sorted(d for parent in frontier for d in parent.iterdir() if d.is_dir())
        levels.extend(frontier)
    for directory in levels:
        if inside_claimed(directory):
            continue
        if directory.name.upper() in ("IJBC", "IJBB") and (directory / "meta").is_dir():
            found.ijb.append((directory, directory.name.upper()))
            claimed.append(directory)
        elif (directory / "facescrub").is_dir() and (directory / "megaface").is_dir():
            found.megaface.append(directory)
            claimed.append(directory)
    for directory in levels:
        if inside_claimed(directory):
            continue
        found.bins.extend(sorted(directory.glob("*.bin")))
        if directory != root and _is_class_folder_tree(directory):
            found.folders.append(directory)
            claimed.append(directory)
    return found


def _pct(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _tar_cell(tar: float, resolvable: bool) -> str:
    return _pct(tar) if resolvable else f"n/r ({_pct(tar)} at 0 FA)"


def _far_table(rows: list[tuple[str, dict, dict, float]]) -> list[str]:
    """Markdown: one row per set, one column per FAR."""
    fars = sorted({float(f) for _, tars, _, _ in rows for f in tars}, reverse=True)
    lines = [
        "| set | " + " | ".join(f"TAR@FAR={f:g}" for f in fars) + " | smallest resolvable FAR |",
        "|---|" + "---:|" * len(fars) + "---:|",
    ]
    for name, tars, resolvable, min_far in rows:
        keyed = {float(f): (t, resolvable.get(f, resolvable.get(str(f), True))) for f, t in tars.items()}
        cells = [_tar_cell(*keyed[f]) if f in keyed else "-" for f in fars]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {min_far:.1e} |")
    return lines


def run_report(args: argparse.Namespace) -> dict:
    from fr_trainer.eval.cli import _embedder

    found = discover(args.root)
    if found.empty():
        raise ValueError(
            f"no evaluation set under {args.root}: expected *.bin files, IJBC/IJBB trees with meta/, "
            "a MegaFace tree (facescrub/ + megaface/) or class-per-folder image directories"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    embedder = _embedder(args, "eval")
    report: dict = {
        "model": str(args.model),
        "root": str(args.root),
        "out": str(out),
        "verify": [],
        "ijb": [],
        "megaface": [],
        "allpairs": [],
        "plots": [],
    }
    start = time.perf_counter()
    progress = not args.quiet
    if found.bins:
        from fr_trainer.eval.verification import verify_bin

        for path in found.bins:
            report["verify"].append(
                verify_bin(
                    embedder,
                    path,
                    batch_size=args.batch_size,
                    flip=not args.no_flip,
                    progress=progress,
                    fars=(1e-3, 1e-4),
                )
            )
    for directory, target in found.ijb:
        from fr_trainer.eval.ijb import evaluate_ijb

        result = evaluate_ijb(
            embedder,
            directory,
            target,
            out_dir=out / target.lower(),
            batch_size=args.batch_size,
            flip=not args.no_flip,
            progress=progress,
            model_name=Path(args.model).stem,
        )
        report["ijb"].append(result)
        report["plots"].append(result["files"].get("roc"))
    for directory in found.megaface:
        from fr_trainer.eval.imagefolder import read_noise_list
        from fr_trainer.eval.megaface import evaluate_megaface
        from fr_trainer.eval.plots import plot_cmc

        noise_file = directory / "noise.txt"
        result = evaluate_megaface(
            embedder,
            directory / "facescrub",
            directory / "megaface",
            model_path=args.model,
            cache_dir=out / "megaface_cache",
            noise=read_noise_list(noise_file) if noise_file.exists() else set(),
            batch_size=args.batch_size,
            flip=not args.no_flip,
            progress=progress,
        )
        result["name"] = directory.name
        report["megaface"].append(result)
        report["plots"].append(
            str(plot_cmc(result["cmc"], out / f"{directory.name}_cmc.png", title=f"{directory.name}: CMC and rank-1"))
        )
    for directory in found.folders:
        from fr_trainer.eval.allpairs import all_pairs_verification
        from fr_trainer.eval.embedder import embed_images
        from fr_trainer.eval.imagefolder import ImageList, list_class_folders
        from fr_trainer.eval.plots import plot_roc

        paths, labels, names = list_class_folders(directory)
        emb = embed_images(
            embedder,
            ImageList(paths),
            args.batch_size,
            not args.no_flip,
            progress=f"embed {directory.name}" if progress else False,
        )
        res = all_pairs_verification(
            emb, labels, (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), progress=progress
        )
        entry = {"name": directory.name, "images": len(paths), "identities": len(names), **res.to_json()}
        report["allpairs"].append(entry)
        points = sorted((r.achieved_far, r.tar) for r in res.results.values() if r.resolvable and r.achieved_far > 0)
        if points:
            path = plot_roc(
                {directory.name: ([p[0] for p in points], [p[1] for p in points])},
                out / f"{directory.name}_allpairs_roc.png",
                title=f"{directory.name}: all pairs",
                far_range=(1e-9, 1.0),
                min_far=res.smallest_resolvable_far,
            )
            report["plots"].append(str(path))
    report["seconds"] = time.perf_counter() - start
    report["plots"] = [p for p in report["plots"] if p]
    (out / "report.md").write_text("\n".join(markdown(report)) + "\n")
    from fr_trainer.eval.ijb import to_jsonable

    (out / "report.json").write_text(json.dumps(to_jsonable(report), indent=2, default=str))
    return report


def markdown(report: dict) -> list[str]:
    lines = [f"# Evaluation of `{report['model']}`", "", f"Sets found under `{report['root']}`.", ""]
    if report["verify"]:
        lines += [
            "## 1:1 verification (`.bin`, 10-fold)",
            "",
            "| set | pairs | accuracy | +- |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['name']} | {r['num_pairs']} | {_pct(r['accuracy'])} | {_pct(r['accuracy_std'])} |"
            for r in report["verify"]
        ]
        lines += [
            "",
            *_far_table(
                [
                    (r["name"], r["tar_at_far"], r["far_resolvable"], r["smallest_resolvable_far"])
                    for r in report["verify"]
                ]
            ),
            "",
        ]
    if report["ijb"]:
        lines += ["## IJB 1:1 verification", ""]
        lines += _far_table(
            [(r["target"], r["tar_at_far"], r["far_resolvable"], r["smallest_resolvable_far"]) for r in report["ijb"]]
        )
        lines.append("")
        for r in report["ijb"]:
            for gallery, ident in (r.get("identification") or {}).items():
                ranks = ", ".join(f"rank-{k} {_pct(v)}" for k, v in ident["rank"].items())
                lines.append(f"- {r['target']} 1:N {gallery}: {ranks}")
        lines.append("")
    for r in report["megaface"]:
        lines += [
            f"## MegaFace-style identification: {r['name']}",
            "",
            f"{r['identities']} identities, {r['probe_images']} probe images, {r['distractors']} distractors.",
            "",
            "| distractors | rank-1 | rank-5 | rank-10 |",
            "|---:|---:|---:|---:|",
        ]
        lines += [f"| {n} | {_pct(c[1])} | {_pct(c[5])} | {_pct(c[10])} |" for n, c in r["cmc"].items()]
        v = r["verification"]
        lines += [
            "",
            *_far_table(
                [("verification vs distractors", v["tar_at_far"], v["far_resolvable"], v["smallest_resolvable_far"])]
            ),
            "",
        ]
    if report["allpairs"]:
        lines += ["## All-pairs verification", ""]
        lines += _far_table(
            [
                (f"{r['name']} ({r['images']} images)", r["tar_at_far"], r["resolvable"], r["smallest_resolvable_far"])
                for r in report["allpairs"]
            ]
        )
        lines.append("")
    if report["plots"]:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({os.path.relpath(p, report['out'])})" for p in report["plots"]]
    lines += ["", "n/r: the set has fewer than 1 / FAR impostor pairs; the number is the TAR at zero false accepts."]
    return lines


def main(argv: list[str]) -> int:
    from fr_trainer.eval.cli import _add_model_args

    parser = argparse.ArgumentParser(prog="fr-trainer eval", description=__doc__.split("\n\n")[0])
    _add_model_args(parser)
    parser.add_argument("root", type=Path, help="directory holding the evaluation sets")
    parser.add_argument("--out", type=Path, default=Path("eval_report"), help="output dir (default ./eval_report)")
    args = parser.parse_args(argv)
    try:
        report = run_report(args)
    except (FileNotFoundError, ValueError, NotImplementedError, ImportError) as error:
        print(f"fr-trainer eval: error: {error}", file=sys.stderr)
        return 1
    print("\n".join(markdown(report)))
    print(f"\nwrote {Path(args.out) / 'report.md'} and report.json")
    return 0
