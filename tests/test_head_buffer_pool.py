"""fr_trainer/heads/buffer_pool.py: the CPU head reuses its big temporaries from step to
step without ever depending on what they held or sharing one between steps in flight."""

from __future__ import annotations

import pytest
import torch

from fr_trainer.heads import buffer_pool
from fr_trainer.heads.device_policy import CPU, BlockPolicy
from fr_trainer.heads.margin_softmax import MarginSoftmaxCrossEntropy
from fr_trainer.margins import create_margin

NO_POOL = BlockPolicy("cpu-no-pool", CPU.row_block_elements, CPU.mm_columns, reuse_buffers=False)


@pytest.fixture(autouse=True)
def empty_pool():
    buffer_pool.clear()
    yield
    buffer_pool.clear()


def test_a_given_back_buffer_is_reused_and_never_handed_to_two_users() -> None:
    a = buffer_pool.take((4, 5), torch.float32, "cpu")
    b = buffer_pool.take((4, 5), torch.float32, "cpu")
    assert a.data_ptr() != b.data_ptr()
    buffer_pool.give(a)
    buffer_pool.give(a)  # twice: still one free buffer
    assert buffer_pool.held_bytes() == 4 * 5 * 4
    assert buffer_pool.take((4, 5), torch.float32, "cpu").data_ptr() == a.data_ptr()
    assert buffer_pool.take((4, 5), torch.float32, "cpu").data_ptr() not in (a.data_ptr(), b.data_ptr())
    buffer_pool.give(buffer_pool.take((5, 4), torch.float32, "cpu"))  # another shape: its own key
    assert buffer_pool.take((4, 5), torch.bfloat16, "cpu").dtype == torch.bfloat16


def _step(x, w, targets, margin, compute_dtype, policy, chunk):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = MarginSoftmaxCrossEntropy.apply(x, w, None, None, targets, margin, None, chunk, compute_dtype,
                                           torch.float32 if compute_dtype else None, policy, False)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _poison_pool() -> None:
    for free in buffer_pool._free.values():
        for tensor in free:
            tensor.fill_(float("nan"))


@pytest.mark.parametrize("name", ["arcface", "sv_arcface"])  # linear and non-linear non-target logits
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 37])
def test_pooled_steps_equal_unpooled_steps_bit_for_bit_even_with_poisoned_buffers(name, compute_dtype, chunk):
    torch.manual_seed(0)
    x, w = torch.randn(24, 16), torch.randn(101, 16)
    targets = torch.randint(0, 101, (24,))
    for _ in range(3):
        expected = _step(x, w, targets, create_margin(name), compute_dtype, NO_POOL, chunk)
        got = _step(x, w, targets, create_margin(name), compute_dtype, CPU, chunk)
        assert buffer_pool.held_bytes() > 0  # the step gave its buffers back
        for e, g in zip(expected, got):
            assert torch.equal(e, g)
        _poison_pool()  # the next step must overwrite everything it takes


def test_two_steps_in_flight_do_not_share_a_buffer() -> None:
    torch.manual_seed(1)
    x, w = torch.randn(16, 8), torch.randn(50, 8)
    t1, t2 = torch.randint(0, 50, (16,)), torch.randint(0, 50, (16,))
    margin = create_margin("arcface")
    reference = [_step(x, w, t, margin, None, NO_POOL, None) for t in (t1, t2)]
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    losses = [MarginSoftmaxCrossEntropy.apply(xi, wi, None, None, t, margin, None, None, None, None, CPU, False)
              for xi, wi, t in zip(xs, ws, (t1, t2))]  # both forwards, then both backwards
    for loss in reversed(losses):
        loss.backward()
    for (loss_ref, gx, gw), loss, xi, wi in zip(reference, losses, xs, ws):
        assert torch.equal(loss.detach(), loss_ref)
        assert torch.equal(xi.grad, gx) and torch.equal(wi.grad, gw)


@pytest.mark.parametrize("margin", ["arcface", "sv_arcface"])  # kept logits / kept cosines
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 16])  # chunked: the bf16 copy is made again block by block
def test_a_second_backward_of_a_retained_graph_gives_the_same_gradients(compute_dtype, sampled, margin, chunk) -> None:
    torch.manual_seed(2)
    x = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    index = torch.arange(0, 40, 2) if sampled else None  # the rows in use (sampling)
    targets = torch.randint(0, 20 if sampled else 40, (12,))
    loss = MarginSoftmaxCrossEntropy.apply(x, w, None, index, targets, create_margin(margin), None, chunk,
                                           compute_dtype, torch.float32 if compute_dtype else None, CPU, False)
    loss.backward(retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    _poison_pool()  # what the first backward gave back is not used again
    x.grad = w.grad = None
    loss.backward()
    if sampled:  # sparse gradients of the rows in use
        first = (first[0], first[1].to_dense())
        w.grad = w.grad.to_dense()
    assert torch.equal(x.grad, first[0]) and torch.equal(w.grad, first[1])


def _grad_step(w: torch.nn.Parameter, x: torch.Tensor, targets: torch.Tensor) -> None:
    MarginSoftmaxCrossEntropy.apply(x, w, None, None, targets, create_margin("arcface"), None, None,
                                    None, None, CPU, False).backward()


def test_the_centres_gradient_reuses_the_pages_of_a_dropped_grad_and_never_those_of_a_held_one() -> None:
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(40, 8))
    x, targets = torch.randn(12, 8), torch.randint(0, 40, (12,))
    _grad_step(w, x, targets)
    first = w.grad
    first_ptr, first_values = first.data_ptr(), first.clone()
    # autograd took the head's tensor over as .grad (no copy), and the pool counts it as in use
    assert buffer_pool.outgoing_bytes() == 0
    held = first  # the user keeps the gradient: its storage must not be written again
    w.grad = None
    _grad_step(w, x, targets)
    assert w.grad.data_ptr() != first_ptr and torch.equal(held, first_values)
    held.fill_(float("nan"))  # poisoned too before it is let go
    del held, first
    second_ptr = w.grad.data_ptr()
    w.grad.fill_(float("nan"))  # what the next step finds on the reused pages
    w.grad = None  # zero_grad(set_to_none=True): both storages are free now
    assert buffer_pool.outgoing_bytes() == 2 * 40 * 8 * 4
    _grad_step(w, x, targets)
    assert w.grad.data_ptr() in (first_ptr, second_ptr)
    torch.testing.assert_close(w.grad, first_values, rtol=0, atol=0)  # same inputs, same gradient


def test_a_gradient_added_into_an_existing_grad_frees_its_storage_for_the_next_step() -> None:
    torch.manual_seed(4)
    w = torch.nn.Parameter(torch.randn(40, 8))
    x, targets = torch.randn(12, 8), torch.randint(0, 40, (12,))
    _grad_step(w, x, targets)
    single = w.grad.clone()
    for _ in range(3):  # gradient accumulation: .grad stays, each new gradient is added into it
        _grad_step(w, x, targets)
    torch.testing.assert_close(w.grad, 4 * single, rtol=1e-6, atol=1e-6)
    assert buffer_pool.outgoing_bytes() == 40 * 8 * 4  # one storage in .grad, one free, not one per step
