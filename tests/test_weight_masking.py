"""Top-k masks vs a sorting reference; masked AdamW / SGD vs torch.optim with restore."""
import math

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.reference import masked_step_reference, topk_mask_reference

from conftest import DEVICES, assert_masked_steps_match_torch, is_sim

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# The top-k schemes (csrc/weight_masking/topk_mask.h): the CPU's two-pass, the GPU's two-pass driver on plain CPU
# kernels, and the radix passes (the heavy-ties path of both). On a GPU only "gpu" runs (the others are CPU choices).
@pytest.fixture(params=["two-pass", "gpu", "radix"])
def scheme(request, monkeypatch):
    monkeypatch.setenv("UE_TOPK_CPU_SCHEME", request.param)
    return request.param


def cpu_choice(device, scheme):
    if (device == "cuda" or is_sim(device)) and scheme != "gpu":
        pytest.skip("UE_TOPK_CPU_SCHEME chooses among CPU schemes; CUDA (and its simulator) always runs the GPU's")


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
def test_topk_matches_sorting_reference(device, dtype, scope, sizes, fraction, scheme):
    cpu_choice(device, scheme)
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
def test_topk_heavy_ties_are_deterministic(device, dtype, kind, scheme):
    cpu_choice(device, scheme)
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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_topk_heavy_ties_beyond_the_fast_path_budget(device, dtype, scope, scheme):
    """Over 1M elements sharing the threshold digit: the CPU takes the general radix path (the GPU's path), which
    skips the digits a 16-bit key leaves zero; at fraction 0.9 the threshold lies among the random values, so
    every kept digit must be right."""
    cpu_choice(device, scheme)
    g = torch.Generator().manual_seed(5)
    tensors = [torch.full((1_500_000,), 0.5), torch.randn(600_000, generator=g), torch.full((7,), 0.5)]
    tensors = [t.to(device, dtype) for t in tensors]
    for fraction in (0.3, 0.9):
        mask = ue.topk_mask(tensors, fraction, scope=scope)
        for i, want in enumerate(topk_mask_reference(tensors, fraction, scope)):
            assert torch.equal(mask.dense(i), want), (fraction, i)


# ----------------------------------------------------------------------------- paths no other test reaches
def _raw_adamw(params, indices, **kw):
    grads = [torch.ones_like(p) for p in params]
    state = [torch.zeros_like(p) for p in params]
    ue.ops.masked_adamw_(params, grads, state, [s.clone() for s in state], indices, False, 0.1, 0.9, 0.999, 1e-8,
                         0.0, 1, **kw)


def _raw_sgd(params, indices, **kw):
    ue.ops.masked_sgd_(params, [torch.ones_like(p) for p in params], [], indices, False, 0.1, 0.0, 0.0, 0.0, False,
                       True, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [_raw_adamw, _raw_sgd])
@pytest.mark.parametrize("bad,match", [
    ([0, 5, 10], r"mask indices\[1\] must lie in \[0, 10\) \(the elements of params\[1\]\), got values from 0 to 10"),
    ([-1, 3], r"mask indices\[1\] must lie in \[0, 10\).*from -1 to 3"),
    ([2, 4, 4, 7], r"mask indices\[1\] holds index 4 twice \(positions 1 and 2\)"),
    ([2, 7, 4], r"mask indices\[1\] must be strictly increasing, got 7 at position 1 then 4"),
])
def test_raw_masked_ops_validate_indices(device, step, bad, match):
    """The raw ops check their index lists (range; sorted and without duplicates, which on CUDA would race on one
    element) before touching anything; the MaskedOptimizer path skips the check (its indices are valid by
    construction) and stays sync-free."""
    params = [torch.zeros(6, device=device), torch.zeros(10, device=device)]
    good = torch.tensor([1, 3], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=match):
        step(params, [good, torch.tensor(bad, dtype=torch.int32, device=device)])
    assert all(not p.any() for p in params)  # refused before any write
    step(params, [good, torch.tensor([0, 9], dtype=torch.int32, device=device)])  # valid lists pass
    assert params[1][0] != 0 and params[1][9] != 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
