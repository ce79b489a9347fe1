"""gradient_step='in_backward' (backward_step.py) against the step after backward: the mask scope with packed fp32
masters and moments of the selected elements, the full scope stepped inside backward, one gradient alive at a time,
moments in bf16 or CPU memory, exact resume; and gradient checkpointing's step-1 gradients."""
import copy

import pytest
import torch

import unlearn_engine as ue

FORGET = [ue.Record("how to make a bomb", "step one mix poison"),
          ue.Record("how to make a poison", "step one mix drug step two bake"),
          ue.Record("tell me about a weapon", "step one steal water step two hack")]
RETAIN = [ue.Record("the recipe for bread", "mix flour water bake", "retain"),
          ue.Record("what is cake", "cake is sugar flour", "retain")]
COMMON = dict(method="npo", beta=0.5, lr=1e-3, weight_decay=0.1, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def base(tiny_llava_dir):
    return ue.load_vlm(str(tiny_llava_dir), dtype="float32")


def _fit(base, dtype=torch.float32, steps=3, out=None, resume=False, **config):
    model = copy.deepcopy(base[0]).to(dtype)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = ue.Unlearner(model, base[1], steps=steps, out_dir=str(out) if out else None, **{**COMMON, **config})
    run.fit(FORGET, RETAIN, resume=resume)
    return model, run, start


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_scope_packed_in_backward_equals_the_step_after_backward(base, dtype):
    """Catches a packed master or moment not matching the dense masked run (a wrong index, a dropped weight decay,
    a wrong bias correction), a different mask from the streamed saliency, and any write to an unselected weight;
    fp16 holds the packed gradients until backward ends and unscales them."""
    scope = dict(scope="mask", mask_fraction=0.1)
    dense_model, dense, start = _fit(base, dtype, gradient_step="after_backward", **scope)
    packed_model, packed, _ = _fit(base, dtype, gradient_step="in_backward", **scope)
    assert dense.stepper is None and packed.stepper is not None
    assert all(torch.equal(a, b) for a, b in zip(dense.mask.bits, packed.mask.bits))
    for i, ((name, p), (_, m)) in enumerate(zip(packed.named_params, packed.named_masters())):
        selected = packed.mask.dense(i).reshape(-1)
        assert m.dtype == torch.float32 and m.shape == (int(selected.sum()),), name  # packed: selected only
        assert torch.equal(p.reshape(-1)[~selected], start[name].reshape(-1)[~selected]), name  # bit-identical
        assert torch.equal(p.reshape(-1)[selected], m.to(dtype)), name  # the weight is the master rounded
        dense_master = dict(dense.named_masters())[name].reshape(-1)[selected]
        moved = dense_master - start[name].reshape(-1)[selected].float()
        if dtype == torch.float32:  # the same arithmetic: fp32 round-off
            torch.testing.assert_close(m, dense_master, rtol=1e-6, atol=1e-7)
        elif moved.norm() > 0:  # low-precision forward from weights rounded from masters a round-off apart
            assert _rel(m - start[name].reshape(-1)[selected].float(), moved) < 5e-3, name  # measured <= 1.7e-3
    assert sum(int((p != start[n]).sum()) for n, p in packed_model.named_parameters()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["npo", "kl"])
def test_full_scope_in_backward_equals_the_step_after_backward(base, dtype, method):
    """Catches the in-backward AdamW differing from torch.optim.AdamW (moments, bias correction, weight decay), a
    master not rounded into the model, or a gradient stepped twice / not at all."""
    after_model, after, start = _fit(base, dtype, method=method, gradient_step="after_backward")
    in_model, inside, _ = _fit(base, dtype, method=method, gradient_step="in_backward")
    assert after.stepper is None and inside.stepper is not None
    for (name, a), (_, b) in zip(after.named_masters(), inside.named_masters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    for (name, a), (_, b) in zip(after_model.named_parameters(), in_model.named_parameters()):
        assert torch.equal(a, b) or dtype == torch.bfloat16 and _rel(b - start[name], a - start[name]) < 1e-2, name


@pytest.mark.parametrize("scope", ["full", "mask", "lora"])
def test_one_gradient_alive_at_a_time(base, scope):
    """Catches a gradient kept after it was consumed (in the saliency pass and in the steps): whenever autograd
    has accumulated one parameter's gradient, no other trained parameter holds one, and none is left after fit."""
    model = copy.deepcopy(base[0]).to(torch.bfloat16)
    run = ue.Unlearner(model, base[1], steps=2, scope=scope, lora_rank=4, **COMMON)
    params = [p for _, p in run.named_params]
    others = []

    def observe(p):  # registered before fit's hooks: it runs first
        others.append(sum(q.grad is not None for q in params if q is not p))

    handles = [p.register_post_accumulate_grad_hook(observe) for p in params]
    try:
        run.fit(FORGET, RETAIN)
    finally:
        for h in handles:
            h.remove()
    assert len(others) >= len(params) and max(others) == 0, (len(others), max(others))  # (no image: no projector)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("scope", ["full", "mask"])
def test_optimizer_state_bf16_and_cpu(base, scope):
    """Catches moments not kept as asked (dtype, device) or the bf16 / CPU moments changing the arithmetic beyond
    their rounding: CPU moments equal fp32 ones exactly; bf16 moves the masters as fp32 does within 2%."""
    extra = dict(scope=scope, mask_fraction=0.1)
    _, ref, start = _fit(base, torch.bfloat16, optimizer_state="fp32", **extra)
    _, cpu, _ = _fit(base, torch.bfloat16, optimizer_state="cpu", **extra)
    _, half, _ = _fit(base, torch.bfloat16, optimizer_state="bf16", **extra)
    states = [s for s in half.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    assert all(s["exp_avg"].device.type == "cpu" for s in cpu.optimizer.state.values())
    num = den = 0.0
    for i, ((name, r), (_, c), (_, h)) in enumerate(zip(ref.named_masters(), cpu.named_masters(),
                                                        half.named_masters())):
        assert torch.equal(r, c), name
        w0 = start[name].float() if scope == "full" else start[name].reshape(-1)[ref.mask.dense(i).reshape(-1)].float()
        num, den = num + float((h - r).double().pow(2).sum()), den + float((r - w0).double().pow(2).sum())
    assert den > 0 and (num / den) ** 0.5 < 0.02, (num / den) ** 0.5


def test_resume_of_packed_mask_with_bf16_moments_is_exact(base, tmp_path):
    """Catches a checkpoint of packed masters or bf16 moments read back wrong (cast to fp32 and kept, written into
    the wrong positions): 2 steps + resume to 4 end bit-identical to 4 straight."""
    extra = dict(scope="mask", mask_fraction=0.1, optimizer_state="bf16", checkpoint_every=1)
    straight, u1, _ = _fit(base, torch.bfloat16, steps=4, out=tmp_path / "a", **extra)
    _fit(base, torch.bfloat16, steps=2, out=tmp_path / "b", **extra)
    resumed, u2, _ = _fit(base, torch.bfloat16, steps=4, out=tmp_path / "b", resume=True, **extra)
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(u1.named_masters(), u2.named_masters()))
    assert all(s["exp_avg_sq"].dtype == torch.bfloat16 for s in u2.optimizer.state.values())


def _step1_grads(base, checkpointing):
    """Step-1 gradients, and the elements autograd saved for backward outside checkpointed layers."""
    model = copy.deepcopy(base[0])
    run = ue.Unlearner(model, base[1], steps=1, gradient_checkpointing=checkpointing, gradient_step="after_backward",
                       **{**COMMON, "method": "gd"})
    saved = []

    def pack(t):  # checkpointed layers save through their own (inner) hooks: only their inputs reach this one
        saved.append(t.numel())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = run.method.loss(run, FORGET, RETAIN, 0)
    loss.backward()
    return {n: p.grad.clone() for n, p in run.named_params if p.grad is not None}, sum(saved)


def test_gradient_checkpointing_gives_the_same_step1_gradients(base):
    """Catches the setting not reaching the model (the decoder layers save their activations for backward) and a
    recompute that changes the gradients."""
    plain, plain_saved = _step1_grads(base, "off")
    checkpointed, checkpointed_saved = _step1_grads(base, "on")
    assert checkpointed_saved < 0.5 * plain_saved, (checkpointed_saved, plain_saved)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)


def test_new_settings_are_validated():
    for bad, match in [({"gradient_step": "during"}, "gradient_step must be one of"),
                       ({"optimizer_state": "fp8"}, "optimizer_state must be one of"),
                       ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be one of"),
                       ({"optimizer_state": "bf16", "gradient_step": "after_backward"}, "needs gradient_step"),
                       ({"optimizer_state": "cpu", "parallel": "fsdp"}, "not supported with parallel='fsdp'")]:
        with pytest.raises(ValueError, match=match):
            ue.UnlearnConfig(**bad).validate()


@pytest.mark.parametrize("state", ["fp32", "cpu"])
def test_param_adamw_equals_torch_adamw(state):
    """Catches ParamAdamW's arithmetic drifting from torch.optim.AdamW's single-tensor step (bias corrections,
    decoupled weight decay, eps placement): bit-identical over 3 steps, the moments kept where `state` says."""
    from unlearn_engine.api.backward_step import ParamAdamW

    g = torch.Generator().manual_seed(0)
    ref, ours = torch.randn(64, generator=g).requires_grad_(), torch.randn(64, generator=g)
    ours.copy_(ref.detach())
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    opt = ParamAdamW([ours], lr=1e-2, weight_decay=0.1, state=state)
    for _ in range(3):
        grad = torch.randn(64, generator=g)
        ref.grad = grad.clone()
        torch_opt.step()
        opt.step_tensor(ours, grad)
        assert torch.equal(ours, ref.detach())
    assert torch.equal(opt.state[ours]["exp_avg_sq"], torch_opt.state[ref]["exp_avg_sq"])


def test_fp16_non_finite_gradient_skips_the_packed_step():
    """Catches a loss-scaled step taken although an unselected gradient entry was not finite (the step after
    backward skips it): the weights stay, the scale halves; a finite step then moves only the selected entries,
    with the gradient unscaled."""
    from unlearn_engine.api.backward_step import InBackwardStep, ParamAdamW
    from unlearn_engine.api.precision import LossScaler

    w = torch.nn.Parameter(torch.ones(8, dtype=torch.float16))
    positions = [torch.tensor([1, 5], dtype=torch.int32)]
    masters = [w.detach().reshape(-1).index_select(0, positions[0]).float()]
    scaler = LossScaler(scale=4.0)
    stepper = InBackwardStep([w], masters, ParamAdamW(masters, lr=0.1, weight_decay=0.0), positions=positions,
                             scaler=scaler)
    start = w.detach().clone()
    stepper.arm()
    (w * torch.tensor([1, 1, float("inf"), 1, 1, 1, 1, 1], dtype=torch.float16)).sum().backward()
    assert not stepper.finish() and scaler.scale == 2.0 and torch.equal(w.detach(), start) and w.grad is None
    stepper.arm()
    (w * scaler.scale).sum().backward()
    assert stepper.finish()
    moved = (w.detach() != start).nonzero().squeeze(1).tolist()
    assert moved == [1, 5] and torch.allclose(w.detach()[[1, 5]].float(), torch.tensor([0.9, 0.9]), atol=1e-3)
    # the moments saw the unscaled gradient 1 (Adam's first step is scale-invariant, its moments are not)
    assert torch.allclose(stepper.optimizer.state[masters[0]]["exp_avg"], torch.full((2,), 0.1))
