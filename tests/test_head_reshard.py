"""Resharding the head at scale: every new rank gets its own Partial-FC sampling stream, and
neither creating the centres nor resharding a checkpoint ever holds a whole shard in host
memory (at 10M classes per GPU a shard file is ~40 GB).

The sampling tests build the heads of several ranks in one process (the rank and world size
a head sees are patched; the head's collectives are not used); the memory test runs the
loads in a child process and bounds the growth of its peak resident set (VmHWM, reset after
the imports: `ru_maxrss` would carry over the forking test process's peak across exec)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_support import write_head_checkpoint

from fr_trainer.distributed.shard import ClassShard
from fr_trainer.heads import partial_fc
from fr_trainer.heads.sampling import sample_centres
from fr_trainer.train import checkpoint as ckpt

NUM_CLASSES, DIM, SEED, STEP = 40, 4, 11, 5
REPO = Path(__file__).resolve().parents[1]


def _head(monkeypatch, rank: int, world_size: int) -> partial_fc.PartialFC:
    monkeypatch.setattr(partial_fc, "rank_and_world_size", lambda group: (rank, world_size))
    return partial_fc.PartialFC(NUM_CLASSES, DIM, margin="softmax", sample_rate=0.5, seed=SEED)


def _draw(head: partial_fc.PartialFC) -> torch.Tensor:
    """The negatives of one sampled step with no positives (what `forward` draws)."""
    return sample_centres(torch.empty(0, dtype=torch.int64), head.shard.num_local, head.num_sample,
                          head._sampling_generator())


def _write_checkpoint(folder: Path, heads: list[partial_fc.PartialFC]) -> None:
    write_head_checkpoint(folder, heads, NUM_CLASSES, STEP)


def _resume(monkeypatch, folder: Path, world_size: int) -> list[partial_fc.PartialFC]:
    heads = []
    for rank in range(world_size):
        head = _head(monkeypatch, rank, world_size)
        rows = ckpt.load_shard_rows(folder, head.shard.start, head.shard.end)
        head.load_state_dict(rows["head"])  # as Trainer.load does
        heads.append(head)
    return heads


def test_resharded_ranks_get_distinct_deterministic_sampling_streams(monkeypatch, tmp_path):
    old = [_head(monkeypatch, rank, 2) for rank in range(2)]
    for head in old:  # a few sampled steps: the saved streams are mid-way
        for _ in range(STEP):
            _draw(head)
    folder = tmp_path / "step"
    _write_checkpoint(folder, old)
    # 2 -> 4: new ranks 0 and 1 each hold half of old shard 0 (and 2, 3 of old shard 1)
    new = _resume(monkeypatch, folder, 4)
    states = [h._sampling_generator().get_state() for h in new]
    draws = [torch.rand(64, generator=h._sampling_generator()) for h in new]
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.equal(states[a], states[b]), (a, b)
        assert not torch.equal(draws[a], draws[b]), (a, b)
    # none continues an old rank's stream either (that one goes on on its old rank only)
    old_next = [h._sampling_generator().get_state() for h in old]
    assert not any(torch.equal(s, o) for s in states for o in old_next)
    # deterministic: the same reshard gives the same streams, and the same next negatives
    again = _resume(monkeypatch, folder, 4)
    assert all(torch.equal(a._sampling_generator().get_state(), s) for a, s in zip(again, states))
    assert all(torch.equal(_draw(a), _draw(b)) for a, b in zip(again, _resume(monkeypatch, folder, 4)))


def test_the_same_world_size_keeps_each_ranks_stream(monkeypatch, tmp_path):
    old = [_head(monkeypatch, rank, 2) for rank in range(2)]
    for head in old:
        _draw(head)
    folder = tmp_path / "step"
    _write_checkpoint(folder, old)
    same = _resume(monkeypatch, folder, 2)
    for a, b in zip(old, same):
        assert torch.equal(_draw(a), _draw(b))


def test_centres_are_created_on_the_target_device():
    head = partial_fc.PartialFC(NUM_CLASSES, DIM, margin="cosface", seed=SEED, device="meta")
    assert head.weight.device.type == "meta"
    cpu = partial_fc.PartialFC(NUM_CLASSES, DIM, margin="cosface", seed=SEED)
    assert cpu.weight.device.type == "cpu"



@pytest.mark.parametrize("margin", ["curricularface", "adaface"])
def test_the_margins_buffers_are_created_on_the_centres_device(margin):
    head = partial_fc.PartialFC(NUM_CLASSES, DIM, margin=margin, seed=SEED, device="meta")
    buffers = dict(head.margin.named_buffers())
    assert buffers, f"{margin} keeps no buffer: this test checks nothing"
    assert {b.device.type for b in buffers.values()} == {"meta"}, buffers


def _sampled_step(head: partial_fc.PartialFC) -> None:
    embeddings = torch.randn(6, DIM, generator=torch.Generator().manual_seed(3))
    head(embeddings, torch.arange(6) % NUM_CLASSES).backward()


def _next_stream(state: dict) -> torch.Tensor:
    head = partial_fc.PartialFC(NUM_CLASSES, DIM, margin="softmax", sample_rate=0.5, seed=SEED)
    head.load_state_dict(state)
    return head._sampling_generator().get_state()


def test_a_stream_saved_on_another_device_restarts_from_the_number_of_sampled_steps():
    head = partial_fc.PartialFC(NUM_CLASSES, DIM, margin="softmax", sample_rate=0.5, seed=SEED)
    for _ in range(3):
        _sampled_step(head)
    state = head.state_dict()
    assert state["_extra_state"]["draws"] == 3 and state["_extra_state"]["sampling_device"] == "cpu"
    # the same device: the stream goes on exactly
    assert torch.equal(_next_stream(state), head._sampling_generator().get_state())
    # a CPU state from before the device was recorded is recognised as a CPU one
    old = {**state, "_extra_state": {"sampling_rng": state["_extra_state"]["sampling_rng"]}}
    assert torch.equal(_next_stream(old), head._sampling_generator().get_state())
    # a CUDA generator's state (16 bytes: seed and offset), named or not, cannot be set on
    # a CPU generator: the stream restarts from (seed, draws, rank, world size)
    cuda_rng = torch.zeros(16, dtype=torch.uint8)
    expected = torch.Generator().manual_seed(partial_fc.sampling_seed(SEED, head.shard, 3)).get_state()
    for extra in ({"sampling_rng": cuda_rng, "sampling_device": "cuda", "draws": 3},
                  {"sampling_rng": cuda_rng, "draws": 3}):
        restarted = _next_stream({**state, "_extra_state": extra})
        assert torch.equal(restarted, expected)
        assert not torch.equal(restarted, head._sampling_generator().get_state())

# ------------------------------------------------------------------ memory at scale
BIG_CLASSES, BIG_DIM = 200_000, 128  # fp32: ~102 MB per old shard file (weights + momentum)

CHILD = r"""
import json, re, sys
import torch
from fr_trainer.distributed.shard import ClassShard
from fr_trainer.heads.partial_fc import PartialFC
from fr_trainer.train import checkpoint as ckpt

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def reset_peak():  # the peak resident set is reset to the current one; returns that
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status("VmRSS")

