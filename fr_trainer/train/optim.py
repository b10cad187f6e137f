"""SGD and AdamW that honour row-sparse gradients (Partial-FC sampling).

A parameter whose `.grad` is a sparse COO tensor (what `PartialFC` returns for its
centres when `sample_rate < 1`) is updated only in the rows the gradient holds: those
rows get weight decay, their momentum / moment estimates and the step; every other row,
and its optimizer state, stays bit-identical. insightface's Partial-FC v2 loses this: its
whole shard sees momentum and decay every step. Dense gradients follow the usual rules
(`torch.optim.SGD` with coupled decay; `torch.optim.AdamW` with decoupled decay) and are
stepped together, with multi-tensor `_foreach_*` ops per (device, dtype) group
(`fr_trainer.train.foreach`): the number of ops of a step does not grow with the number of
parameter tensors (views aside), where one op per tensor was ~950 ops for iresnet50's
SGD step and ~5,200 for its AdamW step.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from fr_trainer.train.foreach import by_device_and_dtype, scale_


def _sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices [R], row values [R, ...]) of a sparse COO gradient, duplicates summed."""
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


class _RowSparseOptimizer(torch.optim.Optimizer):
    """The shared `step`: the closure, then, per parameter group, `_dense_update(params,
    group)` for the parameters with dense gradients (together) and `_sparse_update(param,
    group)` for each one with a sparse COO gradient."""

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grads = [param for param in group["params"] if param.grad is not None]
            dense = [param for param in with_grads if not param.grad.is_sparse]
            if dense:
                self._dense_update(dense, group)
            for param in with_grads:
                if param.grad.is_sparse:
                    self._sparse_update(param, group)
        return loss

    def _dense_update(self, params: list[torch.nn.Parameter], group: dict) -> None:
        raise NotImplementedError

    def _sparse_update(self, param: torch.nn.Parameter, group: dict) -> None:
        raise NotImplementedError

    def group_of(self, param: torch.nn.Parameter) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not in this optimizer")

    @torch.no_grad()
    def update_rows(self, param: torch.nn.Parameter, start: int, end: int, grad_rows: torch.Tensor) -> None:
        """Step the rows [start, end) of `param` with `grad_rows`, their dense gradient, by the
        rule of its group (the fused head update, `PartialFC.update_in_backward`): the same
        numbers as `step()` with that gradient in `param.grad`, which stays untouched."""
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

    def _momentum_buffer(self, param: torch.nn.Parameter) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        return state["momentum_buffer"]

    def _direction(self, param, grad, weights, group, rows=None):
        if group["weight_decay"]:
            grad = grad.add(weights, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if not momentum:
            return grad
        buffer = self._momentum_buffer(param)
        if rows is None:
            buffer.mul_(momentum).add_(grad)
            current = buffer
        else:
            current = buffer.index_select(0, rows).mul_(momentum).add_(grad)
            buffer.index_copy_(0, rows, current)
        return grad.add(current, alpha=momentum) if group["nesterov"] else current

    def _dense_update(self, params: list[torch.nn.Parameter], group: dict) -> None:
        buffers = [self._momentum_buffer(param) for param in params] if group["momentum"] else None
        self._dense_rule(params, [param.grad for param in params], buffers, group)

    @torch.no_grad()
    def update_rows(self, param: torch.nn.Parameter, start: int, end: int, grad_rows: torch.Tensor) -> None:
        group, rows = self.group_of(param), slice(start, end)
        buffers = [self._momentum_buffer(param)[rows]] if group["momentum"] else None
        self._dense_rule([param[rows]], [grad_rows], buffers, group)

    @staticmethod
    def _dense_rule(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor] | None,
                    group: dict) -> None:
        """In place, without weight-sized temporaries (the head's shard can be GBs), every
        tensor at once: buf = momentum * buf + grad + decay * w; w -= lr * buf (`buffers`
        None: no momentum)."""
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        if buffers is None:
            for weights, gradients in by_device_and_dtype(params, grads, cpu_runs=True):
                if decay:
                    scale_(weights, 1.0 - lr * decay)
                torch._foreach_add_(weights, gradients, alpha=-lr)
            return
        for weights, gradients, moments in by_device_and_dtype(params, grads, buffers, cpu_runs=True):
            scale_(moments, momentum)
            torch._foreach_add_(moments, gradients)
            if decay:
                torch._foreach_add_(moments, weights, alpha=decay)
            if group["nesterov"]:  # w -= lr * (grad + decay * w + momentum * buf), w the old weights
                if decay:
                    scale_(weights, 1.0 - lr * decay)
                torch._foreach_add_(weights, gradients, alpha=-lr)
                torch._foreach_add_(weights, moments, alpha=-lr * momentum)
            else:
                torch._foreach_add_(weights, moments, alpha=-lr)

    def _sparse_update(self, param: torch.nn.Parameter, group: dict) -> None:
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

    def _state(self, param: torch.nn.Parameter) -> dict:
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] = torch.zeros(param.shape[0] if param.dim() else 1, dtype=torch.int64,
                                        device=param.device)
        return state

    def _sparse_update(self, param: torch.nn.Parameter, group: dict) -> None:
        rows, grad = _sparse_rows(param.grad)
        self._adam_rows(param, grad, rows, self._state(param), group)

    @torch.no_grad()
    def update_rows(self, param: torch.nn.Parameter, start: int, end: int, grad_rows: torch.Tensor) -> None:
        state, rows = self._state(param), slice(start, end)
        self._dense_rule([param[rows]], [grad_rows], [state["exp_avg"][rows]], [state["exp_avg_sq"][rows]],
                         [state["step"][rows]], self.group_of(param))

    def _dense_update(self, params: list[torch.nn.Parameter], group: dict) -> None:
        states = [self._state(param) for param in params]
        self._dense_rule(params, [param.grad for param in params], [s["exp_avg"] for s in states],
                         [s["exp_avg_sq"] for s in states], [s["step"] for s in states], group)

    @staticmethod
    def _dense_rule(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor], step_counts: list[torch.Tensor], group: dict) -> None:
        """Every row of every tensor, the arithmetic of `_adam_rows` in multi-tensor ops (the
        bias corrections per row, broadcast through views)."""
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        lists = (grads, exp_avgs, exp_avg_sqs, step_counts)
        for weights, grads, exp_avg, exp_avg_sq, steps in by_device_and_dtype(params, *lists, cpu_runs=True):
            torch._foreach_add_(steps, 1)
            scale_(exp_avg, beta1)
            torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
            scale_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            # the step counts in the parameters' dtype (a 0-dim operand sets a product's dtype)
            counts = torch._foreach_mul(steps, weights[0].new_ones(()))
            correction1, correction2 = (_one_minus(torch._foreach_pow(beta, counts)) for beta in (beta1, beta2))
            denominator = torch._foreach_div(exp_avg_sq, _row_views(correction2, weights))
            torch._foreach_sqrt_(denominator)
            torch._foreach_add_(denominator, eps)
            change = torch._foreach_div(exp_avg, _row_views(correction1, weights))
            scale_(change, lr)
            torch._foreach_div_(change, denominator)
            scale_(weights, 1 - lr * decay)
            torch._foreach_sub_(weights, change)

    @staticmethod
    def _adam_rows(param, grad, rows, state, group) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        steps = state["step"].index_select(0, rows) + 1
        weights = param.index_select(0, rows)
        exp_avg = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        shape = _row_shape(param)
        correction1 = (1 - beta1 ** steps.to(param.dtype)).reshape(shape)
        correction2 = (1 - beta2 ** steps.to(param.dtype)).reshape(shape)
        denominator = (exp_avg_sq / correction2).sqrt_().add_(eps)
        new = weights * (1 - lr * decay) - lr * (exp_avg / correction1) / denominator
        param.index_copy_(0, rows, new)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        state["step"].index_copy_(0, rows, steps)


def _row_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a per-row value [rows] over `param` (a 0-dim one: ())."""
    return (-1,) + (1,) * (param.dim() - 1) if param.dim() else ()


def _row_views(values: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [value.view(_row_shape(param)) for value, param in zip(values, params)]


def _one_minus(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """1 - v for each tensor, in place (-v + 1 rounds exactly as 1 - v)."""
    torch._foreach_neg_(values)
    torch._foreach_add_(values, 1)
    return values
