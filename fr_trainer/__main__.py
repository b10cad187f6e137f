"""`python -m fr_trainer ...` (also under `torchrun -m fr_trainer ...`)."""

import sys

from fr_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
