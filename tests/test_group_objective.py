"""fused_group_objective (the one-walk gradients of every group objective) vs an eager computation with full logits.

The objective (unlearn_engine/fused_logprob.py): sum over groups g of linear_g m_g + sigmoid_g (2/beta)
softplus(beta (m_g + shift_g)), m_g = S_g / denom_g, plus sum_t coef_kl_t KL_t. Loss and the gradients of hidden,
weight and bias are checked for linear, NPO-like and mixed groups, KL, groups cut by (what would be) chunk
boundaries, a group longer than the chunk, interleaved (pooled) groups, tokens in no group, empty groups and odd
shapes; fp32 tightly, bf16 / fp16 against the eager computation in the same dtype.
"""
import pytest
import torch
import torch.nn.functional as F

import unlearn_engine as ue
from unlearn_engine.fused_logprob import group_objective

from conftest import DEVICES

N, H, V = 37, 61, 1031
BETA = 0.4


def make_case(device="cpu", dtype=torch.float32, n=N, h=H, v=V, groups=None, num_groups=5, with_bias=True,
              with_kl=False, linear=True, sigmoid=True, seed=0):
    """Tokens in `groups` (N,) (default: contiguous runs over num_groups groups), ~20% unlabelled."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h ** 0.5
    bias = torch.randn(v, generator=g) * 0.1 if with_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    if groups is None:
        groups = torch.randint(0, num_groups, (n,), generator=g).sort().values
    groups = torch.as_tensor(groups, dtype=torch.int64)
    num_groups = max(num_groups, int(groups.max()) + 1 if n else 0)
    counts = torch.zeros(num_groups).index_add(0, groups.clamp(min=0), ((labels != -100) & (groups >= 0)).float())
    case = dict(hidden=hidden, weight=weight, bias=bias, labels=labels, group_index=groups,
                linear=(torch.randn(num_groups, generator=g) if linear else torch.zeros(num_groups)),
                sigmoid=(torch.rand(num_groups, generator=g) + 0.5 if sigmoid else torch.zeros(num_groups)),
                shift=torch.rand(num_groups, generator=g) * 4, denom=counts.clamp(min=1),
                ref_hidden=None, ref_weight=None, ref_bias=None, coef_kl=None)
    if with_kl:
        case.update(ref_hidden=hidden + 0.3 * torch.randn(n, h, generator=g),
                    ref_weight=weight + 0.05 * torch.randn(v, h, generator=g),
                    ref_bias=torch.randn(v, generator=g) * 0.1 if with_bias else None,
                    coef_kl=torch.rand(n, generator=g) * (labels != -100))
    model = ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")
    return {k: (None if t is None else t.to(device, dtype) if k in model else t.to(device)) for k, t in case.items()}


def eager_objective(c, upcast=True):
    """The objective the obvious way: N x V logits, log_softmax, per-group sums. upcast=False makes the logits in
    the inputs' dtype (softmax in fp32), as eager training code does."""
    def log_probs(hidden, weight, bias):
        if upcast:
            hidden, weight = hidden.float(), weight.float()
            bias = bias.float() if bias is not None else None
        logits = hidden @ weight.T
        if bias is not None:
            logits = logits + bias
        return F.log_softmax(logits.float(), dim=-1)

    labels, groups = c["labels"], c["group_index"]
    lp = log_probs(c["hidden"], c["weight"], c["bias"])
    valid = labels != -100
    token_logp = torch.where(valid, lp.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    in_group = groups >= 0
    S = torch.zeros_like(c["linear"]).index_add(0, groups.clamp(min=0), torch.where(in_group, token_logp, 0.0))
    m = S / c["denom"]
    loss = (c["linear"] * m + c["sigmoid"] * (2 / BETA) * F.softplus(BETA * (m + c["shift"]))).sum()
    token_kl = None
    if c["coef_kl"] is not None:
        lq = log_probs(c["ref_hidden"], c["ref_weight"], c["ref_bias"])
        token_kl = torch.where(valid, (lq.exp() * (lq - lp)).sum(-1), 0.0)
        loss = loss + (c["coef_kl"] * token_kl).sum()
    return loss, S, token_logp, token_kl


def fused_objective(c, chunk_size, nonlinear=True, capturable=False):
    loss, S, token_logp, token_kl = group_objective(
        c["hidden"], c["weight"], c["labels"], c["group_index"], c["linear"], c["sigmoid"], c["shift"], c["denom"],
        beta=BETA, nonlinear=nonlinear, bias=c["bias"], coef_kl=c["coef_kl"], ref_hidden=c["ref_hidden"],
        ref_weight=c["ref_weight"], ref_bias=c["ref_bias"], chunk_size=chunk_size, capturable=capturable)
    return loss, S, token_logp, token_kl


def run(fn, case, grad_scale=1.0):
    """Loss, S and token log-likelihoods, and the gradients of hidden, weight, bias (inputs cloned)."""
    c = {k: (t.detach().clone().requires_grad_(k in ("hidden", "weight", "bias")) if t is not None else None)
         for k, t in case.items()}
    loss, S, token_logp, token_kl = fn(c)
    (loss * grad_scale).backward()
    grads = [c[k].grad if c[k] is not None else None for k in ("hidden", "weight", "bias")]
    return [loss.detach(), S.detach(), token_logp.detach()], grads


def assert_close_fp32(fused, ref):
    (values, grads), (ref_values, ref_grads) = fused, ref
    for name, a, b in zip(("loss", "group_logp", "token_logp"), values, ref_values):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()), msg=name)
    for name, a, b in zip(("grad hidden", "grad weight", "grad bias"), grads, ref_grads):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        scale = b.abs().max().item() or 1.0
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5 * scale, msg=name)


