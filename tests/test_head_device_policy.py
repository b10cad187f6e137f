"""The head's device policy and sync budget, on the CPU with the CUDA policy forced.

- Under the CUDA policy the number of aten ops of one forward + backward does not depend
  on the number of classes (2,000 vs 100,000, small G), for fp32 and bf16, chunked (the
  same number of chunks) or not, sampled or not; under the CPU policy it grows (its
  cache-sized row blocks and 16-bit GEMM column chunks), so the count can tell.
- Both policies give the same loss and gradients (the sub-centre head's too).
- One step syncs with the host at most once (the input check's one read) unsampled, and
  sampled when the sample is at least the batch (a sample smaller than the batch adds one),
  for every registered margin.
- The forcing knobs: PartialFC(block_policy=...), forced_policy(...), $FR_HEAD_BLOCK_POLICY.
- The bf16 forward of a linear margin under the CUDA policy makes six passes over its
  [G, C] buffer besides the GEMM on a GPU (each a read and maybe a write of it all; the
  CPU adds the widening as a seventh).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fr_trainer.heads import PartialFC
from fr_trainer.heads.device_policy import CPU, CUDA, forced_policy, policy_for
from fr_trainer.heads.step_count import counting
from fr_trainer.margins import list_margins

DIM, BATCH, SEED = 16, 4, 3
SMALL, LARGE = 2_000, 100_000
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
CASES = [(dtype, chunked, rate) for dtype in DTYPES for chunked in (False, True) for rate in (1.0, 0.5)]


@functools.cache  # deterministic: tests that need the same step share it
def _step(classes: int, dtype: str, chunked: bool, rate: float, policy: str, margin: str = "arcface"):
    """(ops, syncs, loss, grad x, grad W dense) of one forward + backward."""
    chunk = classes // 3 + 1 if chunked else None  # three chunks at every class count
    head = PartialFC(classes, DIM, margin=margin, chunk_size=chunk, sample_rate=rate, seed=SEED,
                     compute_dtype=DTYPES[dtype], block_policy=policy)
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH, DIM, generator=generator).requires_grad_()
    y = torch.randint(0, classes, (BATCH,), generator=generator)
    with counting() as counter:
        loss = head(x, y)
        loss.backward()
    grad_w = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    return counter.ops, counter.syncs, loss.detach(), x.grad, grad_w


@pytest.mark.parametrize(("dtype", "chunked", "rate"), CASES)
def test_cuda_policy_op_count_does_not_grow_with_classes(dtype, chunked, rate):
    small = _step(SMALL, dtype, chunked, rate, "cuda")[0]
    large = _step(LARGE, dtype, chunked, rate, "cuda")[0]
    assert small == large, (small, large)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cpu_policy_op_count_grows_with_classes(dtype):
    small = _step(SMALL, dtype, False, 1.0, "cpu")[0]
    large = _step(LARGE, dtype, False, 1.0, "cpu")[0]
    assert large > small, (small, large)


def _assert_same_results(cpu: tuple, cuda: tuple, dtype: str) -> None:
    if dtype == "fp32":
        for a, b in zip(cpu[2:], cuda[2:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        return
    # bf16: one 16-bit GEMM over all classes vs column chunks summed in fp32 round
    # differently (both are ~1e-2 from the fp64 head); the loss's terms are fp32 either way
    torch.testing.assert_close(cpu[2], cuda[2], rtol=1e-4, atol=0)
    for a, b in zip(cpu[3:], cuda[3:]):
        assert float((a - b).norm() / b.norm()) <= 1e-2


@pytest.mark.parametrize(("dtype", "chunked", "rate"), CASES)
def test_cuda_policy_equals_cpu_policy(dtype, chunked, rate):
    _assert_same_results(_step(LARGE, dtype, chunked, rate, "cpu"), _step(LARGE, dtype, chunked, rate, "cuda"), dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cuda_policy_equals_cpu_policy_for_a_nonlinear_margin(dtype):
    cpu, cuda = (_step(LARGE, dtype, False, 1.0, policy, "sv_arcface") for policy in ("cpu", "cuda"))
    _assert_same_results(cpu, cuda, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_sub_centre_head_under_the_cuda_policy_is_flat_in_classes_and_equals_the_cpu_policy(dtype):
    small = _step(SMALL, dtype, False, 1.0, "cuda", "subcenter_arcface")[0]
    cuda = _step(LARGE, dtype, False, 1.0, "cuda", "subcenter_arcface")
    assert small == cuda[0], (small, cuda[0])
    _assert_same_results(_step(LARGE, dtype, False, 1.0, "cpu", "subcenter_arcface"), cuda, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("margin", ["arcface", "sv_arcface", "softmax"])
def test_unsampled_step_syncs_at_most_once(dtype, margin):
    syncs = _step(LARGE, dtype, False, 1.0, "cuda", margin)[1]
    assert sum(syncs.values()) <= 1, dict(syncs)
    if margin == "arcface":
        syncs = _step(LARGE, dtype, True, 1.0, "cuda", margin)[1]
        assert sum(syncs.values()) <= 1, dict(syncs)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sampled_step_sync_bound(dtype):
    # a sample of 50,000 centres >= the batch: the sample's size is known, no extra sync
    assert sum(_step(LARGE, dtype, False, 0.5, "cuda")[1].values()) <= 1
    # a sample smaller than the batch (1 centre): its size needs the positives' count
    tiny = _step(SMALL, dtype, False, 1e-4, "cuda")[1]
    assert sum(tiny.values()) <= 2, dict(tiny)


def test_the_policy_can_be_forced(monkeypatch):
    assert policy_for("cpu") is CPU and policy_for("cuda") is CUDA
    with forced_policy("cuda"):
        assert policy_for("cpu") is CUDA
        assert policy_for("cpu", "cpu") is CPU  # the head's own argument wins
    monkeypatch.setenv("FR_HEAD_BLOCK_POLICY", "cuda")
    assert policy_for("cpu") is CUDA
    monkeypatch.setenv("FR_HEAD_BLOCK_POLICY", "tpu")
    with pytest.raises(ValueError, match="block policy 'tpu' is not one of cpu, cuda"):
        policy_for("cpu")


def test_out_of_range_label_single_process_names_the_value():
    head = PartialFC(SMALL, DIM, seed=SEED)
    labels = torch.tensor([0, SMALL + 7, 1, -2])
    with pytest.raises(ValueError, match=rf"2 label\(s\) outside \[0, {SMALL}\): \[{SMALL + 7}, -2\]; "
                                         "check the dataset's labels or num_classes"):
        head(torch.randn(4, DIM), labels)


@pytest.mark.parametrize("margin", list_margins())
def test_every_margin_step_syncs_at_most_once(margin):
    syncs = _step(SMALL, "fp32", False, 1.0, "cuda", margin)[1]
    assert sum(syncs.values()) <= 1, dict(syncs)


class _BufferPasses(TorchDispatchMode):
    """The aten ops (not views, not the GEMM, not the targets' gathers and puts, which
    touch G entries) that take or give a tensor of at least half the [rows, cols] buffer."""

    SKIP = {"view", "slice", "select", "as_strided", "detach", "t", "alias", "unsqueeze", "expand", "empty",
            "new_empty", "mm", "index", "index_put_", "_index_put_impl_"}

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.rows, self.cols, self.names = rows, cols, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        tensors = [t for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, torch.Tensor)]
        if name not in self.SKIP and any(t.dim() == 2 and t.shape[0] >= self.rows // 2
                                         and t.shape[1] >= self.cols // 2 for t in tensors):
            self.names.append(name)
        return out


@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_the_bf16_forward_under_the_cuda_policy_passes_over_its_buffer_seven_times_on_a_cpu(margin):
    rows, cols = 64, 4000
    head = PartialFC(cols, DIM, margin=margin, seed=SEED, compute_dtype=torch.bfloat16, block_policy="cuda")
    x, y = torch.randn(rows, DIM), torch.randint(0, cols, (rows,))
    head(x, y)  # (lazy state)
    with _BufferPasses(rows, cols) as watch:
        head(x, y)
    # the row maxima on the bf16 cosines; the widening (on CUDA inside the add); one scaling,
    # shifting add; the exp floor; exp; the row sums; the exponentials back into the bf16 buffer
    assert watch.names == ["amax", "copy_", "add", "clamp_min_", "exp_", "sum", "copy_"], watch.names


def test_the_one_kernel_widening_gives_the_numbers_of_the_two_pass_one():
    from fr_trainer.heads.margin_softmax import _shifted_linear_logits

    generator = torch.Generator().manual_seed(SEED)
    cos = (torch.rand(8, 50, generator=generator) * 2 - 1).to(torch.bfloat16)
    inside = torch.tensor([True, False] * 4)
    cols = torch.randint(0, 50, (8,), generator=generator)
    z_t = torch.randn(8, generator=generator) * 30  # some targets above s max cos: the bound is raised
    results = [_shifted_linear_logits(cos, torch.empty(8, 50), 32.0, inside, cols, z_t, None, mixed)
               for mixed in (True, False)]
    for a, b in zip(*results):
        assert torch.equal(a, b)
    z, reference = results[0]
    exact = cos.float() * 32.0
    exact[inside, cols[inside]] = z_t[inside]
    assert torch.all(reference >= exact.amax(1))  # a valid shift: nothing above 0 after it
    torch.testing.assert_close(z, exact - reference[:, None])

