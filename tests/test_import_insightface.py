"""`fr-trainer import-insightface`: an arcface_torch run (files written here with the format's
key names and shapes, docs/formats.md) becomes a checkpoint that resumes at any world size,
with every centre and its momentum at its global class, the run's step and position, and the
loss of a reference built directly from the same weights; bad runs get a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from head_reference import reference_loss
from test_train_support import NUM_CLASSES, PER_CLASS, TinyLinear, config_dict, make_trainer

from fr_trainer.distributed.shard import ClassShard
from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.train import checkpoint as ckpt
from fr_trainer.train.import_insightface import main as import_main
from fr_trainer.train.schedule import poly_lr_by_samples

SOURCE_WORLD = 5  # 12 classes over 5 ranks: 3, 3, 2, 2, 2 (uneven)
DIM = 16
BATCH = 8  # their per-GPU batch = our data.batch_size
GLOBAL = BATCH * SOURCE_WORLD  # 40: 96 // 40 = 2 steps per epoch
EPOCH, STEP = 1, 2  # saved at the end of epoch 1 (train_v2.py writes epoch + 1)


def _sections(tmp: Path, name: str, **more) -> dict:
    return {"run": {"name": name, "output_dir": str(tmp), "seed": 3},
            "train": {"max_steps": None, "epochs": 3.0},
            "optim": {"lr": 0.2, "warmup_epochs": 1.0, "power": 1.0}, **more}


def write_config(data_root: Path, tmp: Path, **more) -> Path:
    path = tmp / "config.json"
    path.write_text(json.dumps(config_dict(data_root, tmp, **_sections(tmp, "resumed", **more))))
    return path


def make_run(root: Path, world: int = SOURCE_WORLD, adamw: bool = False) -> dict:
    """arcface_torch's checkpoint_gpu_{rank}.pt files of a run of `world` ranks; returns the
    global centres, their state and the backbone."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(DIM, 3 * 64, generator=gen) * 0.05, torch.randn(DIM, generator=gen) * 0.05
    # the file's order is not ours (weight, bias): their optimizer's index i is the file's i-th parameter
    backbone = {"linear.bias": bias, "linear.weight": weight}
    centres = torch.randn(NUM_CLASSES, DIM, generator=gen)
    moments = torch.randn(NUM_CLASSES, DIM, generator=gen)
    root.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        # their split: num_local = C // W + (rank < C % W), class_start = C // W * rank + min(rank, C % W)
        start = NUM_CLASSES // world * rank + min(rank, NUM_CLASSES % world)
        rows = slice(start, start + NUM_CLASSES // world + int(rank < NUM_CLASSES % world))
        if adamw:
            state = {i: {"step": torch.tensor(float(STEP)), "exp_avg": t.mul(0.1), "exp_avg_sq": t.abs()}
                     for i, t in enumerate([*backbone.values(), moments[rows]])}
            hyper = {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False}
        else:
            state = {i: {"momentum_buffer": t.mul(0.1)} for i, t in enumerate([*backbone.values(), moments[rows]])}
            hyper = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 5e-4, "nesterov": False}
        torch.save({
            "epoch": EPOCH, "global_step": STEP, "state_dict_backbone": backbone,
            "state_dict_softmax_fc": {"weight": centres[rows].clone()},
            "state_optimizer": {"state": state, "param_groups": [dict(hyper, params=[0, 1]), dict(hyper, params=[2])]},
            "state_lr_scheduler": {"last_epoch": STEP, "_step_count": STEP + 1, "base_lrs": [0.1, 0.1],
                                   "warmup_iters": 2, "total_iters": 6, "power": 1.0},
        }, root / f"checkpoint_gpu_{rank}.pt")
    return {"centres": centres, "moments": moments.mul(0.1), "backbone": backbone}


