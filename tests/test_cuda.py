"""What only a GPU can show, run by scripts/gpu_check.sh (skipped without CUDA): the head on
CUDA in fp32, bf16 and fp16 against the fp64 CPU reference (the sub-centre head too), the
sparse update on CUDA, NCCL on one rank, an optimizer state resumed from a CPU
checkpoint stepping on CUDA, the step tail's multi-tensor kernels (clipping, SGD, AdamW)
against one-tensor loops, and a trainer step (bf16, fused head update, deferred host reads)
that reads the host once.

FR_CUDA_TESTS_DEVICE=cpu (with FR_HEAD_BLOCK_POLICY=cuda) runs the same tests on the CPU as a
dry run of this file's code, at smaller class counts (tests/test_cuda_dry_run.py does that in
every suite, so that a GPU, when one is lent, does not spend its minutes on a broken test)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from head_reference import reference_loss

from fr_trainer.heads import PartialFC
from fr_trainer.train.optim import SGD, AdamW

DEVICE = os.environ.get("FR_CUDA_TESTS_DEVICE", "cuda")  # "cpu": the dry run
ON_GPU = DEVICE == "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
STEP_CLASSES = (100_000, 1_000_000) if ON_GPU else (10_000, 40_000)  # the op-count test's two class counts

CLASSES, DIM, BATCH = 5003, 128, 64
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=generator) * 0.01
    y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    x = 0.6 * F.normalize(centres[y], dim=1) + 0.8 * F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=1)
    return x, y, centres


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double().cpu(), b.flatten().double().cpu(), dim=0))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("margin", "chunk"), [("arcface", None), ("cosface", 1000), ("sv_arcface", None)])
def test_head_on_cuda_matches_the_fp64_cpu_reference(dtype, margin, chunk):
    x, y, centres = _batch()
    head = PartialFC(CLASSES, DIM, margin=margin, chunk_size=chunk, seed=0, device=DEVICE,
                     compute_dtype=DTYPES[dtype])
    if margin == "sv_arcface":
        from margin_reference_extra import extra_reference_loss

        _check_against_fp64(head, centres, x, y, dtype, lambda xr, wr: extra_reference_loss(margin, xr, wr, y)[0])
    else:
        _check_against_fp64(head, centres, x, y, dtype, lambda xr, wr: reference_loss(margin, xr, wr, y))


def _check_against_fp64(head, centres, x, y, dtype, reference_fn) -> None:
    """The CUDA head with `centres` on batch (x, y): loss within 1e-5 (fp32) or 5e-3 (16-bit)
    of the fp64 CPU `reference_fn(x, w)`, gradients at cosine >= 0.999."""
    with torch.no_grad():
        head.weight.copy_(centres)
    xc = x.to(DEVICE, copy=True).requires_grad_()
    loss = head(xc, y.to(DEVICE, copy=True))
    loss.backward()
    xr, wr = x.double().requires_grad_(), centres.double().requires_grad_()
    reference = reference_fn(xr, wr)
    reference.backward()
    tolerance = 1e-5 if dtype == "fp32" else 5e-3
    assert abs(float(loss.detach()) - float(reference)) <= tolerance * abs(float(reference))
    assert _cosine(xc.grad, xr.grad) >= 0.999 and _cosine(head.weight.grad, wr.grad) >= 0.999


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_sub_centre_head_on_cuda_matches_the_fp64_cpu_plain_path(dtype):
    from fr_trainer.heads.subcenter import subcenter_loss
    from fr_trainer.margins import create_margin

    generator = torch.Generator().manual_seed(1)
    k = 3
    centres = torch.randn(CLASSES, k, DIM, generator=generator) * 0.01
    y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    noise = torch.randn(BATCH, DIM, generator=generator)
    x = 0.6 * F.normalize(centres[y, 0], dim=1) + 0.8 * F.normalize(noise, dim=1)
    head = PartialFC(CLASSES, DIM, margin="subcenter_arcface", seed=0, device=DEVICE, compute_dtype=DTYPES[dtype])
    margin = create_margin("subcenter_arcface")
    _check_against_fp64(head, centres, x, y, dtype, lambda xr, wr: subcenter_loss(xr, wr, y, margin, None))


def test_sparse_update_on_cuda_touches_only_sampled_rows():
    x, y, _ = _batch(1)
    head = PartialFC(CLASSES, DIM, margin="cosface", sample_rate=0.1, seed=0, device=DEVICE)
    optimizer = SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = head.weight.detach().clone()
    head(x.to(DEVICE, copy=True), y.to(DEVICE, copy=True)).backward()
    assert head.weight.grad.is_sparse
    optimizer.step()
    moved = (head.weight.detach() != before).any(dim=1)
    used = torch.zeros(CLASSES, dtype=torch.bool, device=DEVICE)
    used[head.last_index] = True
    assert torch.equal(moved, used)


def test_nccl_on_one_rank_equals_the_single_process_head(tmp_path):
    import torch.distributed as dist

    x, y, _ = _batch(2)
    plain = PartialFC(CLASSES, DIM, seed=0, device=DEVICE)
    expected = plain(x.to(DEVICE, copy=True), y.to(DEVICE, copy=True))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    if ON_GPU:
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        grouped = PartialFC(CLASSES, DIM, seed=0, device=DEVICE, process_group=dist.group.WORLD)
        torch.testing.assert_close(grouped(x.to(DEVICE, copy=True), y.to(DEVICE, copy=True)), expected)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", [SGD, AdamW])
def test_optimizer_state_from_a_cpu_checkpoint_steps_on_cuda(kind):
    weight = torch.nn.Parameter(torch.randn(10, 4, device=DEVICE))
    optimizer = kind([weight], lr=0.1)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    saved = {"state": {k: {n: t.cpu() if torch.is_tensor(t) else t for n, t in v.items()}
                       for k, v in optimizer.state_dict()["state"].items()},
             "param_groups": optimizer.state_dict()["param_groups"]}
    resumed = kind([weight], lr=0.1)
    resumed.load_state_dict(saved)
    weight.grad = torch.randn_like(weight)
    resumed.step()  # a CPU `step` tensor would make this fail
    assert all(t.device.type == DEVICE for s in resumed.state.values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(("chunk", "rate"), [(None, 1.0), (None, 0.1)])
def test_cuda_op_count_does_not_grow_with_classes_and_a_step_syncs_at_most_once(dtype, chunk, rate):
    from fr_trainer.heads.step_count import count_step

    small, large = (count_step(classes, 128, 64, dtype, DEVICE, chunk, rate) for classes in STEP_CLASSES)
    assert small["ops"] == large["ops"], (small, large)
    for row in (small, large):
        assert row["syncs"] <= 1 and row["cuda_reported_syncs"] <= 1, row


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_multi_tensor_step_tail_on_the_device_equals_the_one_tensor_loop_on_the_cpu(kind):
    """Clipping and the optimizer step (`fr_trainer.train.foreach`: fused multi-tensor kernels
    on CUDA) against `fr-trainer bench tail`'s one-tensor references on float64 CPU copies."""
    from fr_trainer.train.bench_tail import ReferenceAdamW, ReferenceSGD, reference_clip
    from fr_trainer.train.grads import clip_global_norm

    generator = torch.Generator().manual_seed(3)
    shapes = [(64, 3, 3, 3), (64,), (), (512, 300), (2000, 600)]  # (the last over 2^20 elements)
    host = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64)) for s in shapes]
    device = [torch.nn.Parameter(p.detach().float().to(DEVICE, copy=True)) for p in host]
    if kind == "sgd":
        ours, ref = SGD(device, lr=0.1, momentum=0.9, weight_decay=5e-4), ReferenceSGD(host, 0.1, 0.9, 5e-4)
    else:
        ours, ref = AdamW(device, lr=1e-3, weight_decay=0.05), ReferenceAdamW(host, 1e-3, 0.05)
    for _ in range(3):
        for p, q in zip(host, device):
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            q.grad = p.grad.float().to(DEVICE, copy=True)
        norm = clip_global_norm(device, [], max_norm=5.0)
        torch.testing.assert_close(norm.cpu(), reference_clip(host, 5.0), rtol=1e-6, atol=0.0)
        ours.step()
        ref.step()
    for p, q in zip(host, device):
        torch.testing.assert_close(q.detach().cpu().double(), p.detach(), rtol=1e-5, atol=1e-6)