def test_masked_step_over_65536_indices_in_one_tensor(device, algorithm):
    """More selected elements in one tensor than one work item holds (65536): several blocks per tensor, the
    later items starting mid-list. Equal to torch.optim with restore on every element."""
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(150_001, generator=g).to(device), torch.randn(5, generator=g).to(device)]
    mask = ue.topk_mask([torch.randn(p.shape, generator=g).to(device) for p in params], 0.5, scope="per_tensor")
    assert mask.count(0) > 65536
    assert_masked_steps_match_torch(params, mask, algorithm, lambda p: torch.randn(p.shape, generator=g).to(device),
                                    compact=True, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
def test_low_precision_masked_step_vs_torch_optim(device, dtype, algorithm):
    """bf16 / fp16 parameters and state: the kernel does the step in fp32 and rounds once, so it is at least as
    close to torch.optim run in fp32 (on the same values) as torch.optim run in the low dtype is; unselected
    elements stay bit for bit."""
    g = torch.Generator().manual_seed(4)
    params = [torch.randn(257, 33, generator=g).to(device, dtype), torch.randn(1000, generator=g).to(device, dtype)]
    mask = ue.topk_mask([torch.randn(p.shape, generator=g).to(device) for p in params], 0.3)
    dense = [mask.dense(i) for i in range(2)]
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1) if algorithm == "adamw" else dict(
        lr=0.05, momentum=0.9, weight_decay=0.01)
    make = torch.optim.AdamW if algorithm == "adamw" else torch.optim.SGD
    ours = [p.clone() for p in params]
    low = [p.clone().requires_grad_() for p in params]
    exact = [p.float().requires_grad_() for p in params]
    opt = ue.MaskedOptimizer(ours, mask, algorithm=algorithm, **kw)
    opt_low, opt_exact = make(low, foreach=False, **kw), make(exact, foreach=False, **kw)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g).to(device, dtype) for p in params]
        before = [o.clone() for o in ours]
        for o, lo, ex, gr in zip(ours, low, exact, grads):
            o.grad, lo.grad, ex.grad = gr.clone(), gr.clone(), gr.float()
        opt.step()
        masked_step_reference(opt_low, low, dense)
        masked_step_reference(opt_exact, exact, dense)
        for o, b, m in zip(ours, before, dense):
            assert torch.equal(o[~m], b[~m])
    for o, lo, ex, m in zip(ours, low, exact, dense):
        err_ours = _rel_err(o[m], ex.detach()[m])
        err_torch = _rel_err(lo.detach()[m], ex.detach()[m])
        assert err_ours <= err_torch * 1.05 + 1e-6, (err_ours, err_torch)
        assert err_ours <= torch.finfo(dtype).eps, err_ours


def _rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
def test_topk_empty_tensors_and_zero_k_segments(device, scheme):
    """Empty tensors in the list and segments with k = 0 (per-tensor scope of an empty tensor, or k = 0 asked of
    the raw op): no bit set there, the others exact."""
    cpu_choice(device, scheme)
    tensors = [torch.randn(0, device=device), torch.randn(37, device=device), torch.randn(3, 0, device=device),
               torch.randn(70_000, device=device)]
    for scope in ("global", "per_tensor"):
        mask = ue.topk_mask(tensors, 0.3, scope=scope)
        assert mask.bits[0].numel() == 0 and mask.bits[2].numel() == 0
        for i, want in enumerate(topk_mask_reference(tensors, 0.3, scope)):
            assert torch.equal(mask.dense(i), want), (scope, i)
    flat = [t.reshape(-1) for t in tensors]
    bits = ue.ops.topk_mask(flat, [0, 0, 0, 5], True)
    assert [int(b.count_nonzero()) for b in bits[:3]] == [0, 0, 0]
    got = ue.Mask(bits, [t.shape for t in flat]).dense(3)
    assert torch.equal(got, topk_mask_reference([flat[3]], 5 / 70_000)[0])
    bits = ue.ops.topk_mask(flat, [0], False)  # global k = 0
    assert all(int(b.count_nonzero()) == 0 for b in bits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_nan_is_refused_on_every_device(device, dtype, scheme):
    """A NaN anywhere (here in the second tensor, past one work item) is reported by the histogram pass, on the
    CUDA radix path as on the CPU's."""
    cpu_choice(device, scheme)
    tensors = [torch.randn(100, device=device).to(dtype), torch.randn(70_000, device=device).to(dtype)]
    tensors[1][69_999] = float("nan")
    with pytest.raises(ValueError, match="1 NaN value"):
        ue.topk_mask(tensors, 0.1)


def test_masked_optimizer_makes_the_indices_once(monkeypatch):
    """The index lists (a nonzero over the mask: a host sync on CUDA) are made on the first step and reused: the
    optimizer's per-step subset masks share the parent's cache instead of recomputing them every step."""
    params = _params("cpu")
    mask = ue.topk_mask(params, 0.2)
    opt = ue.MaskedOptimizer(params, mask, check_finite=False)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    calls = []
    dense = ue.Mask.dense
    monkeypatch.setattr(ue.Mask, "dense", lambda self, i: calls.append(i) or dense(self, i))
    before = [p.clone() for p in params]
    opt.step()
    opt.step()
    assert calls == [] and not all(torch.equal(a, b) for a, b in zip(params, before))
