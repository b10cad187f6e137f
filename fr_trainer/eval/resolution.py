"""Which FARs a set of impostor pairs can resolve, and how to show the others.

With M impostor pairs the smallest non-zero false-accept rate is 1 / M. A "TAR at FAR f"
with f < 1 / M allows m = floor(f * M) = 0 false accepts: it is the TAR at zero false
accepts, the same number for every such f, and must not be read as a TAR at f. LFW's
3,000 impostor pairs resolve FAR >= 3.3e-4 only, so its "TAR@FAR=1e-4" is such a number.

Every evaluation result carries `far_resolvable` ({far: bool}), `num_impostors` and
`smallest_resolvable_far`, added by `resolution_fields`; `format_tar` prints a TAR with
"n/r" where it is not resolvable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def smallest_resolvable_far(num_impostors: int) -> float:
    """1 / M (inf without impostor pairs)."""
    return 1.0 / num_impostors if num_impostors > 0 else math.inf


def is_resolvable(far: float, num_impostors: int) -> bool:
    """far >= 1 / M: at least one false accept is allowed at this FAR."""
    return num_impostors > 0 and 1.0 / num_impostors <= far


def resolution_fields(fars: Iterable[float], num_impostors: int) -> dict:
    """{"far_resolvable": {far: bool}, "num_impostors": M, "smallest_resolvable_far": 1/M}."""
    return {
        "far_resolvable": {float(f): is_resolvable(float(f), num_impostors) for f in fars},
        "num_impostors": int(num_impostors),
        "smallest_resolvable_far": smallest_resolvable_far(num_impostors),
    }


def format_tar(far: float, tar: float | None, resolvable: bool, min_far: float) -> str:
    """'1e-04: 97.50' or '1e-04: n/r (FAR < 1/M = 3.3e-04; TAR at 0 false accepts 85.10)'."""
    value = "nan" if tar is None or (isinstance(tar, float) and math.isnan(tar)) else f"{100 * tar:.2f}"
    if resolvable:
        return f"{far:g}: {value}"
    return f"{far:g}: n/r (FAR < 1/M = {min_far:.1e}; TAR at 0 false accepts {value})"
