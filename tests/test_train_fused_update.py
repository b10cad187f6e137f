"""`head.fused_update` in the trainer (fr_trainer/train/fused_update.py), run as users run it:
by epochs on two gloo ranks, stopped, and resumed on three, bit for bit the run without
it; and every setting it cannot hold is refused by name."""

from __future__ import annotations

import pytest
import torch
from test_train_support import config_dict, make_trainer, rank_fit

from fr_trainer.distributed.spawn import run_ranks
from fr_trainer.train.config import ConfigError, config_from_dict

SECTIONS = {"head": {"chunk_size": 4}, "train": {"max_steps": None, "epochs": 2}}


def _run(data, out, fused: bool) -> tuple[list[dict], list[dict]]:
    """Two ranks stopped after step 4 (a checkpoint), then resumed on three to the end."""
    cfg = config_dict(data, out, head={**SECTIONS["head"], "fused_update": fused}, train=SECTIONS["train"])
    first = run_ranks(rank_fit, 2, cfg, 4)
    return first, run_ranks(rank_fit, 3, cfg)


def test_a_fused_update_run_stopped_and_resumed_at_another_world_size_is_the_unfused_run(data, tmp_path):
    probe = make_trainer(0, 1, config_dict(data, tmp_path / "probe", head={"chunk_size": 4, "fused_update": True}))
    assert probe.head.updates_in_backward  # (the option is in effect, not ignored)
    fused_first, fused_rest = _run(data, tmp_path / "fused", True)
    plain_first, plain_rest = _run(data, tmp_path / "plain", False)
    assert fused_first[0]["step"] == 4 and fused_rest[0]["step"] > 4
    assert fused_first[0]["losses"] + fused_rest[0]["losses"] == plain_first[0]["losses"] + plain_rest[0]["losses"]
    for fused, plain in zip(fused_rest, plain_rest):
        assert torch.equal(fused["head"]["weight"], plain["head"]["weight"])
        assert torch.equal(fused["head"]["momentum"], plain["head"]["momentum"])
        for name, value in plain["snapshot"]["backbone"].items():
            assert torch.equal(fused["snapshot"]["backbone"][name], value), name


@pytest.mark.parametrize(("sections", "named"), [
    ({"head": {"sample_rate": 0.5}}, "head.sample_rate = 0.5"),
    ({"optim": {"accumulate": 2}}, "optim.accumulate = 2"),
    ({"optim": {"clip_grad_norm": 5.0}}, 'optim.clip_scope = "backbone"'),
    ({"train": {"nonfinite": "skip"}}, 'train.nonfinite = "stop"'),
])
def test_settings_a_fused_update_cannot_hold_are_refused_by_name(data, tmp_path, sections, named):
    cfg = config_dict(data, tmp_path, head={"chunk_size": 4, "fused_update": True})
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values}
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config_from_dict(cfg)
    cfg["head"]["fused_update"] = False
    config_from_dict(cfg)  # (each is fine without it)
