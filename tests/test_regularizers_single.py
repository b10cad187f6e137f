"""Single-process checks of the regularizers: edge cases, state, and errors."""

from __future__ import annotations

import pytest
import torch

from fr_trainer.regularizers import CenterLoss, CirclePairLoss, TripletLoss


def test_no_valid_anchor_gives_zero_and_a_zero_gradient() -> None:
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.arange(5)  # every label distinct: no positive pair anywhere
    for loss_fn in (CirclePairLoss(), TripletLoss(), TripletLoss(mining="semi_hard")):
        loss = loss_fn(x, y)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x)), loss_fn
        x.grad = None


def test_triplet_easy_batch_is_zero_and_hard_batch_is_positive() -> None:
    y = torch.tensor([0, 0, 1, 1])
    easy = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]], dtype=torch.float64)
    for mining in ("batch_hard", "semi_hard"):
        assert TripletLoss(mining=mining)(easy, y).item() == 0.0
        hard = easy[[0, 2, 1, 3]]  # swap: each anchor's positive is now opposite
        assert TripletLoss(mining=mining)(hard, y).item() > 1.0


def test_center_loss_paper_update_moves_towards_the_class_mean_and_not_in_eval() -> None:
    loss_fn = CenterLoss(3, 2, alpha=1.0).double()
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 2])
    loss_fn(x, y)
    # alpha = 1: c_0 <- c_0 - (2 c_0 - 4) / 3 = 4/3 * [1, 0] from zero; c_2 <- [0, 2.5]; c_1 untouched
    torch.testing.assert_close(loss_fn.centres, torch.tensor([[4 / 3, 0.0], [0.0, 0.0], [0.0, 2.5]],
                                                             dtype=torch.float64))
    assert "centres" in loss_fn.state_dict()
    before = loss_fn.centres.clone()
    loss_fn.eval()
    loss_fn(x, y)
    assert torch.equal(loss_fn.centres, before)


def test_center_loss_sgd_centres_are_a_parameter() -> None:
    loss_fn = CenterLoss(4, 3, update="sgd")
    assert [name for name, _ in loss_fn.named_parameters()] == ["centres"]
    assert list(CenterLoss(4, 3).parameters()) == []


def test_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="update='adam'"):
        CenterLoss(4, 3, update="adam")
    with pytest.raises(ValueError, match="alpha=0"):
        CenterLoss(4, 3, alpha=0.0)
    with pytest.raises(ValueError, match="mining='hardest'"):
        TripletLoss(mining="hardest")
    with pytest.raises(ValueError, match="m=1.2"):
        CirclePairLoss(m=1.2)
    with pytest.raises(ValueError, match=r"outside \[0, 4\): \[7\]"):
        CenterLoss(4, 3)(torch.randn(2, 3), torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="int64"):
        TripletLoss()(torch.randn(2, 3), torch.tensor([1, 2], dtype=torch.int32))
