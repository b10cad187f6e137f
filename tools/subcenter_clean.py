#!/usr/bin/env python
"""List a Sub-center ArcFace run's likely label noise and write its k = 1 centres.

    python tools/subcenter_clean.py RUN EMBEDDINGS --noisy noisy.tsv --out arcface_merged.pt [--max-angle 75]

See `fr_trainer/train/subcenter_clean.py`.
"""

from __future__ import annotations

import sys

from fr_trainer.train.subcenter_clean import main

if __name__ == "__main__":
    sys.exit(main())