def check(case, chunk_size, nonlinear=True, grad_scale=1.0, capturable=False):
    fused = run(lambda c: fused_objective(c, chunk_size, nonlinear, capturable), case, grad_scale)
    assert_close_fp32(fused, run(eager_objective, case, grad_scale))
    return fused


# capturable=True (fused_logprob.group_objective): the same answers from a walk over every row, with a forward
# pre-pass instead of packed groups for nonlinear objectives, and no host read.
CAPTURABLE = pytest.mark.parametrize("capturable", [False, True], ids=["packed", "capturable"])


# ----------------------------------------------------------------------------- fp32 against the eager objective
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 1000])
@CAPTURABLE
def test_linear_only(device, chunk_size, capturable):
    check(make_case(device, sigmoid=False), chunk_size, nonlinear=False, grad_scale=2.5, capturable=capturable)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [4, 7, 16, 1000])
@CAPTURABLE
def test_npo_like_groups(device, chunk_size, capturable):
    """Softplus groups only (NPO / SimNPO): each group's coefficient depends on its whole S_g."""
    check(make_case(device, linear=False), chunk_size, grad_scale=-1.5, capturable=capturable)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [5, 9, 1000])
@CAPTURABLE
def test_linear_and_softplus_in_one_group_with_kl(device, chunk_size, capturable):
    """Both parts in every group (retain-side NPO on top of NLL), plus the KL term with a reference bias."""
    check(make_case(device, with_kl=True), chunk_size, grad_scale=0.7, capturable=capturable)


@pytest.mark.parametrize("device", DEVICES)
@CAPTURABLE
def test_groups_straddle_chunk_boundaries(device, capturable):
    """Groups of 6 tokens with chunks of 8: in token order every other group would be cut by a chunk boundary."""
    groups = torch.arange(36) // 6
    case = make_case(device, n=36, groups=groups, num_groups=6, with_kl=True)
    case["labels"][case["labels"] == -100] = 3  # every token labelled: groups are exactly 6 rows
    check(case, 8, capturable=capturable)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [3, 8])
@CAPTURABLE
def test_group_longer_than_the_chunk(device, chunk_size, capturable):
    """A softplus group with more labelled rows than the chunk: the forward-only pre-pass over its rows."""
    groups = torch.cat([torch.zeros(25), torch.ones(6), torch.full((6,), 2)]).long()
    check(make_case(device, groups=groups, num_groups=3, with_kl=True), chunk_size, capturable=capturable)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [4, 11, 1000])
