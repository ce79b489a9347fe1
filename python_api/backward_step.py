"""Optimizer steps taken while backward runs (UnlearnConfig gradient_step='in_backward'): each trained parameter's
gradient is consumed as soon as autograd has accumulated it (a post-accumulate-grad hook) and freed, so the model
never holds a full gradient: one parameter's gradient, and its fp32 copy, is alive at a time.

- Full and LoRA scopes: the hook steps AdamW on the parameter's fp32 master and rounds the model's weight from it.
- Mask scope: fp32 masters and AdamW moments exist for the selected elements only (packed: one slot per selected
  element, beside the low-precision model). The hook takes the gradient's selected entries, drops the rest, steps
  the packed master and writes it into the model's weight at the selected positions only, so unselected weights
  are never written.
- fp16 (loss scaling): a step is known to be finite only once backward has ended, so the mask scope holds the
  packed gradients (a few bytes per selected element) until then; full and LoRA scopes step after backward.

Moments (optimizer_state): 'fp32' beside the master; 'bf16' halves their bytes (each step computes in fp32 from
them and rounds them back: the second moment keeps 8 mantissa bits, so the step size carries ~0.4% relative
rounding); 'cpu' keeps them in CPU memory, none on the accelerator (each step copies one parameter's moments over
and back: 16 bytes per trained element per step across the bus).
"""
import math
from typing import Callable, List, Sequence

import torch

OPTIMIZER_STATES = ("fp32", "bf16", "cpu")


class ParamAdamW(torch.optim.Optimizer):
    """AdamW stepping one tensor at a time (step_tensor) with torch.optim.AdamW's single-tensor arithmetic, its
    moments kept as `state` says ('fp32', 'bf16' or 'cpu')."""

    def __init__(self, params, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 state: str = "fp32"):
        if state not in OPTIMIZER_STATES:
            raise ValueError(f"state must be one of {OPTIMIZER_STATES}, got {state!r}")
        super().__init__(list(params), dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_kind = state
        self.state_dtype = torch.bfloat16 if state == "bf16" else torch.float32  # checkpoint.py checks it

    def _state_like(self, p, value=None):
        device = torch.device("cpu") if self.state_kind == "cpu" else p.device
        if value is None:
            return torch.zeros(p.shape, dtype=self.state_dtype, device=device)
        return value.to(device=device, dtype=self.state_dtype)

    @torch.no_grad()
    def step_tensor(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """One AdamW step of the fp32 tensor p with its fp32 gradient."""
        group, state = self.param_groups[0], self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"], state["exp_avg_sq"] = self._state_like(p), self._state_like(p)
        state["step"] += 1
        step = float(state["step"])
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        stored = state["exp_avg"], state["exp_avg_sq"]
        exp_avg, exp_avg_sq = (s.to(device=p.device, dtype=torch.float32) for s in stored)  # same tensor in fp32
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
        for s, new in zip(stored, (exp_avg, exp_avg_sq)):
            if s is not new:
                s.copy_(new)

    @torch.no_grad()
    def step(self, closure=None):
        """Steps every parameter that has a .grad (for use as a plain optimizer after backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                self.step_tensor(p, p.grad.float())
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # torch casts the moments to the parameter's dtype and device
        for p, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = self._state_like(p, state[key])


def selected_positions(mask, i: int, device) -> torch.Tensor:
    """Flat int32 positions of the elements mask selects in its tensor i, on `device` (not cached in the mask)."""
    return mask.dense(i).reshape(-1).nonzero().squeeze(1).to(device=device, dtype=torch.int32)


class InBackwardStep:
    """Hooks the trained parameters so that `optimizer` (a ParamAdamW over `masters`) consumes each gradient as
    autograd accumulates it. `positions[i]` (mask scope) are parameter i's selected flat positions and masters[i]
    its packed fp32 master; without positions masters[i] has the parameter's shape (or is the fp32 parameter).
    `average(list)` averages over ranks in place; `scaler` is the fp16 LossScaler. Only steps between arm() and
    finish() are taken, so other backward passes (saliency, a user's) are left alone."""

    def __init__(self, params: Sequence[torch.Tensor], masters: Sequence[torch.Tensor], optimizer: ParamAdamW, *,
                 positions: Sequence[torch.Tensor] | None = None, scaler=None,
                 average: Callable[[List[torch.Tensor]], None] | None = None):
        self.params, self.masters, self.optimizer = list(params), list(masters), optimizer
        self.positions, self.scaler, self.average = positions, scaler, average
        self.armed, self.pending, self.finite = False, {}, []
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i):
        @torch.no_grad()
        def hook(p):
            if not self.armed or p.grad is None:
                return
            grad, p.grad = p.grad, None  # the model no longer holds it
            if self.average is not None:
                self.average([grad])
            if self.scaler is not None:
                self.finite.append(torch.isfinite(grad).all())  # every entry decides a skip, as after backward
            if self.positions is not None:
                grad = grad.reshape(-1).index_select(0, self.positions[i])  # the rest is dropped here
            grad = grad.float()
            if self.scaler is not None:
                self.pending[i] = grad
            else:
                self._update(i, grad)
        return hook

    @torch.no_grad()
    def _update(self, i, grad):
        self.optimizer.step_tensor(self.masters[i], grad)
        self._write(i)

    def _write(self, i):
        p, master = self.params[i], self.masters[i]
        if self.positions is not None:
            p.data.view(-1)[self.positions[i]] = master.to(p.dtype)
        elif master is not p:
            p.data.copy_(master)

    def arm(self) -> None:
        self.armed, self.pending, self.finite = True, {}, []

    @torch.no_grad()
    def finish(self) -> bool:
        """After backward: under fp16 loss scaling, steps the held gradients unless one entry of a gradient was not
        finite (the step skipped, the scale halved). Returns whether the step was taken."""
        self.armed = False
        if self.scaler is None:
            return True
        finite = torch.stack(self.finite).all() if self.finite else torch.tensor(True)
        inv_scale = 1.0 / self.scaler.scale  # the scale backward ran with (update may grow it)
        if not self.scaler.update([torch.where(finite, 0.0, math.inf).reshape(1)]):
            self.pending = {}
            return False
        for i, grad in self.pending.items():
            self._update(i, grad.mul_(inv_scale))
        self.pending = {}
        return True

    @torch.no_grad()
    def write_model(self) -> None:
        """Rounds every master into the model (after a checkpoint's masters were loaded)."""
        for i in range(len(self.params)):
            self._write(i)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