folder, num_classes, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
PartialFC(10, dim, margin="cosface", seed=3, device="meta")  # one-time costs (kernels, allocator)
base = reset_peak()
head = PartialFC(num_classes, dim, margin="cosface", seed=3, device="meta")  # the whole head, 1 rank
init_growth = status("VmHWM") - base
ckpt.load_shard_rows(folder, 0, 1)  # one-time costs of reading (zip reader, pickler)
base = reset_peak()
ok = True
for rank in range(3):
    shard = ClassShard(num_classes, 3, rank)
    rows = ckpt.load_shard_rows(folder, shard.start, shard.end)
    weight = rows["head"]["weight"]
    momentum = rows["optim_head"]["weight"]["momentum_buffer"]
    expect = torch.arange(shard.start, shard.end, dtype=torch.float32)
    ok &= weight.shape == (shard.num_local, dim) and torch.equal(weight[:, 0], expect)
    ok &= torch.equal(momentum[:, -1], -expect)
    del rows, weight, momentum
print(json.dumps({"init_growth": init_growth, "reshard_growth": status("VmHWM") - base, "ok": bool(ok)}))
"""


def _big_checkpoint(folder: Path) -> None:
    """A 2-rank checkpoint whose row i holds i in column 0 (momentum: -i in the last)."""
    folder.mkdir(parents=True)
    torch.save({"world_size": 2, "num_classes": BIG_CLASSES, "step": 7}, folder / ckpt.COMMON)
    for rank in range(2):
        shard = ClassShard(BIG_CLASSES, 2, rank)
        index = torch.arange(shard.start, shard.end, dtype=torch.float32)[:, None]
        weight = index.expand(-1, BIG_DIM).contiguous()
        torch.save({"head": {"weight": weight, "_extra_state": {"sampling_rng": None}},
                    "optim_head": {"weight": {"momentum_buffer": -weight}}},
                   folder / ckpt.shard_name(rank, 2))
        del weight


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
def test_two_to_three_reshard_never_holds_a_whole_old_shard(tmp_path):
    folder = tmp_path / "step"
    _big_checkpoint(folder)
    old_file = (folder / ckpt.shard_name(0, 2)).stat().st_size
    new_shard = ClassShard(BIG_CLASSES, 3, 0).num_local * BIG_DIM * 4 * 2
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(BIG_CLASSES), str(BIG_DIM)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"], "resharded rows differ from the saved ones"
    # the head's 200k x 128 centres (~102 MB) were never materialised on the host
    assert report["init_growth"] < 32 << 20, report
    # new shard (~68 MB) + one copy chunk, below one whole old shard file (~102 MB)
    assert report["reshard_growth"] < old_file, (report, old_file)
    assert report["reshard_growth"] < new_shard + ckpt.RESHARD_CHUNK_BYTES + (12 << 20), (report, new_shard)
