"""A small CUDA case for every kernel (and each compiled variant: row-pass widths, risk buckets, top-k passes,
masked steps, RMU), checked against the reference. `make gpu-check` runs this file under compute-sanitizer
(memcheck, racecheck, synccheck, initcheck), so it is kept tiny; without a GPU it skips."""
import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.reference import (
    risk_project_reference,
    risk_prototypes_reference,
    rmu_loss_reference,
    topk_mask_reference,
    unlearning_loss_reference,
)

from conftest import assert_masked_steps_match_torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("v", [257, 1031, 8209])  # 64, 256 and 512 threads per row
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_row_pass(v, dtype):
    g = torch.Generator().manual_seed(0)
    n, h = 11, 24
    hidden = torch.randn(n, h, generator=g).cuda().to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).cuda().to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).cuda()
    labels[3] = -100
    sample_index = torch.tensor([0] * 4 + [1] * 4 + [2] * 3).cuda()
    roles = torch.tensor([0, 1, 1]).cuda()
    ref_hidden, ref_weight = hidden.detach() * 0.9, weight.detach() * 1.1
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    for forget, retain in [("ga", "nll"), ("ga", "kl"), ("npo", "kl")]:
        kw = dict(forget=forget, retain=retain, ref_logp=torch.zeros(3, device="cuda"), ref_hidden=ref_hidden,
                  ref_weight=ref_weight)
        hidden.grad = weight.grad = None
        loss = ue.unlearning_loss(hidden, weight, labels, sample_index, roles, chunk_size=4, **kw).loss
        loss.backward()
        got = [loss.detach(), hidden.grad.clone(), weight.grad.clone()]
        hf, wf = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        kw.update(ref_hidden=ref_hidden.double(), ref_weight=ref_weight.double())
        want = unlearning_loss_reference(hf, wf, labels, sample_index, roles, **kw)[0]
        want.backward()
        for a, b in zip(got, [want.detach(), hf.grad, wf.grad]):
            assert _rel(a, b) < tol, (forget, retain, _rel(a, b))


def test_rmu():
    f = torch.randn(5, 300, device="cuda", requires_grad=True)
    r = torch.randn(7, 300, device="cuda", requires_grad=True)
    c, ref = torch.randn(300, device="cuda"), torch.randn(7, 300, device="cuda")
    loss = ue.rmu_loss(f, c, r, ref, 0.5)
    loss.backward()
    fd, rd = f.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    want = rmu_loss_reference(fd, c, rd, ref, 0.5)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.grad, fd.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.grad, rd.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [3, 20, 40])  # the 16, 32 and 64 buckets
@pytest.mark.parametrize("dtype", DTYPES)
def test_risk_rows(k, dtype):
    U = ue.unsafe_subspace(torch.randn(50, 64), k).cuda()
    x = torch.randn(2, 9, 64, device="cuda").to(dtype)
    x[0, 1] = 0
    want, want_scores = risk_project_reference(x, U, threshold=k / 64, strength=1.5)
    got, scores = ue.risk_project(x, U, threshold=k / 64, strength=1.5)
    assert _rel(scores, want_scores) < 1e-2 and _rel(got, want) < 1e-2
    got, _ = ue.risk_project(x.clone(), U, top_fraction=0.3, inplace=True)
    want, _ = risk_project_reference(x, U, top_fraction=0.3)
    assert _rel(got, want) < 1e-2
    P = torch.randn(k, 64, device="cuda")
    want, want_best = risk_prototypes_reference(x, P, threshold=0.05)
    got, best = ue.risk_prototypes(x, P, threshold=0.05)
    assert _rel(best, want_best) < 1e-2 and _rel(got, want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk(dtype):
    tensors = [torch.randn(70_001, device="cuda").to(dtype), torch.randn(0, device="cuda").to(dtype),
               torch.full((1000,), 0.5, device="cuda").to(dtype)]
    for scope in ("global", "per_tensor"):
        mask = ue.topk_mask(tensors, 0.2, scope=scope)
        for i, want in enumerate(topk_mask_reference(tensors, 0.2, scope)):
            assert torch.equal(mask.dense(i), want), (scope, i)


def test_topk_heavy_ties_radix_path():
    """Over 2^20 elements in the threshold bucket: the radix passes (count ties, write) instead of the two-pass list."""
    tensors = [torch.full((1_100_000,), 0.5, device="cuda"), torch.randn(5_000, device="cuda")]
    mask = ue.topk_mask(tensors, 0.3)
    for i, want in enumerate(topk_mask_reference(tensors, 0.3, "global")):
        assert torch.equal(mask.dense(i), want), i


@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
@pytest.mark.parametrize("compact", [False, True])
def test_masked_steps(algorithm, compact):
    params = [torch.randn(70_001, device="cuda"), torch.randn(3, 5, device="cuda")]
    mask = ue.topk_mask([torch.randn_like(p) for p in params], 0.99)
    assert_masked_steps_match_torch(params, mask, algorithm, torch.randn_like, compact=compact, rtol=1e-5)
