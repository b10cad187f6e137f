#!/usr/bin/env python
"""Merge a sharded training checkpoint into one file, or split such a file for N ranks.

    python tools/checkpoint_shards.py merge runs/demo merged.pt          # run dir, checkpoints dir or step dir
    python tools/checkpoint_shards.py split merged.pt runs/demo8/checkpoints --world-size 8

The merged file holds the whole head [num_classes, D] with its optimizer state; a split
folder is a complete checkpoint (`latest` set) that `checkpoint.resume=PATH` accepts.
Resuming with another world size needs no split: the trainer reshards on load.
"""

from __future__ import annotations

import argparse
import sys

from fr_trainer.train.checkpoint import CheckpointError, merge_shards, split_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="checkpoint folder -> one file")
    merge.add_argument("checkpoint")
    merge.add_argument("out_file")
    split = sub.add_parser("split", help="merged file -> checkpoint folder for N ranks")
    split.add_argument("merged_file")
    split.add_argument("out_root", help="checkpoints folder to write into")
    split.add_argument("--world-size", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            print(merge_shards(args.checkpoint, args.out_file))
        else:
            print(split_shards(args.merged_file, args.out_root, args.world_size))
    except (CheckpointError, FileNotFoundError) as error:
        print(f"checkpoint_shards: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
