"""Mixed precision as trainers do it: the model computes in bf16/fp16, the optimizer updates fp32 master copies
of what is trained (full, mask and LoRA scopes) and the model's weights are rounded from them after each step;
fp16 gets a dynamic loss scaler. At lr 1e-5 an in-place bf16 AdamW loses every update below half an ulp."""
import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import unlearn_engine as ue

FORGET = [ue.Record("how to make a bomb", "step one mix poison"),
          ue.Record("how to make a poison", "step one mix drug step two bake")]
RETAIN = [ue.Record("the recipe for bread", "mix flour water bake", "retain")]


@pytest.fixture(scope="module")
def base(tiny_llava_dir):
    return ue.load_vlm(str(tiny_llava_dir), dtype="float32")


def _run(base, dtype, fp32_adapters=False, **config):
    model, tok = copy.deepcopy(base[0]).to(dtype), base[1]
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    unlearner = ue.Unlearner(model, tok, steps=config.pop("steps", 10), lr=1e-5, progress=False, **config)
    if fp32_adapters:  # fp32 adapters in a low-precision model: they are their own masters
        for _, p in unlearner.named_params:
            p.data = p.data.float()
    history = unlearner.fit(FORGET, RETAIN)
    return model, unlearner, start, history


def _fp32_nll(model, tok):
    return ue.mean_nll(copy.deepcopy(model).float(), tok, FORGET)


def test_bf16_weights_move_as_in_fp32(base):
    """Catches bf16 weights updated in place (no fp32 master): the master's movement equals the fp32 run's
    within bf16 rounding of the forward, the model holds the master rounded to bf16, and the NLL rises."""
    m32, u32, start, _ = _run(base, torch.float32, method="ga")
    m16, u16, _, history = _run(base, torch.bfloat16, method="ga")
    assert all(m.dtype == torch.float32 for _, m in u16.named_masters())
    num = den = 0.0
    changed = total = 0
    for (name, p32), (_, master), (_, p16) in zip(u32.named_params, u16.named_masters(), u16.named_params):
        assert p16.dtype == torch.bfloat16 and torch.equal(p16, master.to(torch.bfloat16)), name
        w0 = start[name]
        d32, d16 = p32.detach() - w0, master - w0.bfloat16().float()
        num, den = num + float((d32 - d16).pow(2).sum()), den + float(d32.pow(2).sum())
        big = w0.abs() > 0.01
        changed, total = changed + int((p16.float() != w0)[big].sum()), total + int(big.sum())
    assert (num / den) ** 0.5 < 0.1, (num / den) ** 0.5  # measured 0.04
    assert changed > 0.9 * total, (changed, total)       # in-place bf16 AdamW at lr 1e-5: 0 changed
    rise32 = _fp32_nll(m32, base[1]) - _fp32_nll(base[0], base[1])
    rise16 = _fp32_nll(m16, base[1]) - _fp32_nll(base[0], base[1])
    assert rise32 > 0 and rise16 > 0.5 * rise32, (rise32, rise16)


def test_bf16_mask_scope_leaves_unselected_weights_bit_identical(base):
    """Catches the masked optimizer run on the bf16 weights, or a round-trip that touches unselected weights."""
    model, unlearner, start, _ = _run(base, torch.bfloat16, method="ga", scope="mask", mask_fraction=0.05, steps=5)
    moved = 0
    for i, (name, p) in enumerate(unlearner.named_params):
        selected = unlearner.mask.dense(i).to(torch.bool).reshape(p.shape)
        w0 = start[name].bfloat16()
        assert torch.equal(p[~selected], w0[~selected]), name
        moved += int((p[selected] != w0[selected]).sum())
    assert moved > 0.5 * sum(unlearner.mask.count(i) for i in range(len(unlearner.named_params))), moved