@pytest.fixture(scope="module")
def imported(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import")
    run = make_run(tmp / "arcface_run")
    config = write_config(data, tmp)
    assert import_main([str(tmp / "arcface_run"), str(tmp / "out"), "--config", str(config)]) == 0
    return tmp, run


def test_every_centre_and_its_momentum_land_at_their_global_class(imported):
    tmp, run = imported
    folder = ckpt.resolve_checkpoint(tmp / "out")
    rows = ckpt.load_shard_rows(folder, 0, NUM_CLASSES)
    assert torch.equal(rows["head"]["weight"], run["centres"])
    assert torch.equal(rows["optim_head"]["weight"]["momentum_buffer"], run["moments"])
    common = ckpt.load_common(folder)
    assert common["step"] == STEP and common["world_size"] == SOURCE_WORLD
    assert common["schedule"]["samples_seen"] == STEP * GLOBAL
    assert common["data"]["epoch"] == EPOCH and common["data"]["consumed"] == 0
    assert torch.equal(common["optim_backbone"][0]["momentum_buffer"], run["backbone"]["linear.weight"] * 0.1)
    assert torch.equal(common["optim_backbone"][1]["momentum_buffer"], run["backbone"]["linear.bias"] * 0.1)
    log = (tmp / "out" / "import_insightface.log").read_text()
    assert "samples_seen = global_step 2 x 40 (batch x 5 ranks) = 80" in log


def rank_resume_one_step(rank: int, world: int, cfg: dict, expected: dict) -> dict:
    """One step of the resumed run: where it starts, its state, the batch it read, its loss."""
    resumed = make_trainer(rank, world, cfg)
    shard = resumed.head.shard
    state = resumed.optimizer.state[resumed.head.weight]
    out = {"step": resumed.step, "seen": resumed.schedule.samples_seen, "position": resumed.stream.position(),
           "momentum_ok": torch.equal(state["momentum_buffer"], expected["moments"][shard.start:shard.end]),
           "centres_ok": torch.equal(resumed.head.weight.detach(), expected["centres"][shard.start:shard.end])}
    read = resumed.stream.next
    batches = []
    resumed.stream.next = lambda: batches.append(read()) or batches[-1]
    result = resumed.train_step()
    return dict(out, loss=result.loss, lr=result.lr, step_samples=resumed.samples_per_step, batch=batches[0])


def reference_loss_of(run: dict, batches: list) -> float:
    """The loss of the run's weights on the global batch, computed directly (one process)."""
    model = TinyLinear(DIM)
    model.load_state_dict(run["backbone"])
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        return float(reference_loss("arcface", model(images), run["centres"], labels, {"s": 16.0, "m": 0.3}))


@pytest.mark.parametrize("world", [1, 2])
def test_resume_at_any_world_size_starts_at_the_imported_step_with_the_reference_loss(data, imported, world):
    tmp, run = imported
    cfg = config_dict(data, tmp, **_sections(tmp, f"resumed{world}"),
                      checkpoint={"every_steps": 0, "resume": str(tmp / "out")})
    results = [rank_resume_one_step(0, 1, cfg, run)] if world == 1 else run_ranks(rank_resume_one_step, world, cfg, run)
    for r in results:
        assert r["step"] == STEP and r["seen"] == STEP * GLOBAL
        assert r["position"]["epoch"] == EPOCH and r["position"]["consumed"] == 0
        assert r["momentum_ok"] and r["centres_ok"]
        # the plan of their scheduler: 6 steps of 40, warmup 2; the lr continues from 80 samples
        assert r["lr"] == pytest.approx(poly_lr_by_samples(STEP * GLOBAL, r["step_samples"], 0.2, 6 * GLOBAL,
                                                           2 * GLOBAL, 1.0))
    assert len({r["loss"] for r in results}) == 1  # the global batch's mean, on every rank
    assert results[0]["loss"] == pytest.approx(reference_loss_of(run, [r["batch"] for r in results]), rel=1e-5)
    assert NUM_CLASSES * PER_CLASS // GLOBAL == STEP // EPOCH  # the synthetic run's steps per epoch


def test_adamw_state_is_imported_with_a_step_per_row(data, tmp_path):
    run = make_run(tmp_path / "arcface_run", world=3, adamw=True)
    config = write_config(data, tmp_path, optim={"name": "adamw", "lr": 0.001, "weight_decay": 0.1})
    assert import_main([str(tmp_path / "arcface_run"), str(tmp_path / "out"), "--config", str(config)]) == 0
    rows = ckpt.load_shard_rows(ckpt.resolve_checkpoint(tmp_path / "out"), 0, NUM_CLASSES)
    state = rows["optim_head"]["weight"]
    assert torch.equal(state["exp_avg"], run["moments"]) and torch.equal(state["step"], torch.full((12,), STEP))


def test_the_2021_format_brings_centres_and_momentum_and_model_pt_alone_the_backbone(data, tmp_path):
    """rank_{r}_softmax_weight.pt / _mom.pt (bare tensors) with backbone.pth; then model.pt only."""
    run = make_run(tmp_path / "v2", world=3)
    old = tmp_path / "arcface_run"
    old.mkdir()
    torch.save(run["backbone"], old / "backbone.pth")
    for rank, (start, size) in enumerate(zip(ClassShard.starts(12, 3), ClassShard.sizes(12, 3))):
        torch.save(run["centres"][start:start + size].clone(), old / f"rank_{rank}_softmax_weight.pt")
        torch.save(run["moments"][start:start + size].clone(), old / f"rank_{rank}_softmax_weight_mom.pt")
    config = write_config(data, tmp_path)
    assert import_main([str(old), str(tmp_path / "out"), "--config", str(config)]) == 0
    folder = ckpt.resolve_checkpoint(tmp_path / "out")
    rows = ckpt.load_shard_rows(folder, 0, NUM_CLASSES)
    assert torch.equal(rows["head"]["weight"], run["centres"])
    assert torch.equal(rows["optim_head"]["weight"]["momentum_buffer"], run["moments"])
    assert ckpt.load_common(folder)["step"] == 0

    alone = tmp_path / "model_only"
    alone.mkdir()
    torch.save(run["backbone"], alone / "model.pt")
    assert import_main([str(alone), str(tmp_path / "out2"), "--config", str(config), "--num-classes", "12"]) == 0
    common = ckpt.load_common(ckpt.resolve_checkpoint(tmp_path / "out2"))
    assert all(torch.equal(common["backbone"][k], v) for k, v in run["backbone"].items())
    assert common["num_classes"] == 12 and common["world_size"] == 1


def test_the_2022_format_takes_the_centres_and_the_newest_epochs_backbone(data, tmp_path):
    """softmax_fc_gpu_{r}.pt ({"weight": rows}) beside model_epoch_{E}.pt files."""
    run = make_run(tmp_path / "v2", world=2)
    old = tmp_path / "arcface_run"
    old.mkdir()
    for rank in range(2):
        torch.save({"weight": run["centres"][6 * rank:6 * rank + 6].clone()}, old / f"softmax_fc_gpu_{rank}.pt")
    torch.save({k: v * 0 for k, v in run["backbone"].items()}, old / "model_epoch_1.pt")
    torch.save(run["backbone"], old / "model_epoch_2.pt")
    assert import_main([str(old), str(tmp_path / "out"), "--config", str(write_config(data, tmp_path))]) == 0
    folder = ckpt.resolve_checkpoint(tmp_path / "out")
    assert torch.equal(ckpt.load_shard_rows(folder, 0, NUM_CLASSES)["head"]["weight"], run["centres"])
    common = ckpt.load_common(folder)
    assert torch.equal(common["backbone"]["linear.weight"], run["backbone"]["linear.weight"])
    assert common["optim_backbone"] == {}
    assert "model_epoch_2.pt" in (tmp_path / "out" / "import_insightface.log").read_text()


# --------------------------------------------------------------------------- errors
class Opaque:
    """A class a weights-only load must refuse."""


def _error(capsys, data_root: Path, tmp: Path, *extra: str, **config) -> str:
    path = write_config(data_root, tmp, **config)
    code = import_main([str(tmp / "arcface_run"), str(tmp / "out"), "--config", str(path), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_a_missing_rank_is_named(data, tmp_path, capsys):
    make_run(tmp_path / "arcface_run", world=3)
    (tmp_path / "arcface_run" / "checkpoint_gpu_1.pt").unlink()
    assert "rank 1 is missing (checkpoint_gpu_1.pt absent" in _error(capsys, data, tmp_path)


def test_mismatched_centre_counts_are_named(data, tmp_path, capsys):
    make_run(tmp_path / "arcface_run", world=3)
    path = tmp_path / "arcface_run" / "checkpoint_gpu_2.pt"
    saved = torch.load(path, weights_only=True)
    saved["state_dict_softmax_fc"]["weight"] = torch.zeros(5, DIM)
    torch.save(saved, path)
    err = _error(capsys, data, tmp_path)
    assert "checkpoint_gpu_0.pt: holds 4 centres, but rank 0 of 3 owns 5 of 13 classes" in err


def test_unknown_keys_are_named(data, tmp_path, capsys):
    make_run(tmp_path / "arcface_run", world=2)
    path = tmp_path / "arcface_run" / "checkpoint_gpu_0.pt"
    torch.save(dict(torch.load(path, weights_only=True), extra=torch.zeros(1)), path)
    assert "checkpoint_gpu_0.pt: not an arcface_torch checkpoint_gpu file (unknown keys ['extra']" in \
        _error(capsys, data, tmp_path)


def test_a_backbone_that_does_not_fit_the_config_is_named(data, tmp_path, capsys):
    make_run(tmp_path / "arcface_run", world=2)
    err = _error(capsys, data, tmp_path, model={"backbone": "test_tinylinear", "embedding_size": 32})
    assert "checkpoint_gpu_0.pt (backbone) does not fit backbone" in err and "wrong shape: linear.weight" in err


def test_the_optimizer_of_the_run_must_be_the_configs(data, tmp_path, capsys):
    make_run(tmp_path / "arcface_run", world=2)
    assert "the run used sgd" in _error(capsys, data, tmp_path, optim={"name": "adamw"})


def test_a_file_needing_full_unpickling_is_refused(data, tmp_path, capsys):
    make_run(tmp_path / "arcface_run", world=2)
    path = tmp_path / "arcface_run" / "checkpoint_gpu_1.pt"
    torch.save(dict(torch.load(path, weights_only=True), epoch=Opaque()), path)
    err = _error(capsys, data, tmp_path)
    assert "checkpoint_gpu_1.pt needs full unpickling" in err and "it is not loaded" in err


def test_a_missing_last_rank_is_caught_by_the_datas_classes(data, tmp_path, capsys):
    make_run(tmp_path / "arcface_run", world=3)
    (tmp_path / "arcface_run" / "checkpoint_gpu_2.pt").unlink()  # 8 classes left, split 4 + 4
    assert "the 2 rank files hold 8 classes, the data 12; copy every rank's file" in _error(capsys, data, tmp_path)


def test_a_backbone_alone_needs_the_number_of_classes(data, tmp_path, capsys):
    (tmp_path / "arcface_run").mkdir()
    torch.save(make_run(tmp_path / "v2", world=2)["backbone"], tmp_path / "arcface_run" / "model.pt")
    err = _error(capsys, data, tmp_path, data={"root": str(tmp_path / "nowhere")})
    assert "holds the backbone only: give --num-classes N" in err


def test_gradient_accumulation_counts_their_iterations_as_micro_batches(data, tmp_path):
    make_run(tmp_path / "arcface_run", world=2)
    config = write_config(data, tmp_path, optim={"accumulate": 2})
    assert import_main([str(tmp_path / "arcface_run"), str(tmp_path / "out"), "--config", str(config)]) == 0
    common = ckpt.load_common(ckpt.resolve_checkpoint(tmp_path / "out"))
    assert common["step"] == STEP // 2 and common["schedule"]["samples_seen"] == STEP * BATCH * 2
    assert common["plan"]["basis"] == {"steps_per_epoch": 1, "step_samples": BATCH * 2 * 2}
    assert common["plan"]["total_samples"] == 6 * BATCH * 2
