"""Top-k masks vs a sorting reference; masked AdamW / SGD vs torch.optim with restore."""
import math

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.reference import masked_step_reference, topk_mask_reference

from conftest import DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_valid_selection(tensors, mask, fraction, scope):
    dense = [mask.dense(i) for i in range(len(tensors))]
    groups = [list(range(len(tensors)))] if scope == "global" else [[i] for i in range(len(tensors))]
    for group in groups:
        n = sum(tensors[i].numel() for i in group)
        k = ue.weight_masking.selection_count(fraction, n)
        chosen = torch.cat([tensors[i].float().abs().reshape(-1)[dense[i].reshape(-1)] for i in group])
        rest = torch.cat([tensors[i].float().abs().reshape(-1)[~dense[i].reshape(-1)] for i in group])
        assert chosen.numel() == k, (chosen.numel(), k)
        if chosen.numel() and rest.numel():
            assert chosen.min() >= rest.max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("sizes", [[(1,)], [(7,)], [(1000003,)], [(3, 5), (1,), (17, 33), (2, 3, 4), (70001,)]])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 1.0])
def test_topk_matches_sorting_reference(device, dtype, scope, sizes, fraction):
    tensors = [torch.randn(*s).to(device, dtype) for s in sizes]
    mask = ue.topk_mask(tensors, fraction, scope=scope)
    expected = topk_mask_reference(tensors, fraction, scope)
    for i, want in enumerate(expected):
        assert torch.equal(mask.dense(i), want), f"tensor {i}"
    assert mask.count() == sum(int(w.sum()) for w in expected)
    assert_valid_selection(tensors, mask, fraction, scope)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["all_equal", "half_zeros", "few_levels", "signed_ties"])
def test_topk_heavy_ties_are_deterministic(device, dtype, kind):
    g = torch.Generator().manual_seed(3)
    sizes = [(1000,), (333,), (70000,)]
    if kind == "all_equal":
        tensors = [torch.full(s, 0.25) for s in sizes]
    elif kind == "half_zeros":
        tensors = [torch.randn(*s, generator=g) * (torch.rand(*s, generator=g) < 0.5) for s in sizes]
    elif kind == "few_levels":
        tensors = [torch.randint(0, 4, s, generator=g).float() for s in sizes]
    else:
        tensors = [torch.randint(-2, 3, s, generator=g).float() for s in sizes]
    tensors = [t.to(device, dtype) for t in tensors]
    for scope in ("global", "per_tensor"):
        for fraction in (0.01, 0.3, 0.77):
            mask = ue.topk_mask(tensors, fraction, scope=scope)
            expected = topk_mask_reference(tensors, fraction, scope)
            for i, want in enumerate(expected):
                assert torch.equal(mask.dense(i), want), (scope, fraction, i)
            again = ue.topk_mask(tensors, fraction, scope=scope)
            assert all(torch.equal(a, b) for a, b in zip(mask.bits, again.bits))


def test_selection_count_is_robust_to_float_rounding():
    assert ue.weight_masking.selection_count(0.1, 30) == 3
    assert ue.weight_masking.selection_count(0.05, 1000003) == 50001
    assert ue.weight_masking.selection_count(1.0, 7) == 7
    assert ue.weight_masking.selection_count(1e-9, 7) == 1


def test_mask_apply_save_load(tmp_path):
    tensors = [torch.randn(4, 6), torch.randn(11)]
    mask = ue.topk_mask(tensors, 0.3)
    grads = [torch.ones(4, 6), torch.ones(11)]
    mask.apply_(grads)
    assert sum(int(g.sum()) for g in grads) == mask.count() == math.ceil(0.3 * 35)
    path = tmp_path / "mask.safetensors"
    mask.save(str(path))
    loaded = ue.Mask.load(str(path))
    assert loaded.shapes == mask.shapes and all(torch.equal(a, b) for a, b in zip(loaded.bits, mask.bits))
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("args,kwargs,match", [
    (([torch.randn(3)], 0.0), {}, r"fraction must be a number in \(0, 1\]"),
    (([torch.randn(3)], 1.5), {}, "fraction must be"),
    (([], 0.5), {}, "tensors must be a non-empty list"),
    (([torch.randn(3), torch.randn(3).double()], 0.5), {}, "tensors must share one dtype and device"),
    (([torch.randn(3).long()], 0.5), {}, "tensors must be float32, float16 or bfloat16"),
    (([torch.randn(3)], 0.5), {"scope": "layer"}, "scope must be 'global' or 'per_tensor'"),
    (([torch.tensor([1.0, float("nan"), 2.0])], 0.5), {}, "NaN"),
])
def test_topk_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ue.topk_mask(*args, **kwargs)


def _params(device, sizes=((64, 33), (7,), (3, 5, 9)), dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(*s, generator=g).to(device, dtype) for s in sizes]