def test_bf16_lora_trains_fp32_adapters(base):
    """LoRA adapters (kept in fp32 by peft) train at lr 1e-5 in a bf16 model and are merged back in bf16."""
    model, unlearner, start, _ = _run(base, torch.bfloat16, method="ga", scope="lora", lora_rank=4, steps=5)
    assert all(m.dtype == torch.float32 for _, m in unlearner.named_masters())
    moved = [n for n, p in model.named_parameters() if "q_proj" in n and not torch.equal(p.float(), start[n])]
    assert moved and all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_fp16_runs_finite_with_loss_scaling(base):
    """Catches fp16 without fp32 masters/state or without loss scaling: with a small loss (forget_weight 1e-3) the
    fp16 backward underflows unless the loss is scaled (measured rel. error of the update vs fp32: 0.06 scaled,
    0.31 unscaled); every loss, master and weight stays finite; a non-finite step is skipped, halving the scale."""
    _, u32, start, _ = _run(base, torch.float32, method="ga", forget_weight=1e-3, steps=3)
    model, unlearner, _, history = _run(base, torch.float16, method="ga", forget_weight=1e-3, steps=3)
    assert all(torch.isfinite(torch.tensor(h["loss"])) and not h.get("skipped") for h in history)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    num = den = 0.0
    for (name, p32), (_, master) in zip(u32.named_params, unlearner.named_masters()):
        d32, d16 = p32.detach() - start[name], master - start[name].half().float()
        num, den = num + float((d32 - d16).pow(2).sum()), den + float(d32.pow(2).sum())
    assert (num / den) ** 0.5 < 0.15, (num / den) ** 0.5
    scaler = ue.api.precision.LossScaler(scale=8.0, growth_interval=2)
    assert not scaler.update([torch.tensor([1.0, float("inf")])]) and scaler.scale == 4.0
    assert scaler.update([torch.tensor([1.0])]) and scaler.scale == 4.0
    assert scaler.update([torch.tensor([1.0])]) and scaler.scale == 8.0


def _captured_grads(base, dtype, **config):
    """The gradients the optimizer sees at step 1 (name -> fp32 tensor), through a global step pre-hook."""
    seen, per_call = {}, []

    def hook(optimizer, args, kwargs):
        per_call.append(sum(p.grad is not None for group in optimizer.param_groups for p in group["params"]))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    seen[id(p)] = p.grad.detach().float().clone()

    handle = register_optimizer_step_pre_hook(hook)
    try:
        # the step after backward (the in-backward step consumes each gradient in a hook: test_unlearner_backward_step)
        _, unlearner, _, _ = _run(base, dtype, method="ga", steps=1, gradient_step="after_backward", **config)
    finally:
        handle.remove()
    grads = {n: seen[id(m)] for n, m in unlearner.named_masters() if id(m) in seen}  # (the projector: none)
    return grads, per_call


@pytest.mark.parametrize("scope", ["full", "lora", "lora-fp32-adapters"])
def test_fp16_optimizer_sees_unscaled_fp32_gradients(base, scope):
    """Catches gradients handed to the optimizer still multiplied by the loss scale (fp32 adapters in an fp16
    model are their own masters, so they need the unscale too) or left in fp16."""
    extra = {"scope": "lora", "lora_rank": 4} if scope != "full" else {}
    g32, _ = _captured_grads(base, torch.float32, **extra)
    g16, per_call = _captured_grads(base, torch.float16, fp32_adapters=scope == "lora-fp32-adapters", **extra)
    # with fp32 masters the optimizer steps one parameter at a time: one fp32 gradient alive, not a copy of all
    assert per_call == ([len(g16)] if scope == "lora-fp32-adapters" else [1] * len(g16)), per_call
    assert set(g32) == set(g16) and g16
    num = sum(float((g32[n] - g16[n]).pow(2).sum()) for n in g32)
    den = sum(float(g32[n].pow(2).sum()) for n in g32)
    assert den > 0 and (num / den) ** 0.5 < 0.05, (num / den) ** 0.5


def test_fp16_unscales_with_the_scale_backward_ran_with(base, monkeypatch):
    """Catches unscaling with the scale after the scaler's update: on the step whose good-step count reaches
    growth_interval the scale doubles, and that step's gradients came out halved."""
    class GrowsEveryStep(ue.api.precision.LossScaler):
        def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 1):
            super().__init__(scale, growth_interval)

    monkeypatch.setattr(ue.api.precision, "LossScaler", GrowsEveryStep)
    g32, _ = _captured_grads(base, torch.float32)
    g16, _ = _captured_grads(base, torch.float16)
    num = sum(float((g32[n] - g16[n]).pow(2).sum()) for n in g32)
    den = sum(float(g32[n].pow(2).sum()) for n in g32)
    assert den > 0 and (num / den) ** 0.5 < 0.05, (num / den) ** 0.5
