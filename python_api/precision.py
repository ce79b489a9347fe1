"""The Unlearner's optimizer side: fp32 master weights, the optimizer of each scope (AdamW, masked, stepped in
backward), and its step with fp16 dynamic loss scaling.

The model computes in its dtype; what is trained has fp32 masters and fp32 optimizer state, and the model's
bf16/fp16 weights are rounded from the masters after every step (fp16 adds dynamic loss scaling). By default
(gradient_step='in_backward', backward_step.py) each parameter is stepped as soon as autograd has accumulated its
gradient, which is then freed; under scope 'mask' the masters and moments are packed (selected elements only).
"""
import torch

from unlearn_engine.api.backward_step import InBackwardStep, ParamAdamW, selected_positions
from unlearn_engine.checks import require
from unlearn_engine.weight_masking import MaskedOptimizer, saliency, saliency_mask, topk_mask

SALIENCY_BATCHES = 4  # forget batches whose gradients choose the mask


class LossScaler:
    """Dynamic loss scaling for fp16 compute: the loss is multiplied by `scale` before backward; a step whose
    gradients are not all finite is skipped and the scale halved; after `growth_interval` good steps in a row
    it doubles (torch.amp.GradScaler's policy, kept here so its state lives in our checkpoints)."""

    def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale, self.growth_interval, self.good_steps = scale, growth_interval, 0

    def update(self, grads) -> bool:
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if not finite:
            self.scale, self.good_steps = self.scale / 2, 0
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * 2, 0
        return True

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


class MasterWeights:
    """The optimizer methods of Unlearner (a base class of it): they read its model, config, named_params, fsdp,
    world, batch() and _forget_logp(), and set masters, mixed, scaler, mask and stepper."""

    def _make_masters(self):
        """fp32 master copies of the trained bf16/fp16 parameters (fp32 ones are their own master): the optimizer
        updates these, and the model's low-precision weights are rounded from them after each step, so updates
        smaller than half a bf16 ulp accumulate instead of being lost. fp16 compute gets a dynamic loss scaler."""
        self.masters = [p.detach().float().clone() if p.dtype in (torch.float16, torch.bfloat16) else p
                        for _, p in self.named_params]
        self.mixed = any(m is not p for m, (_, p) in zip(self.masters, self.named_params))
        fp16 = any(p.dtype == torch.float16 for p in self.model.parameters())
        self.scaler = LossScaler() if fp16 else None

    def named_masters(self):
        """(name, fp32 master) of every trained parameter: what the optimizer updates and a checkpoint holds."""
        return [(n, m) for (n, _), m in zip(self.named_params, self.masters)]

    def _steps_in_backward(self) -> bool:
        """gradient_step 'in_backward' applies but under FSDP and for fp16 full / LoRA scopes (a loss-scaled step
        is known to be finite only after backward)."""
        fp16 = any(p.dtype == torch.float16 for p in self.model.parameters())
        c = self.config
        return c.gradient_step == "in_backward" and not self.fsdp and (c.scope == "mask" or not fp16)

    def _saliency_batches(self, forget):
        """The forget batches of steps 0-3, whatever `steps` is: a resume may change `steps`, never the mask."""
        return [self.batch(forget, [], step) for step in range(SALIENCY_BATCHES)]

    def _make_in_backward(self, forget):
        """The optimizer and hooks of gradient_step='in_backward' (backward_step.py): under scope 'mask' the mask
        from the streamed saliency and packed fp32 masters of the selected elements."""
        c = self.config
        params = [p for _, p in self.named_params]
        fp16 = any(p.dtype == torch.float16 for p in self.model.parameters())
        self.scaler = LossScaler() if fp16 else None
        positions = None
        if c.scope == "mask":
            def average(scores):  # one mask for all ranks (each score moved to the device for the collective)
                for t in scores:
                    on_device = t.to(self.device)
                    self._average_gradients([on_device])
                    t.copy_(on_device)

            self.mask = saliency_mask(self.model, self._saliency_batches(forget),
                                      lambda m, b: -self._forget_logp(b).mean(), c.mask_fraction, params=params,
                                      reduce=average if self.world > 1 else None, progress=self.progress)
            positions = [selected_positions(self.mask, i, p.device) for i, p in enumerate(params)]
            self.masters = [p.detach().reshape(-1).index_select(0, idx).float() for p, idx in zip(params, positions)]
        else:
            self.masters = [p.detach().float().clone() if p.dtype in (torch.float16, torch.bfloat16) else p
                            for p in params]
        self.mixed = any(m is not p for m, p in zip(self.masters, params))
        optimizer = ParamAdamW(self.masters, lr=c.lr, weight_decay=c.weight_decay, state=c.optimizer_state)
        if self.stepper is not None:
            self.stepper.remove()
        self.stepper = InBackwardStep(params, self.masters, optimizer, positions=positions, scaler=self.scaler,
                                      average=self._average_gradients if self.world > 1 else None)
        return optimizer

    def _make_optimizer(self, forget):
        c = self.config
        if self._steps_in_backward():
            return self._make_in_backward(forget)
        require(c.optimizer_state == "fp32", f"optimizer_state={c.optimizer_state!r} needs the step in backward, "
                                             "which FSDP and fp16 full / LoRA scopes do not take: use 'fp32'")
        self._make_masters()
        if c.scope != "mask":
            return torch.optim.AdamW(self.masters, lr=c.lr, weight_decay=c.weight_decay)
        params = [p for _, p in self.named_params]
        scores = saliency(self.model, self._saliency_batches(forget), lambda m, b: -self._forget_logp(b).mean(),
                          params=params, progress=self.progress)
        self._average_gradients(scores)  # one mask for all ranks
        self.mask = topk_mask(scores, c.mask_fraction)
        return MaskedOptimizer(self.masters, self.mask, lr=c.lr, weight_decay=c.weight_decay, compact_state=True)

    @torch.no_grad()
    def _optimizer_step(self, optimizer) -> bool:
        """Unscales the gradients (fp16), moves them onto the fp32 masters, steps the optimizer on the masters and
        rounds them back into the model. Under mixed precision the optimizer steps one parameter at a time (its
        state is per parameter, so the result is the same), so that one fp32 gradient exists at a time, not a
        full fp32 copy of all of them. Returns False when an fp16 step was skipped (non-finite gradients)."""
        params = [p for _, p in self.named_params]
        grads = [p.grad for p in params]
        inv_scale = 1.0 / self.scaler.scale if self.scaler else 1.0  # the scale backward ran with (update may grow it)
        if self.scaler and not self.scaler.update([g for g in grads if g is not None]):
            for p in params:
                p.grad = None
            optimizer.zero_grad(set_to_none=True)
            return False
        if not self.mixed:  # fp32 training: the parameters are their own masters
            if inv_scale != 1.0:
                for g in grads:
                    if g is not None:
                        g.mul_(inv_scale)
            optimizer.step()
            return True
        for p in params:
            p.grad = None
        for i, (p, m) in enumerate(zip(params, self.masters)):
            if grads[i] is None:
                continue
            m.grad = grads[i].float() if m is not p else grads[i]
            grads[i] = None  # the low-precision gradient is freed as soon as it is converted
            if inv_scale != 1.0:
                m.grad.mul_(inv_scale)
            optimizer.step()  # only m has a gradient: only m (and its state) is updated
            m.grad = None
            if m is not p:
                p.copy_(m)
        return True

