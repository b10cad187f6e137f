"""The planner as a pure function: component formulas, GPUs needed, collectives, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from fr_trainer.plan import gpus_needed, parse_bytes, parse_count, plan_head
from fr_trainer.plan.cli import main
from fr_trainer.train.grads import SQUARE_SUM_BLOCK


def test_dense_sgd_components_by_hand():
    p = plan_head(1_000_001, embedding_size=512, world_size=8, batch_per_rank=128)
    local = math.ceil(1_000_001 / 8)  # rank 0 owns the remainder
    assert p.classes_per_rank == p.classes_used == local
    assert p.weights == p.optimizer_state == p.weight_grad == local * 512 * 4
    assert p.logits == 1024 * local * 4  # one [G, C_local] fp32 buffer
    assert p.optimizer_temp == 0  # dense SGD updates weights and momentum in place
    assert p.clip_temp == 0
    assert p.peak == p.weights + p.optimizer_state + max(p.forward_backward, p.optimizer_step)


def test_logits_per_gpu_do_not_shrink_with_more_gpus():
    small = plan_head(10_000_000, world_size=16)
    large = plan_head(10_000_000, world_size=256)
    assert small.logits == pytest.approx(large.logits, rel=1e-4)  # B * classes * 4 either way
    assert large.weights < small.weights / 15


def test_sampling_adamw_chunking_and_clipping_change_the_right_parts():
    dense = plan_head(4_000_000, world_size=8)
    sampled = plan_head(4_000_000, world_size=8, sample_rate=0.1)
    assert sampled.classes_used == math.ceil(0.1 * dense.classes_per_rank)
    assert sampled.weights == dense.weights and sampled.logits == pytest.approx(dense.logits / 10, rel=1e-3)
    adamw = plan_head(4_000_000, world_size=8, optimizer="adamw")
    assert adamw.optimizer_state == 2 * dense.weights + dense.classes_per_rank * 8
    chunked = plan_head(4_000_000, world_size=8, chunk_size=8192)
    assert chunked.logits == 2 * 1024 * 8192 * 4
    clipped = plan_head(4_000_000, world_size=8, clip_grad=True)
    assert clipped.clip_temp == 8 * SQUARE_SUM_BLOCK  # one float64 block at a time
    assert clipped.peak == dense.peak  # clipping no longer sets the peak
    plain_sgd = plan_head(4_000_000, world_size=8, momentum=False, weight_decay=False)
    assert plain_sgd.optimizer_state == plain_sgd.optimizer_temp == 0


def test_sampling_keeps_every_positive_in_the_worst_case():
    p = plan_head(100_000, world_size=2, batch_per_rank=4096, sample_rate=0.01)
    assert p.classes_used == 8192  # G positives > ceil(0.01 * 50_000)


def test_collectives_sizes():
    p = plan_head(1_000_000, embedding_size=256, world_size=4, batch_per_rank=64)
    by_name = {c.name: c for c in p.collectives}
    assert by_name["embeddings"].payload == 256 * 256 * 4
    assert by_name["embeddings"].traffic == 256 * 256 * 4 * 3 // 4
    assert by_name["embedding gradient"].op == "reduce_scatter"
    assert by_name["sum-exp + target logit"].traffic == 2 * (2 * 256 * 4) * 3 // 4
    assert "target cosines" not in by_name
    sv = plan_head(1_000_000, embedding_size=256, world_size=4, batch_per_rank=64, margin="sv_arcface")
    assert len(sv.collectives) == len(p.collectives) + 1
    assert plan_head(1_000_000, world_size=1).collectives == ()


def test_gpus_needed_is_the_smallest_fitting_world_size():
    budget = 80 * 10**9
    plan = gpus_needed(30_000_000, budget, embedding_size=512)
    assert plan.peak <= budget
    assert plan_head(30_000_000, world_size=plan.world_size - 1).peak > budget
    sampled = gpus_needed(30_000_000, budget, sample_rate=0.1)
    assert sampled.world_size < plan.world_size


def test_gpus_needed_names_the_fix_when_nothing_fits():
    with pytest.raises(ValueError, match="chunk"):
        gpus_needed(100_000_000, 40 * 10**9)  # logits alone: 128 * 1e8 * 4 = 51 GB
    with pytest.raises(ValueError, match="reserve"):
        gpus_needed(1000, -5)


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="bf16"):
        plan_head(1000, dtype="bf16")
    with pytest.raises(ValueError, match="world_size=2000"):
        plan_head(1000, world_size=2000)
    with pytest.raises(ValueError, match="unknown margin 'arcfce'"):
        plan_head(1000, world_size=2, margin="arcfce")
    with pytest.raises(ValueError, match="1.5"):
        plan_head(1000, world_size=2, sample_rate=1.5)


def test_parse_sizes():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512 MB") == 512 * 10**6
    assert parse_count("10M") == 10**7 and parse_count("93431") == 93431 and parse_count("1e6") == 10**6
    with pytest.raises(ValueError, match="80XB"):
        parse_bytes("80XB")
    with pytest.raises(ValueError, match="ten"):
        parse_count("ten")


def test_cli_answers_how_many_gpus(capsys):
    assert main(["--classes", "10M", "30M", "--gpu-memory", "80GB", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert [p["classes"] for p in plans] == [10**7, 3 * 10**7]
    for p in plans:
        assert p["peak"] <= 80 * 10**9
        assert p["world_size"] == 1 or plan_head(p["classes"], world_size=p["world_size"] - 1).peak > 80 * 10**9
    assert main(["--classes", "10M", "--gpu-memory", "80GB", "--reserve", "20GB"]) == 0
    table = capsys.readouterr().out
    assert "60.0 GB for the head" in table and "embedding gradient" in table


def test_cli_rejects_impossible_budget(capsys):
    assert main(["--classes", "100M", "--gpu-memory", "40GB"]) == 2
    assert "--chunk-size" in capsys.readouterr().err


def test_the_bf16_plan_halves_the_logits_and_adds_the_16_bit_centres():
    fp32 = plan_head(1_000_000, world_size=8)
    bf16 = plan_head(1_000_000, world_size=8, compute_dtype="bf16")
    assert bf16.logits * 2 == fp32.logits
    assert bf16.workspace >= bf16.classes_used * bf16.embedding_size * 2  # the bf16 copy of the centres
    assert bf16.weights == fp32.weights and bf16.weight_grad == fp32.weight_grad  # fp32 master and gradient
    with pytest.raises(ValueError, match="'fp16' is not modelled"):
        plan_head(1000, world_size=2, compute_dtype="fp16")
    with pytest.raises(ValueError, match="margin='softmax'"):
        plan_head(1000, world_size=2, margin="softmax", compute_dtype="bf16")
    assert main(["--classes", "1M", "--world-size", "8", "--compute-dtype", "bf16"]) == 0
