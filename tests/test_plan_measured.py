"""The planner's head-memory figure against the measured peak of real training steps.

Two gloo ranks on CPU run PartialFC + its optimizer (`fr_trainer.plan.measure`); torch's
profiler records every allocation of the CPU allocator, so the measured peak is the bytes
of the head's own tensors. The plan must lie within 10% of it: the CPU plan (backend gloo)
against the CPU head, and the GPU plan (backend nccl) against the head run under the CUDA
block policy (whole-buffer passes, no buffer pool: what it allocates on a GPU).
"""

from __future__ import annotations

import pytest

from fr_trainer.plan import plan_head
from fr_trainer.plan.measure import Case, measure_peaks

LOGITS_BOUND = {"classes": 20_000, "embedding_size": 64, "batch_per_rank": 256}  # logits dominate
WEIGHT_BOUND = {"classes": 20_000, "embedding_size": 128, "batch_per_rank": 32}  # optimizer dominates
CASES = [
    Case(**LOGITS_BOUND),
    Case(**LOGITS_BOUND, sample_rate=0.25),
    Case(**LOGITS_BOUND, chunk_size=2048),
    Case(**LOGITS_BOUND, margin="curricularface"),
    Case(**WEIGHT_BOUND),
    Case(**WEIGHT_BOUND, optimizer="adamw", sample_rate=0.1),
    Case(**WEIGHT_BOUND, clip_grad=True),
    Case(**WEIGHT_BOUND, chunk_size=2500, fused_update=True),  # the gradient: one chunk's rows
    Case(**WEIGHT_BOUND, optimizer="adamw", chunk_size=2500, fused_update=True),
    Case(**WEIGHT_BOUND, fused_update=True),  # unchunked: pieces of 16,384 classes
]


# the GPU policy's whole-buffer scratch: a linear margin, two non-linear ones (one, two
# formula temporaries), chunked, sampled, and one bound by its optimizer
GPU_CASES = [
    Case(**LOGITS_BOUND),
    Case(**LOGITS_BOUND, margin="sv_arcface"),
    Case(**LOGITS_BOUND, margin="curricularface"),
    Case(**LOGITS_BOUND, margin="curricularface", chunk_size=2048),
    Case(**LOGITS_BOUND, margin="sv_arcface", sample_rate=0.25),
    Case(**WEIGHT_BOUND, optimizer="adamw", sample_rate=0.1),
]


# the bf16 head (bf16 GEMMs on fp32 centres): logits-bound, a non-linear margin, chunked,
# and bound by its 16-bit centre copy and backward chunk temporaries (D 512 > G)
BF16_CASES = [
    Case(**LOGITS_BOUND, compute_dtype="bf16"),
    Case(**LOGITS_BOUND, margin="sv_arcface", compute_dtype="bf16"),
    Case(**LOGITS_BOUND, chunk_size=2048, compute_dtype="bf16"),
    Case(classes=20_000, embedding_size=512, batch_per_rank=64, compute_dtype="bf16"),
    Case(classes=20_000, embedding_size=512, batch_per_rank=64, compute_dtype="bf16", fused_update=True),
    Case(**LOGITS_BOUND, chunk_size=2048, compute_dtype="bf16", fused_update=True),
]


@pytest.fixture(scope="module")
def measured_bf16() -> dict[str, list[int]]:
    return {"gloo": measure_peaks(BF16_CASES, world_size=2),
            "nccl": measure_peaks(BF16_CASES, world_size=2, policy="cuda")}


@pytest.fixture(scope="module")
def measured() -> list[int]:
    return measure_peaks(CASES, world_size=2)


@pytest.fixture(scope="module")
def measured_gpu_policy() -> list[int]:
    return measure_peaks(GPU_CASES, world_size=2, policy="cuda")


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c.margin}-{c.optimizer}-sr{c.sample_rate}-chunk{c.chunk_size}-clip{c.clip_grad}"
                              f"-B{c.batch_per_rank}{'-fused' if c.fused_update else ''}" for c in CASES])
def test_plan_within_10_percent_of_measured_peak(measured, index):
    case = CASES[index]
    plan = plan_head(world_size=2, backend="gloo", **case.plan_kwargs())
    assert measured[index] > plan.weights  # the measurement saw the head
    assert plan.peak == pytest.approx(measured[index], rel=0.10), (
        f"{case}: planned {plan.peak / 2**20:.2f} MB ({plan.peak_phase}), "
        f"measured {measured[index] / 2**20:.2f} MB")


def test_measured_phases_differ_as_planned(measured):
    """The figures move the way the plan says: sampling and chunking shrink the peak, and so
    does the fused update where the optimizer step bounds it (no whole centre gradient)."""
    dense, sampled, chunked = measured[0], measured[1], measured[2]
    assert sampled < 0.6 * dense and chunked < 0.7 * dense
    weight_bound, fused = measured[4], measured[7]
    assert fused < 0.8 * weight_bound, (weight_bound, fused)


@pytest.mark.parametrize("index", range(len(GPU_CASES)),
                         ids=[f"{c.margin}-{c.optimizer}-sr{c.sample_rate}-chunk{c.chunk_size}-B{c.batch_per_rank}"
                              for c in GPU_CASES])
def test_gpu_plan_within_10_percent_of_the_cuda_policy_peak(measured_gpu_policy, index):
    case = GPU_CASES[index]
    plan = plan_head(world_size=2, backend="nccl", **case.plan_kwargs())
    assert plan.peak == pytest.approx(measured_gpu_policy[index], rel=0.10), (
        f"{case}: planned {plan.peak / 2**20:.2f} MB ({plan.peak_phase}), "
        f"measured under the CUDA policy {measured_gpu_policy[index] / 2**20:.2f} MB")


def test_the_cli_measures_a_gpu_plan_under_the_cuda_policy(capsys):
    from fr_trainer.plan.cli import main

    assert main(["--classes", "20000", "--dim", "64", "--batch", "256", "--world-size", "2", "--measure",
                 "--margin", "sv_arcface"]) == 0
    out = capsys.readouterr().out
    assert "under the CUDA block policy" in out
    ratio = float(out.rsplit("planned/measured", 1)[1].split()[0])
    assert ratio == pytest.approx(1.0, abs=0.10)


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
@pytest.mark.parametrize("index", range(len(BF16_CASES)),
                         ids=[f"{c.margin}-chunk{c.chunk_size}-D{c.embedding_size}{'-fused' if c.fused_update else ''}"
                              for c in BF16_CASES])
def test_bf16_plan_within_10_percent_of_measured_peak(measured_bf16, index, backend):
    """gloo: the CPU head; nccl: the head under the CUDA block policy (a GPU's allocations)."""
    case = BF16_CASES[index]
    plan = plan_head(world_size=2, backend=backend, **case.plan_kwargs())
    assert plan.peak == pytest.approx(measured_bf16[backend][index], rel=0.10), (
        f"{case} {backend}: planned {plan.peak / 2**20:.2f} MB ({plan.peak_phase}), "
        f"measured {measured_bf16[backend][index] / 2**20:.2f} MB")