@CAPTURABLE
def test_interleaved_groups(device, chunk_size, capturable):
    """Pooled groups whose tokens are not contiguous (batch pooling): group t % 3, and a group spanning others."""
    groups = torch.arange(N) % 3
    groups[20:30] = 3
    check(make_case(device, groups=groups, num_groups=4), chunk_size, capturable=capturable)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [4, 10, 1000])
@CAPTURABLE
def test_softplus_and_linear_groups_side_by_side(device, chunk_size, capturable):
    """NPO forget samples next to NLL retain samples: linear rows fill the chunks the softplus groups leave."""
    case = make_case(device, num_groups=6)
    case["sigmoid"][1::2] = 0.0
    check(case, chunk_size, capturable=capturable)


@pytest.mark.parametrize("device", DEVICES)
@CAPTURABLE
def test_tokens_in_no_group_and_empty_groups(device, capturable):
    """group -1 tokens count for nothing but the KL term; a group with no tokens and one with only unlabelled
    tokens contribute their constant term (S = 0) and no gradient."""
    groups = torch.randint(0, 6, (N,), generator=torch.Generator().manual_seed(3))
    groups[::4] = -1
    groups[groups == 2] = 4  # group 2 has no token
    case = make_case(device, groups=groups, num_groups=6, with_kl=True)
    case["labels"][case["group_index"] == 5] = -100  # group 5: tokens, none labelled
    values, _ = check(case, 6, capturable=capturable)
    assert values[1][2].item() == 0.0 and values[1][5].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,h,v,chunk_size", [(1, 1, 2, 1), (13, 3, 7, 5), (50, 33, 257, 13)])
@CAPTURABLE
def test_odd_shapes(device, n, h, v, chunk_size, capturable):
    check(make_case(device, n=n, h=h, v=v, num_groups=4, with_kl=True, seed=n), chunk_size, capturable=capturable)


@pytest.mark.parametrize("device", DEVICES)
@CAPTURABLE
def test_no_labelled_token_and_no_bias(device, capturable):
    case = make_case(device, with_bias=False)
    check(case, 8, capturable=capturable)
    case["labels"][:] = -100
    values, grads = check(case, 8, capturable=capturable)
    assert grads[0].abs().sum().item() == 0.0 and grads[1].abs().sum().item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@CAPTURABLE
def test_float64(device, capturable):
    fused = check(make_case(device, torch.float64, with_kl=True), 7, capturable=capturable)
    assert all(g.dtype == torch.float64 for g in fused[1])


@pytest.mark.parametrize("device", DEVICES)
def test_per_group_outputs_differentiable_when_nonlinear(device):
    """With nonlinear=True, S and the token log-likelihoods stay differentiable (unlearning_loss's per_sample)."""
    case = make_case(device, with_kl=True)

    def combined(fn):
        def f(c):
            loss, S, token_logp, token_kl = fn(c)
            return loss * 0.5 + (S * torch.arange(5.0, device=device)).sum() + 0.1 * token_kl.sum(), S, token_logp, None
        return f

    fused = run(combined(lambda c: fused_objective(c, 6)), case)
    assert_close_fp32(fused, run(combined(eager_objective), case))


# ----------------------------------------------------------------------------- one walk, no recompute
GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_")


def count_gemms(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in GEMMS)