def test_a_trainer_step_on_the_device_with_deferred_reads_and_the_fused_update_reads_the_host_once(tmp_path):
    """The trainer as a GPU run uses it (bf16, the head's centres stepped in its backward,
    backbone-only clipping, `train.host_reads = "when_logging"`): a fit of 6 steps reads its
    losses twice (every 3 steps), and one step, after a warm-up and with its batches already
    loaded, reads the host once: the head's input report (also by CUDA's own count)."""
    import math

    from test_train_step_reads import _prefetched
    from test_train_support import config_dict, make_data

    from fr_trainer.distributed.env import DistributedEnv
    from fr_trainer.heads.step_count import counting
    from fr_trainer.train.config import config_from_dict
    from fr_trainer.train.trainer import Trainer

    cfg = config_dict(make_data(tmp_path / "data"), tmp_path / "runs",
                      model={"backbone": "demonet", "embedding_size": 16},
                      head={"chunk_size": 4, "fused_update": True},
                      optim={"clip_grad_norm": 5.0, "clip_scope": "backbone"},
                      train={"device": DEVICE, "precision": "bf16", "host_reads": "when_logging", "max_steps": 6},
                      log={"every_steps": 3})
    device = torch.device("cuda", 0) if ON_GPU else torch.device("cpu")
    trainer = Trainer(config_from_dict(cfg), DistributedEnv(0, 1, 0, None, device))
    assert trainer.head.updates_in_backward and trainer.head.weight.device.type == device.type
    before = trainer.head.weight.detach().clone()
    summary = trainer.fit()
    assert len(summary["losses"]) == 6 and all(math.isfinite(loss) for loss in summary["losses"])
    assert trainer.reads.reads == 2 and not torch.equal(trainer.head.weight.detach(), before)
    trainer.stream.next = _prefetched(trainer.stream.next)
    trainer.train_step()
    trainer.step += 1
    with counting() as counter:
        trainer.train_step()
    ours = {k: v for k, v in counter.syncs.items() if v and k != "cuda"}
    assert ours == {"tolist": 1}, counter.syncs
    assert counter.syncs["cuda"] <= 1, counter.syncs