def _step_against_torch(device, fraction, scope, make_torch, make_ours, steps=5):
    """5 steps of ours vs the torch optimizer with unselected elements restored after each step: equal on the
    selected elements, bit for bit untouched elsewhere."""
    params = _params(device)
    mask = ue.topk_mask([torch.randn_like(p) for p in params], fraction, scope=scope)
    dense_masks = [mask.dense(i) for i in range(len(params))]
    ref = [p.clone().requires_grad_() for p in params]
    ours = [p.clone() for p in params]
    torch_opt, opt = make_torch(ref), make_ours(ours, mask)
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in params]
        for r, o, g in zip(ref, ours, grads):
            r.grad, o.grad = g.clone(), g.clone()
        before = [o.clone() for o in ours]
        opt.step()
        masked_step_reference(torch_opt, ref, dense_masks)
        for r, o, b, m in zip(ref, ours, before, dense_masks):
            torch.testing.assert_close(o[m], r.detach()[m], rtol=1e-6, atol=1e-6)
            assert torch.equal(o[~m], b[~m])  # bit for bit untouched
    return ref, ours, dense_masks, torch_opt, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compact", [False, True])
def test_masked_adamw_matches_torch_with_restore(device, compact):
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ref, ours, dense_masks, torch_opt, opt = _step_against_torch(
        device, 0.2, "per_tensor", lambda p: torch.optim.AdamW(p, foreach=False, **kw),
        lambda p, mask: ue.MaskedOptimizer(p, mask, compact_state=compact, **kw))
    for r, o, m in zip(ref, ours, dense_masks):
        state, ref_state = opt.state[o], torch_opt.state[r]
        if compact:
            assert state["exp_avg"].numel() == int(m.sum())
            torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"][m], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(state["exp_avg"][~m], torch.zeros_like(state["exp_avg"][~m]))
            torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [(0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.05),
                                                           (0.9, 0.1, False, 0.0), (0.8, 0.0, True, 0.01)])
@pytest.mark.parametrize("compact", [False, True])
def test_masked_sgd_matches_torch_with_restore(device, momentum, dampening, nesterov, wd, compact):
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)
    _step_against_torch(device, 0.3, "global", lambda p: torch.optim.SGD(p, foreach=False, **kw),
                        lambda p, mask: ue.MaskedOptimizer(p, mask, algorithm="sgd", compact_state=compact, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_state_equals_dense_state(device):
    params = _params(device, dtype=torch.bfloat16)
    mask = ue.topk_mask(params, 0.1)
    a, b = [p.clone() for p in params], [p.clone() for p in params]
    opt_a, opt_b = ue.MaskedOptimizer(a, mask), ue.MaskedOptimizer(b, mask, compact_state=True)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        opt_a.step(), opt_b.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert opt_b.state_bytes() < opt_a.state_bytes() * 0.2


def test_masked_optimizer_bad_input():
    params = _params("cpu")
    mask = ue.topk_mask(params, 0.1)
    with pytest.raises(ValueError, match=r"mask was built for shape \(64, 33\) at position 0"):
        ue.MaskedOptimizer([torch.randn(3, 3)] + params[1:], mask)
    with pytest.raises(ValueError, match="mask was built for 3 tensors"):
        ue.MaskedOptimizer(params[:2], mask)
    opt = ue.MaskedOptimizer(params, mask)
    for p in params:
        p.grad = torch.randn_like(p)
    unselected = (~mask.dense(2)).reshape(-1).nonzero()[0]
    params[2].grad.view(-1)[unselected] = float("nan")
    opt.step()  # a NaN the mask never reads is harmless
    assert not params[2].isnan().any()
    params[2].grad.view(-1)[mask.indices(2)[0]] = float("inf")
    with pytest.raises(FloatingPointError, match=r"grads\[2\] contain NaN or Inf"):
        opt.step()
    with pytest.raises(ValueError, match="step must be >= 1"):
        ue.masked_adamw_(params, [p.grad for p in params], params, params, mask, step=0, lr=0.1)


def test_saliency_accumulates_forget_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    batches = [torch.randn(6, 5) for _ in range(3)]
    loss_fn = lambda m, x: m(x).pow(2).mean()
    marker = torch.ones_like(model[0].weight)
    model[0].weight.grad = marker
    sal = ue.saliency(model, batches, loss_fn, progress=False)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for x in batches:
        for e, g in zip(expected, torch.autograd.grad(loss_fn(model, x), list(model.parameters()))):
            e += g
    for s, e in zip(sal, expected):
        torch.testing.assert_close(s, e.abs())
    assert model[0].weight.grad is marker  # the caller's gradients are restored


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_topk_heavy_ties_beyond_the_fast_path_budget(device, scope):
    """Over 1M elements sharing the threshold digit: the CPU takes the general radix path; same answer."""
    g = torch.Generator().manual_seed(5)
    tensors = [torch.full((1_500_000,), 0.5), torch.randn(600_000, generator=g), torch.full((7,), 0.5)]
    tensors = [t.to(device) for t in tensors]
    for fraction in (0.3, 0.9):
        mask = ue.topk_mask(tensors, fraction, scope=scope)
        for i, want in enumerate(topk_mask_reference(tensors, fraction, scope)):
            assert torch.equal(mask.dense(i), want), (fraction, i)
