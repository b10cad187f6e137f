"""SGD and AdamW that honour row-sparse gradients (Partial-FC sampling).

A parameter whose `.grad` is a sparse COO tensor (what `PartialFC` returns for its
centres when `sample_rate < 1`) is updated only in the rows the gradient holds: those
rows get weight decay, their momentum / moment estimates and the step; every other row,
and its optimizer state, stays bit-identical. insightface's Partial-FC v2 loses this: its
whole shard sees momentum and decay every step. Dense gradients follow the usual rules
(`torch.optim.SGD` with coupled decay; `torch.optim.AdamW` with decoupled decay).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def _sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices [R], row values [R, ...]) of a sparse COO gradient, duplicates summed."""
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


class _RowSparseOptimizer(torch.optim.Optimizer):
    """The shared `step`: the closure, then `_update(param, group)` for every parameter
    that has a gradient (dense or sparse COO)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.nn.Parameter, group: dict) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loading, then every state tensor onto its parameter's device.

        Checkpoints are read with `map_location="cpu"`; torch moves most state to the
        parameter but leaves a `step` key where it was, and AdamW's per-row step must live
        beside the rows it counts (a resumed CUDA run would otherwise index a CPU tensor
        with CUDA rows). Floating state also takes the parameter's dtype; integer state
        (the step counts) keeps its own."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = _to_param(value, param)


def _to_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` on `param`'s device; floating values also in `param`'s dtype."""
    dtype = param.dtype if value.is_floating_point() and param.is_floating_point() else value.dtype
    return value.to(device=param.device, dtype=dtype)


class SGD(_RowSparseOptimizer):
    """SGD with momentum, coupled weight decay and optional Nesterov; row-sparse aware."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def _update(self, param: torch.nn.Parameter, group: dict) -> None:
        if param.grad.is_sparse:
            self._sparse_step(param, group)
        else:
            self._dense_step(param, group)

    def _direction(self, param, grad, weights, group, rows=None):
        if group["weight_decay"]:
            grad = grad.add(weights, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if not momentum:
            return grad
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        if rows is None:
            buffer.mul_(momentum).add_(grad)
            current = buffer
        else:
            current = buffer.index_select(0, rows).mul_(momentum).add_(grad)
            buffer.index_copy_(0, rows, current)
        return grad.add(current, alpha=momentum) if group["nesterov"] else current

    def _dense_step(self, param, group) -> None:
        """In place, without a weight-sized temporary (the head's shard can be GBs):
        buf = momentum * buf + grad + decay * w; w -= lr * buf."""
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        grad = param.grad
        if not momentum:
            if decay:
                param.mul_(1.0 - lr * decay)
            param.add_(grad, alpha=-lr)
            return
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"].mul_(momentum).add_(grad)
        if decay:
            buffer.add_(param, alpha=decay)
        if group["nesterov"]:  # w -= lr * (grad + decay * w + momentum * buf), w the old weights
            if decay:
                param.mul_(1.0 - lr * decay)
            param.add_(grad, alpha=-lr).add_(buffer, alpha=-lr * momentum)
        else:
            param.add_(buffer, alpha=-lr)

    def _sparse_step(self, param, group) -> None:
        rows, grad = _sparse_rows(param.grad)
        direction = self._direction(param, grad, param.index_select(0, rows), group, rows)
        param.index_add_(0, rows, direction, alpha=-group["lr"])


class AdamW(_RowSparseOptimizer):
    """AdamW (decoupled decay); row-sparse gradients update only their rows, with a step
    count per row so each row's bias correction counts the updates it has seen."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, param: torch.nn.Parameter, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] = torch.zeros(param.shape[0] if param.dim() else 1, dtype=torch.int64,
                                        device=param.device)
        if param.grad.is_sparse:
            rows, grad = _sparse_rows(param.grad)
        else:
            rows, grad = None, param.grad
        self._adam_rows(param, grad, rows, state, group)

    @staticmethod
    def _adam_rows(param, grad, rows, state, group) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        select = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        steps = select(state["step"]) + 1
        weights = select(param)
        exp_avg = select(state["exp_avg"]).mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq = select(state["exp_avg_sq"]).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        shape = (-1,) + (1,) * (param.dim() - 1) if param.dim() else ()
        correction1 = (1 - beta1 ** steps.to(param.dtype)).reshape(shape)
        correction2 = (1 - beta2 ** steps.to(param.dtype)).reshape(shape)
        denominator = (exp_avg_sq / correction2).sqrt_().add_(eps)
        new = weights * (1 - lr * decay) - lr * (exp_avg / correction1) / denominator
        if rows is None:
            param.copy_(new)
            state["exp_avg"], state["exp_avg_sq"], state["step"] = exp_avg, exp_avg_sq, steps
        else:
            param.index_copy_(0, rows, new)
            state["exp_avg"].index_copy_(0, rows, exp_avg)
            state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
            state["step"].index_copy_(0, rows, steps)
