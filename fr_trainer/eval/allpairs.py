"""All-pairs verification of a labelled set: TAR at FAR over every pair, exactly.

    tars = all_pairs_tar_at_far(embeddings, labels, fars=(1e-6, 1e-4))

Pairs: every unordered pair {i, j}, i != j, of the N rows; genuine when the labels are
equal, impostor otherwise (M impostor and G genuine pairs). Scores are the fp32 GEMM of
the (L2-normalised, unless `normalize=False`) rows, computed block by block; the pairs
are never materialised.

Threshold semantics (the "max" convention of `fr_trainer.eval.metrics.tar_at_far`): for
a FAR f let m = the largest integer with m / M <= f (false accepts allowed). A pair is
accepted when its score is strictly greater than the threshold t, where

    t = the (m + 1)-th largest impostor score  (the smallest impostor score s such that
        at most m impostor scores are > s),
    TAR = #(genuine scores > t) / G,   achieved FAR = #(impostor scores > t) / M <= f.

Ties count exactly: impostors equal to t are rejected with it. This equals the largest
TAR over the ROC points with FAR <= f (`metrics.tar_at_far(..., mode="max")`). When
m >= M every pair is accepted (t = -inf, TAR = 1). A FAR f < 1 / M is *not resolvable*:
m = 0 and the TAR reported is the TAR at zero false accepts (flagged, with 1 / M).

How (one GEMM pass in the usual case; see `AllPairsStats`):
1. The rows are sorted by label, so the genuine pairs lie in the few blocks near the
   diagonal; the other blocks need no mask.
2. A small sample of rows (against all rows) estimates where each threshold lies.
3. The main pass computes each score block once and, from the float32 bit patterns
   (monotone in the value once the sign is accounted for), accumulates an exact
   histogram of the top 16 bits (65,536 bins) for impostors and genuines; in the bins
   predicted to hold a threshold it also accumulates the histogram of the low 16 bits
   (so the exact score is known without storing it), and it keeps every score above a
   cut predicted for the extreme tail (small FARs).
4. The exact threshold bin is read from the full histogram. If the sample had mispredicted
   it, a second pass over the same blocks (the same GEMM calls, so the same fp32 values)
   collects that bin's low-bit histogram.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fr_trainer.eval.resolution import is_resolvable, smallest_resolvable_far

DEFAULT_ALLPAIRS_BUDGET = 512 << 20  # bytes of score-block working set
ALLPAIRS_FARS: tuple[float, ...] = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
BYTES_PER_SCORE = 24  # scores fp32 + bins int32 + slot lookups int64 + masks, per block element
NUM_BINS = 1 << 16
TAIL_SAMPLE_COUNT = 200  # below this many expected sample impostors, a target is "tail"
CUT_SAMPLE_COUNT = 800  # the tail cut keeps about this many sample impostors' worth
MAX_SLOTS_PER_TARGET = 16
TAIL_CODE = -2
NEG_INF_BIN = (int(np.array([-np.inf], np.float32).view(np.int32)[0]) >> 16) + (1 << 15)


@dataclass
class _Lookup:
    """Per top-16-bit bin: slot index, TAIL_CODE or -1; `lowest_high` when all are positive."""

    codes: torch.Tensor
    lowest_high: int | None


# bins in increasing order of value: negative floats have their bit patterns reversed
_MONO_ORDER = np.concatenate([np.arange(NUM_BINS // 2 - 1, -1, -1), np.arange(NUM_BINS // 2, NUM_BINS)])
_MONO_RANK = np.empty(NUM_BINS, dtype=np.int64)
_MONO_RANK[_MONO_ORDER] = np.arange(NUM_BINS)


def block_size_for_budget(memory_budget: int, n: int) -> int:
    """Rows per square score block so that a block's working set fits `memory_budget`."""
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget} bytes")
    b = int(math.isqrt(memory_budget // BYTES_PER_SCORE))
    if b < 1:
        raise ValueError(f"memory_budget {memory_budget} bytes is too small; give at least {BYTES_PER_SCORE} bytes")
    return max(1, min(b, n))


def allowed_false_accepts(far: float, num_impostors: int) -> int:
    """The largest integer m with m / M <= far (float64), as `metrics.tar_at_far` counts."""
    if num_impostors <= 0:
        return 0
    m = int(math.floor(far * num_impostors))
    m = max(0, min(m, num_impostors))
    while m < num_impostors and (m + 1) / num_impostors <= far:
        m += 1
    while m > 0 and m / num_impostors > far:
        m -= 1
    return m


def float_from_bins(high: int, low: int) -> float:
    """The float32 whose bit pattern is (high - 32768) << 16 | low (the bins' encoding)."""
    bits = np.array([((high - NUM_BINS // 2) << 16) | low], dtype=np.int64).astype(np.uint32)
    return float(bits.view(np.float32)[0])


def _bins(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Top 16 bits of each float32, shifted to [0, 65536) (int32); -0.0 must be gone."""
    bits = values.view(torch.int32)
    high = torch.bitwise_right_shift(bits, 16, out=out) if out is not None else torch.bitwise_right_shift(bits, 16)
    return high.add_(NUM_BINS // 2)


@dataclass
class _Accumulator:
    """Histograms (and tail values) of one kind of pair: "impostor" or "genuine"."""

    device: torch.device
    num_slots: int
    cut: float | None
    high: torch.Tensor = field(init=False)
    low: torch.Tensor | None = field(init=False)
    tail: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.high = torch.zeros(NUM_BINS, dtype=torch.int64, device=self.device)
        self.low = (
            torch.zeros(self.num_slots * NUM_BINS, dtype=torch.int64, device=self.device) if self.num_slots else None
        )

    def add(self, values: torch.Tensor, lut: _Lookup | None, scratch: torch.Tensor | None) -> None:
        """Count a block of scores; -0.0 must already be +0.0, -inf entries are ignored."""
        values = values.reshape(-1)
        if values.numel() == 0:
            return
        bins = _bins(values, scratch[: values.numel()] if scratch is not None else None)
        self.high += torch.bincount(bins, minlength=NUM_BINS)
        if lut is None:
            return
        if lut.lowest_high is not None:  # every interesting bin is above this bit pattern
            hit = torch.nonzero(bins >= lut.lowest_high).reshape(-1)
        else:
            hit = torch.nonzero(torch.index_select(lut.codes, 0, bins) != -1).reshape(-1)
        if hit.numel() == 0:
            return
        code = torch.index_select(lut.codes, 0, torch.index_select(bins, 0, hit))
        picked = torch.index_select(values, 0, hit)
        if self.cut is not None:
            tail = torch.nonzero(code == TAIL_CODE).reshape(-1)
            if tail.numel():
                self.tail.append(torch.index_select(picked, 0, tail))
        if self.low is not None:
            # entries outside the slots land in one extra slot, dropped
            low = torch.bitwise_and(picked.view(torch.int32), 0xFFFF)
            index = torch.where(code >= 0, code * NUM_BINS + low, self.num_slots * NUM_BINS)
            counts = torch.bincount(index, minlength=(self.num_slots + 1) * NUM_BINS)
            self.low += counts[: self.num_slots * NUM_BINS]

    def finish(self) -> None:
        """Drop the -inf that masked pairs were filled with (no finite score has those bits)."""
        self.high[NEG_INF_BIN] = 0

    def tail_values(self) -> np.ndarray:
        if not self.tail:
            return np.zeros(0, dtype=np.float32)
        return torch.cat(self.tail).cpu().numpy()


@dataclass
class FarResult:
    """One FAR of an all-pairs evaluation (see the module doc for the semantics)."""

    far: float
    tar: float
    threshold: float  # accept when score > threshold
    achieved_far: float  # #impostors > threshold / M
    false_accepts_allowed: int  # m
    resolvable: bool  # far >= 1 / M


@dataclass
class AllPairsResult:
    """The result of `all_pairs_verification`."""

    results: dict[float, FarResult]
    num_impostors: int
    num_genuine: int
    smallest_resolvable_far: float
    passes: int  # GEMM passes over all blocks (1 when the sample predicted every bin)
    block_size: int
    sample_rows: int

    def tar_at_far(self) -> dict[float, float]:
        return {far: r.tar for far, r in self.results.items()}

    def to_json(self) -> dict:
        return {
            "tar_at_far": {str(f): r.tar for f, r in self.results.items()},
            "threshold": {str(f): r.threshold for f, r in self.results.items()},
            "achieved_far": {str(f): r.achieved_far for f, r in self.results.items()},
            "resolvable": {str(f): r.resolvable for f, r in self.results.items()},
            "num_impostors": self.num_impostors,
            "num_genuine": self.num_genuine,
            "smallest_resolvable_far": self.smallest_resolvable_far,
            "passes": self.passes,
        }


def _pair_counts(labels: np.ndarray) -> tuple[int, int]:
    n = labels.size
    _, sizes = np.unique(labels, return_counts=True)
    genuine = int((sizes.astype(np.int64) * (sizes - 1) // 2).sum())
    return n * (n - 1) // 2 - genuine, genuine


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of every run of equal labels in a sorted array."""
    if labels.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    edges = np.flatnonzero(np.diff(labels)) + 1
    return np.concatenate([[0], edges]), np.concatenate([edges, [labels.size]])


def _blocks(
    emb: torch.Tensor, labels: np.ndarray, block: int, canonical_zero: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(impostor scores, genuine scores or None) of every block of the upper triangle.

    Rows are sorted by label, so the genuine pairs of a block are rectangles (one per
    label run present on both sides); they are copied out, then set to -inf together
    with the diagonal and the lower triangle of diagonal blocks (which `finish` drops).
    Diagonal blocks (and, with `canonical_zero`, all blocks) have every -0.0 made +0.0 by
    the addition; otherwise a -0.0 would sit in bin 0 apart from +0.0, which the caller
    detects (`_has_negative_zero_bin`) and answers with a canonical pass. The same blocks, in
    the same order, with the same GEMM calls on every pass; the yielded tensor is
    reused by the next block.
    """
    n = emb.shape[0]
    starts, ends = _runs(labels)
    buffer = torch.empty((min(block, n), min(block, n)), device=emb.device)
    penalty = torch.full_like(buffer, -math.inf).tril_()  # 0 above the diagonal
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        rows = emb[i0:i1]
        for j0 in range(i0, n, block):
            j1 = min(n, j0 + block)
            out = buffer if (i1 - i0, j1 - j0) == tuple(buffer.shape) else None
            scores = torch.mm(rows, emb[j0:j1].T, out=out)
            if j0 == i0:
                scores.add_(penalty[: i1 - i0, : j1 - j0])
            elif canonical_zero:
                scores.add_(0.0)
            # label runs meeting both [i0, i1) and [j0, j1)
            first = np.searchsorted(ends, max(i0, j0), side="right")
            last = np.searchsorted(starts, min(i1, j1), side="left")
            genuine = []
            for r in range(first, last):
                a0, a1 = max(starts[r], i0), min(ends[r], i1)
                b0, b1 = max(starts[r], j0), min(ends[r], j1)
                if a1 <= a0 or b1 <= b0:
                    continue
                part = scores[a0 - i0 : a1 - i0, b0 - j0 : b1 - j0]
                if j0 == i0:
                    rr, cc = torch.triu_indices(a1 - a0, b1 - b0, offset=1, device=emb.device)
                    genuine.append(part[rr, cc])
                else:
                    genuine.append(part.reshape(-1).clone())
                part.fill_(-math.inf)
            yield scores, (torch.cat(genuine) if genuine else None)


def _sample_histogram(emb: torch.Tensor, labels: torch.Tensor, rows: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """Impostor top-16-bit histogram of the sampled rows against all rows (ordered pairs)."""
    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=emb.device)
    count = 0
    index = torch.from_numpy(rows).to(emb.device)
    for r0 in range(0, index.numel(), block):
        sel = index[r0 : r0 + block]
        for j0 in range(0, emb.shape[0], block):
            scores = torch.mm(emb[sel], emb[j0 : j0 + block].T)
            other = labels[sel][:, None] != labels[j0 : j0 + block][None, :]
            values = scores[other]
            values.add_(0.0)
            count += int(values.numel())
            hist += torch.bincount(_bins(values), minlength=NUM_BINS)
    return hist.cpu().numpy(), count


def _locate(mono_hist: np.ndarray, rank: float) -> int:
    """The monotone bin holding the `rank`-th largest value (1-based) of a histogram."""
    above = np.cumsum(mono_hist[::-1])[::-1]  # above[b] = count in bins >= b
    hits = np.flatnonzero(above >= rank)
    return int(hits[-1]) if hits.size else 0


@dataclass
class _Prediction:
    slots: list[int]  # monotone bin indices with a low-bit histogram
    cut: float | None  # keep every score >= cut
    cut_bin: int  # monotone bin of the cut (bins >= it are kept whole)


def _predict(sample_mono: np.ndarray, sample_count: int, total: int, needed: Sequence[int]) -> _Prediction:
    """Bins likely to hold each needed rank (1-based, among `total` impostors)."""
    if sample_count == 0 or not needed:
        return _Prediction([], None, NUM_BINS)
    scale = total / sample_count
    slots: set[int] = set()
    tail = False
    above = np.cumsum(sample_mono[::-1])[::-1]
    for rank in needed:
        expected = rank / scale
        if expected < TAIL_SAMPLE_COUNT:
            tail = True
            continue
        spread = 6.0 * math.sqrt(expected) + 0.02 * expected
        lo_rank, hi_rank = max(1.0, expected - spread), expected + spread
        # bins whose [above[b+1], above[b]] range meets [lo_rank, hi_rank]
        upper_b = _locate(sample_mono, lo_rank)
        lower_b = _locate(sample_mono, hi_rank)
        window = list(range(max(0, lower_b - 1), min(NUM_BINS - 1, upper_b + 1) + 1))
        if len(window) > MAX_SLOTS_PER_TARGET:
            centre = _locate(sample_mono, expected)
            half = MAX_SLOTS_PER_TARGET // 2
            window = list(range(max(0, centre - half), min(NUM_BINS, centre + half)))
        slots.update(window)
    cut = None
    cut_bin = NUM_BINS
    if tail:
        if above[0] <= CUT_SAMPLE_COUNT:
            cut_bin = 0
        else:
            cut_bin = int(np.flatnonzero(above >= CUT_SAMPLE_COUNT)[-1])
        cut = _lowest_value_of_bin(cut_bin)
    return _Prediction(sorted(b for b in slots if b < cut_bin), cut, cut_bin)


def _lowest_value_of_bin(mono_bin: int) -> float:
    """The smallest float32 of a monotone bin (-inf for bin 0, which holds -NaN and -inf)."""
    if mono_bin <= 0:
        return -math.inf
    high = int(_MONO_ORDER[mono_bin])
    # negative bins: the largest low bits are the most negative
    return float_from_bins(high, 0xFFFF if high < NUM_BINS // 2 else 0)


def _low_order(high: int) -> np.ndarray:
    """Low-bit values of a bin in increasing order of float value."""
    return np.arange(NUM_BINS - 1, -1, -1) if high < NUM_BINS // 2 else np.arange(NUM_BINS)


def _scan(
    emb: torch.Tensor,
    labels: np.ndarray,
    block: int,
    pred: _Prediction,
    progress: bool | str,
    total_blocks: int,
    canonical_zero: bool = False,
) -> tuple[_Accumulator, _Accumulator, list[int]]:
    device = emb.device
    lookup = None
    if pred.slots or pred.cut is not None:
        codes = torch.full((NUM_BINS,), -1, dtype=torch.int32)
        marked = list(pred.slots)
        if pred.cut is not None:
            codes[torch.from_numpy(_MONO_ORDER[pred.cut_bin :])] = TAIL_CODE
            marked.append(pred.cut_bin)
        if pred.slots:
            codes[torch.from_numpy(_MONO_ORDER[pred.slots])] = torch.arange(len(pred.slots), dtype=torch.int32)
        codes[NEG_INF_BIN] = -1
        lowest = int(_MONO_ORDER[min(marked)])
        # in the positive half, bit order is value order, so one comparison finds the hits
        positive = min(marked) >= NUM_BINS // 2 and (pred.cut is None or pred.cut_bin >= NUM_BINS // 2)
        lookup = _Lookup(codes.to(device), lowest if positive else None)
    imp = _Accumulator(device, len(pred.slots), pred.cut)
    gen = _Accumulator(device, len(pred.slots), pred.cut)
    scratch = torch.empty(block * block, dtype=torch.int32, device=device)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_blocks, unit="block", desc=progress if isinstance(progress, str) else "all pairs")
    for impostors, genuines in _blocks(emb, labels, block, canonical_zero):
        imp.add(impostors, lookup, scratch)
        if genuines is not None:
            gen.add(genuines, lookup, scratch)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    imp.finish()
    gen.finish()
    return imp, gen, pred.slots


def _has_negative_zero_bin(imp: _Accumulator, gen: _Accumulator) -> bool:
    """Bin 0 holds -0.0 and negative denormals only (bit patterns 0x8000xxxx)."""
    return bool(imp.high[0] > 0) or bool(gen.high[0] > 0)


def all_pairs_verification(
    embeddings,
    labels,
    fars: Iterable[float] = ALLPAIRS_FARS,
    *,
    device: str | torch.device = "cpu",
    memory_budget: int = DEFAULT_ALLPAIRS_BUDGET,
    normalize: bool = True,
    sample_fraction: float = 0.005,
    sample_rows: int | None = None,
    seed: int = 0,
    progress: bool | str = False,
) -> AllPairsResult:
    """TAR, threshold and achieved FAR at each FAR over every pair (see the module doc).

    Args:
        embeddings: [N, D] (tensor or array); labels: [N] integer identities.
        fars: target false-accept rates.
        device: where the GEMMs and histograms run ("cpu", "cuda", ...).
        memory_budget: bytes for one score block's working set (`block_size_for_budget`).
        normalize: L2-normalise the rows (cosine scores); False scores raw inner products.
        sample_fraction / sample_rows: rows sampled to predict the threshold bins.
        seed: the sample's seed.
    """
    fars = [float(f) for f in fars]
    for far in fars:
        if not 0.0 <= far <= 1.0:
            raise ValueError(f"FAR {far} is outside [0, 1]; give FARs like 1e-6")
    device = torch.device(device)
    labels = np.asarray(labels).reshape(-1)
    if getattr(embeddings, "ndim", None) != 2 or embeddings.shape[0] != labels.size:
        raise ValueError(
            f"expected embeddings [N, D] and labels [N]; got {tuple(getattr(embeddings, 'shape', ()))} "
            f"and {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (identity ids), got dtype {labels.dtype}")
    emb = torch.as_tensor(
        np.asarray(embeddings, dtype=np.float32) if not isinstance(embeddings, torch.Tensor) else embeddings.float()
    )
    if not bool(torch.isfinite(emb).all()):
        raise ValueError("embeddings contain NaN or inf; check the model's outputs")
    order = np.argsort(labels, kind="stable")
    emb = emb[torch.from_numpy(order)].to(device)
    if normalize:
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    lab = torch.from_numpy(labels[order].astype(np.int64)).to(device)
    n = labels.size
    num_imp, num_gen = _pair_counts(labels)
    block = block_size_for_budget(memory_budget, n)
    nb = (n + block - 1) // block
    total_blocks = nb * (nb + 1) // 2

    needed = sorted(
        {allowed_false_accepts(f, num_imp) + 1 for f in fars if allowed_false_accepts(f, num_imp) < num_imp}
    )
    rows = sample_rows if sample_rows is not None else max(1, int(math.ceil(sample_fraction * n)))
    rows = min(max(rows, 0), n)
    picked = np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False)) if rows else np.zeros(0, int)
    sample_hist, sample_count = _sample_histogram(emb, lab, picked, block) if rows else (np.zeros(NUM_BINS), 0)
    pred = _predict(sample_hist[_MONO_ORDER], sample_count, num_imp, needed)
    sorted_labels = labels[order]
    imp, gen, slots = _scan(emb, sorted_labels, block, pred, progress, total_blocks)
    passes = 1
    if _has_negative_zero_bin(imp, gen):
        # some score was -0.0 (or a negative denormal): recount with zeros made canonical
        imp, gen, slots = _scan(emb, sorted_labels, block, pred, progress, total_blocks, canonical_zero=True)
        passes = 2

    imp_mono = imp.high.cpu().numpy()[_MONO_ORDER]
    gen_mono = gen.high.cpu().numpy()[_MONO_ORDER]
    target_bin = {rank: _locate(imp_mono, rank) for rank in needed}
    missing = sorted({b for rank, b in target_bin.items() if b not in slots and b < pred.cut_bin})
    low_imp = (
        {b: imp.low[i * NUM_BINS : (i + 1) * NUM_BINS].cpu().numpy() for i, b in enumerate(slots)} if slots else {}
    )
    low_gen = (
        {b: gen.low[i * NUM_BINS : (i + 1) * NUM_BINS].cpu().numpy() for i, b in enumerate(slots)} if slots else {}
    )
    if missing:
        # the sample mispredicted: collect those bins' low bits with the same blocks again
        imp2, gen2, _ = _scan(emb, sorted_labels, block, _Prediction(missing, None, NUM_BINS), progress, total_blocks)
        for i, b in enumerate(missing):
            low_imp[b] = imp2.low[i * NUM_BINS : (i + 1) * NUM_BINS].cpu().numpy()
            low_gen[b] = gen2.low[i * NUM_BINS : (i + 1) * NUM_BINS].cpu().numpy()
        passes += 1
    tail_imp = np.sort(imp.tail_values())[::-1] if pred.cut is not None else None
    tail_gen = gen.tail_values() if pred.cut is not None else None
    imp_above = np.concatenate([np.cumsum(imp_mono[::-1])[::-1][1:], [0]])  # count in bins > b
    gen_above = np.concatenate([np.cumsum(gen_mono[::-1])[::-1][1:], [0]])

    results: dict[float, FarResult] = {}
    resolvable_far = smallest_resolvable_far(num_imp)
    for far in fars:
        m = allowed_false_accepts(far, num_imp)
        resolvable = is_resolvable(far, num_imp)
        if num_imp == 0 or num_gen == 0:
            results[far] = FarResult(far, float("nan"), float("nan"), float("nan"), m, resolvable)
            continue
        if m >= num_imp:
            results[far] = FarResult(far, 1.0, -math.inf, 1.0, m, resolvable)
            continue
        rank = m + 1
        b = target_bin[rank]
        if b >= pred.cut_bin:
            threshold = float(tail_imp[rank - 1])
            false_acc = int((tail_imp > threshold).sum())
            true_acc = int((tail_gen > threshold).sum())
        else:
            high = int(_MONO_ORDER[b])
            order_low = _low_order(high)
            lows = low_imp[b][order_low]
            above_in_bin = np.cumsum(lows[::-1])[::-1]  # count with low rank >= j within the bin
            need = rank - int(imp_above[b])
            j = int(np.flatnonzero(above_in_bin >= need)[-1])
            threshold = float_from_bins(high, int(order_low[j]))
            false_acc = int(imp_above[b]) + int(lows[j + 1 :].sum())
            true_acc = int(gen_above[b]) + int(low_gen[b][order_low][j + 1 :].sum())
        results[far] = FarResult(far, true_acc / num_gen, threshold, false_acc / num_imp, m, resolvable)
    return AllPairsResult(results, num_imp, num_gen, resolvable_far, passes, block, rows)


def all_pairs_tar_at_far(embeddings, labels, fars: Iterable[float] = ALLPAIRS_FARS, **kwargs) -> dict[float, float]:
    """{far: TAR} over every pair of a labelled set (see `all_pairs_verification`)."""
    return all_pairs_verification(embeddings, labels, fars, **kwargs).tar_at_far()