@pytest.mark.parametrize("with_kl", [False, True])
def test_npo_makes_its_gradients_in_one_walk(with_kl):
    """Three GEMMs per chunk (logits, dL/dh, dL/dW), four with the reference logits, for NPO-like groups as for
    linear ones: no logits are recomputed in backward. A group longer than the chunk adds only its own pre-pass."""
    groups = torch.arange(32) // 8  # four groups of 8 labelled rows, chunks of 8: four chunks
    per_chunk = 4 if with_kl else 3

    def step(case):
        c = {k: (t.detach().clone().requires_grad_(k in ("hidden", "weight", "bias")) if t is not None else None)
             for k, t in case.items()}
        return lambda: fused_objective(c, 8)[0].backward()

    for linear, sigmoid in [(True, False), (False, True), (True, True)]:
        case = make_case(n=32, groups=groups, num_groups=4, with_kl=with_kl, linear=linear, sigmoid=sigmoid)
        case["labels"][case["labels"] == -100] = 1
        assert count_gemms(step(case)) == 4 * per_chunk, (linear, sigmoid)
    long_group = make_case(n=32, groups=(torch.arange(32) >= 20).long(), num_groups=2, with_kl=with_kl)
    long_group["labels"][long_group["labels"] == -100] = 1
    long_group["sigmoid"][1] = 0.0  # group 1 (12 rows) linear: only group 0 needs the pre-pass
    # 32 rows in 4 chunks; group 0's 20 rows exceed the chunk: a pre-pass of 3 logits GEMMs over them
    assert count_gemms(step(long_group)) == 4 * per_chunk + 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_frozen_head_skips_the_weight_gradient(dtype):
    """A frozen LM head (LoRA, a trained body): no V x H gradient is made - two GEMMs per chunk instead of three -
    and dL/dh equals the one made with the head trainable."""
    groups = torch.arange(32) // 8
    case = make_case(n=32, groups=groups, num_groups=4)
    case["labels"][case["labels"] == -100] = 1
    if dtype == torch.float16:
        case = {k: (t.half() if t is not None and t.is_floating_point() and k in ("hidden", "weight", "bias") else t)
                for k, t in case.items()}

    def step(train_head):
        c = {k: (t.detach().clone().requires_grad_(k == "hidden" or (train_head and k in ("weight", "bias")))
                 if t is not None else None) for k, t in case.items()}
        return c, lambda: fused_objective(c, 8)[0].backward()

    trained, run_trained = step(True)
    frozen, run_frozen = step(False)
    assert count_gemms(run_trained) == 4 * 3 and count_gemms(run_frozen) == 4 * 2
    assert frozen["weight"].grad is None and frozen["bias"].grad is None
    assert frozen["hidden"].grad.dtype == dtype
    torch.testing.assert_close(frozen["hidden"].grad, trained["hidden"].grad, rtol=0, atol=0)


# ----------------------------------------------------------------------------- low precision
def _rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item() if want.numel() else 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "npo", "mixed_kl", "interleaved_long"])
@CAPTURABLE
def test_low_precision(device, dtype, kind, capturable):
    """Values and gradients vs the fp32 answer, at most twice as far as the eager computation in the same dtype
    (plus eps/8), by relative norm."""
    options = dict(linear=dict(sigmoid=False), npo=dict(linear=False), mixed_kl=dict(with_kl=True),
                   interleaved_long=dict(groups=torch.cat([torch.arange(20) % 2, torch.full((17,), 2)])))[kind]
    case = make_case(device, dtype, **options)
    fused = run(lambda c: fused_objective(c, 8, nonlinear=kind != "linear", capturable=capturable), case)
    eager = run(lambda c: eager_objective(c, upcast=False), case)
    exact = run(eager_objective, case)
    assert all(g is None or g.dtype == dtype for g in fused[1])
    eps = torch.finfo(dtype).eps
    names = ("loss", "group_logp", "token_logp", "grad hidden", "grad weight", "grad bias")
    for name, a, e, b in zip(names, (*fused[0], *fused[1]), (*eager[0], *eager[1]), (*exact[0], *exact[1])):
        err_fused, err_eager = _rel_err(a, b), _rel_err(e, b)
        assert err_eager <= 2 * eps, f"{name}: eager {dtype} error {err_eager:.3g} is implausibly large"
        bound = 2 * err_eager + eps / 8
        assert err_fused <= bound, f"{name}: fused error {err_fused:.3g} > {bound:.3g} (eager {err_eager:.3g})"


