"""`fr-trainer <command> ...`: a thin dispatcher.

Each command lives in the module of its area and exposes `main(argv: list[str]) -> int`;
modules are imported only when their command runs, so optional extras stay optional.
"""

from __future__ import annotations

import importlib
import sys

# command -> "module:function"; `bench` takes a second word (head|data|train).
COMMANDS: dict[str, str] = {
    "train": "fr_trainer.train.cli:main",
    "synth": "fr_trainer.data.synth_cli:main",
    "pack": "fr_trainer.data.pack_cli:main",
    "check-data": "fr_trainer.data.check_cli:main",
    "export": "fr_trainer.export.cli:main",
    "verify": "fr_trainer.eval.cli:verify_main",
    "ijb": "fr_trainer.eval.cli:ijb_main",
    "megaface": "fr_trainer.eval.scale_cli:megaface_main",
    "allpairs": "fr_trainer.eval.scale_cli:allpairs_main",
    "eval": "fr_trainer.eval.report:main",
    "plan": "fr_trainer.plan.cli:main",
    "import-insightface": "fr_trainer.train.import_insightface:main",
}
BENCHMARKS: dict[str, str] = {
    "head": "fr_trainer.heads.bench:main",
    "data": "fr_trainer.data.bench:main",
    "train": "fr_trainer.train.bench:main",
    "tail": "fr_trainer.train.bench_tail:main",
    "export": "fr_trainer.export.bench:main",
    "eval": "fr_trainer.eval.bench:main",
    "search": "fr_trainer.eval.bench_scale:search_main",
    "allpairs": "fr_trainer.eval.bench_scale:allpairs_main",
}

# commands whose big CPU tensors are faster on huge pages (fr_trainer/hugepage_malloc.py)
HUGEPAGE_COMMANDS = ("train", "bench")

USAGE = """usage: fr-trainer <command> [args]

commands:
  train CONFIG [--set key=value ...]   train (also under torchrun -m fr_trainer train)
  synth OUT_DIR [...]                  synthetic identities in the real formats
  pack IMAGE_DIR OUT_DIR               class-per-folder images -> train.rec/.idx
  pack --reindex REC                   rebuild a lost or wrong .idx from the .rec
  check-data ROOT [--report FILE]      check every record of a training set (exit 1: problems)
  export CHECKPOINT OUT.onnx           ONNX export with a parity check
  verify MODEL --bin a.bin [...]       LFW-style 10-fold verification
  ijb MODEL --root DIR --target IJBC   IJB-C / IJB-B 1:1 and 1:N
  megaface MODEL --probes D --distractors D   MegaFace-style CMC and TAR@FAR=1e-6
  allpairs MODEL --root IMAGE_DIR      exact TAR@FAR over every pair of a labelled set
  eval MODEL ROOT [--out DIR]          every set under ROOT, one markdown + JSON report
  plan --classes N [...]               head memory and collective volume per GPU
  import-insightface RUN_DIR OUT --config CONFIG
                                       an arcface_torch run -> a checkpoint to resume here
  bench head|data|train|tail|export|eval|search|allpairs
                                       benchmarks

`fr-trainer <command> --help` for the options of one command."""


def _load(target: str):
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("fr_trainer"):
            raise SystemExit(f"fr-trainer: command module {module_name} is not built yet") from None
        raise
    return getattr(module, function_name)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if from_command_line and command in HUGEPAGE_COMMANDS:
        from fr_trainer.hugepage_malloc import ensure_hugepage_malloc

        ensure_hugepage_malloc(sys.orig_argv[1:])  # returns, or restarts this command once
    if command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            print(f"usage: fr-trainer bench {{{'|'.join(BENCHMARKS)}}} [...]", file=sys.stderr)
            return 2
        return int(_load(BENCHMARKS[rest[0]])(rest[1:]) or 0)
    if command not in COMMANDS:
        print(f"fr-trainer: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(_load(COMMANDS[command])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
