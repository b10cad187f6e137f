"""`fr-trainer train CONFIG [--set key=value ...]` (also `torchrun ... -m fr_trainer train ...`).

Exit status: 0 done; 2 bad config/checkpoint, or the run directory is locked by another job;
3 non-finite loss; 75 stopped by SIGTERM/SIGINT with a checkpoint saved (rerun to resume);
76 a step waited train.collective_timeout_s for another rank; 77 the launcher died;
130 a second SIGINT (no checkpoint). See fr_trainer/train/signals.py.
"""

from __future__ import annotations

import argparse
import sys

PROG = "fr-trainer train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a face-recognition model (DDP backbone, "
        "model-parallel PartialFC head). Launch with torchrun for several ranks.",
    )
    p.add_argument("config", help="a .toml or .json config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.2 (repeatable)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    from fr_trainer.train.worker_exit import exit_worker

    return exit_worker(_run(build_parser().parse_args(argv)))


def _run(args: argparse.Namespace) -> int:
    import json

    from fr_trainer.data.bad_records import BadRecordError
    from fr_trainer.train.checkpoint import CheckpointError
    from fr_trainer.train.config import ConfigError, load_config, to_dict
    from fr_trainer.train.peer_failure import PeerFailed
    from fr_trainer.train.signals import EXIT_ABORTED, EXIT_PREEMPTED, Preempted, write_exit_status

    trainer = None
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2))
            return 0
        from fr_trainer.train.trainer import NonFiniteLoss, Trainer

        try:
            trainer = Trainer(config)
        except ValueError as error:  # set-up rejected the data, the model or the checkpoint
            raise ConfigError(str(error)) from error
        trainer.fit()
    except (ConfigError, CheckpointError, BadRecordError, PeerFailed) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)  # one line
        return 2
    except NonFiniteLoss as error:
        print(f"{PROG}: stopped: {error}", file=sys.stderr)
        return 3
    except Preempted as error:
        print(f"{PROG}: preempted: {error}", file=sys.stderr)
        write_exit_status(EXIT_PREEMPTED, str(error))
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"{PROG}: aborted by a second SIGINT, no checkpoint of this step", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        from fr_trainer.train.worker_exit import release_distributed

        if trainer is not None:  # a stop by exception too: TensorBoard's last events reach the disk
            trainer.reporter.close()
        trainer = None  # its process-group references (DDP, the head) go before the group does
        release_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