# ----------------------------------------------------------------------------- the op itself
@pytest.mark.parametrize("device", DEVICES)
def test_op_outputs(device):
    """The op's own outputs: loss, S, token log-likelihoods and KLs, and the unscaled gradients."""
    case = make_case(device, with_kl=True)
    c = {k: (t.detach().clone().requires_grad_(k in ("hidden", "weight", "bias")) if t is not None else None)
         for k, t in case.items()}
    loss, S, token_logp, token_kl = eager_objective(c)
    loss.backward()
    out = ue.ops.fused_group_objective(case["hidden"], case["weight"], case["bias"], case["labels"],
                                       case["group_index"], case["linear"], case["sigmoid"], case["shift"],
                                       case["denom"], BETA, case["ref_hidden"], case["ref_weight"], case["ref_bias"],
                                       case["coef_kl"], 7)
    for name, a, b in zip(("loss", "group_logp", "logp", "kl", "grad hidden", "grad weight", "grad bias"), out,
                          (loss, S, token_logp, token_kl, c["hidden"].grad, c["weight"].grad, c["bias"].grad)):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()), msg=name)


def test_one_backward_per_forward():
    case = make_case()
    hidden = case["hidden"].clone().requires_grad_()
    loss = fused_objective(dict(case, hidden=hidden), 8)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_torch_compile_fullgraph():
    case = make_case(with_kl=True)
    case["shift"] = case["linear"] = torch.zeros_like(case["linear"])  # one tensor passed twice, as GA does

    def step(hidden, weight, bias):
        return fused_objective(dict(case, hidden=hidden, weight=weight, bias=bias), 8)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss = compiled(*inputs)
    (loss * 3).backward()
    ref_values, ref_grads = run(eager_objective, case, grad_scale=3)
    torch.testing.assert_close(loss.detach(), ref_values[0], rtol=1e-5, atol=1e-5)
    for got, want in zip((t.grad for t in inputs), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _op_args(case, **override):
    args = dict(hidden=case["hidden"], weight=case["weight"], bias=case["bias"], labels=case["labels"],
                group_index=case["group_index"], linear=case["linear"], sigmoid=case["sigmoid"], shift=case["shift"],
                denom=case["denom"], beta=BETA, ref_hidden=None, ref_weight=None, ref_bias=None, coef_kl=None,
                chunk_size=8)
    args.update(override)
    return list(args.values())


@pytest.mark.parametrize("override,match", [
    (dict(group_index=torch.full((N,), 5)), r"group_index values must be -1 \(no group\) or in \[0, G=5\)"),
    (dict(group_index=torch.full((N,), -2)), r"group_index values must be -1"),
    (dict(group_index=torch.zeros(N, dtype=torch.int32)), "group_index must have dtype Long"),
    (dict(group_index=torch.zeros(N - 1, dtype=torch.int64)), r"group_index must have shape \(N=37,\)"),
    (dict(sigmoid=torch.zeros(4)), r"sigmoid must have shape \(G=5,\) like linear"),
    (dict(denom=torch.ones(5, dtype=torch.float64)), "denom must have dtype Float"),
    (dict(linear=torch.zeros(5, 1)), "linear must be 1-D"),
    (dict(beta=0.0), "beta must be finite and > 0"),
    (dict(beta=float("nan")), "beta must be finite and > 0"),
    (dict(chunk_size=0), "chunk_size must be positive"),
    (dict(coef_kl=torch.zeros(N)), "coef_kl needs ref_hidden and ref_weight"),
    (dict(labels=torch.zeros(N, dtype=torch.int32)), "labels must have dtype Long"),
])
def test_bad_arguments_name_the_argument(override, match):
    case = make_case()
    with pytest.raises(RuntimeError, match=match):
        ue.ops.fused_group_objective(*_op_args(case, **override))


def test_opcheck():
    case = make_case(n=13, h=9, v=29, with_kl=True)
    args = _op_args(case, ref_hidden=case["ref_hidden"], ref_weight=case["ref_weight"], ref_bias=case["ref_bias"],
                    coef_kl=case["coef_kl"], chunk_size=4)
    torch.library.opcheck(ue.ops.fused_group_objective, tuple(args))
