"""Risk projection ops vs the eager composite, on odd shapes, zero rows, threshold ties, all dtypes."""
import math

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.reference import risk_project_reference, risk_prototypes_reference

from conftest import DEVICES

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = list(TOL)


def _basis(h, k, device):
    return ue.unsafe_subspace(torch.randn(max(k, 5) + 3, h), k).to(device)


def _x(shape, device, dtype, zero_rows=True, plant=None):
    """Random rows; with plant=U every third row gets a strong component in span(U) (score ~0.5), so a
    threshold selects some rows whatever H / k is."""
    x = torch.randn(*shape)
    if plant is not None:
        rows = x.view(-1, shape[-1])[::3]
        k = plant.shape[1]
        rows += (torch.randn(rows.shape[0], k) * (shape[-1] / k) ** 0.5) @ plant.cpu().float().T
    if zero_rows and x.dim() == 3 and x.shape[1] > 2:
        x[0, 1] = 0.0
        x[-1, -1] = 0.0
    return x.to(device, dtype)


def _close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((2, 1, 61), 3), ((3, 17, 61), 5), ((1, 577, 61), 16), ((2, 9, 256), 40),
                                     ((1, 17, 4096), 16)])
@pytest.mark.parametrize("inplace", [False, True])
def test_threshold_mode(device, dtype, shape, k, inplace):
    U = _basis(shape[-1], k, device)
    x = _x(shape, device, dtype, plant=U)
    want, want_scores = risk_project_reference(x, U, threshold=0.08, strength=2.0)
    selected = int((want_scores >= 0.08).sum())
    assert 1 <= selected < want_scores.numel(), selected  # the projection (and the pass-through) really run
    original = x.clone()
    got, scores = ue.risk_project(x, U, threshold=0.08, strength=2.0, inplace=inplace)
    _close(scores, want_scores, torch.float32 if dtype == torch.float32 else dtype)
    _close(got, want, dtype)
    if inplace:
        assert got.data_ptr() == x.data_ptr()
    else:
        assert torch.equal(x, original)
    unchanged = want_scores < 0.08
    assert torch.equal(got[unchanged], original[unchanged])  # unselected rows bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1, 61), (3, 17, 61), (2, 577, 128)])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 1.0])
def test_top_fraction_mode(device, dtype, shape, fraction):
    U = _basis(shape[-1], 8, device)
    x = _x(shape, device, dtype)
    want, want_scores = risk_project_reference(x, U, top_fraction=fraction)
    got, scores = ue.risk_project(x, U, top_fraction=fraction)
    _close(scores, want_scores, torch.float32 if dtype == torch.float32 else dtype)
    _close(got, want, dtype)
    changed = (got != x).any(-1)
    assert (changed.sum(1) <= math.ceil(fraction * shape[1])).all()


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_ties_are_selected(device):
    """A row whose score equals the threshold exactly is selected (s >= threshold)."""
    U = torch.zeros(8, 1, device=device)
    U[0, 0] = 1.0
    x = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0], [1.0, 2.0, 0, 0, 0, 0, 0, 0],
                       [0.0] * 8]], device=device)  # scores 0.25, 0.2, 0 (zero row)
    got, scores = ue.risk_project(x, U, threshold=0.25, strength=1.0)
    assert scores.tolist() == [[0.25, pytest.approx(0.2), 0.0]]
    assert got[0, 0, 0].item() == 2.0 and torch.equal(got[0, 1:], x[0, 1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((5, 61), 1), ((2, 17, 61), 7), ((577, 96), 64)])
def test_prototype_mode(device, dtype, shape, k):
    P = torch.randn(k, shape[-1], device=device)
    x = _x(shape, device, dtype)
    x.view(-1, shape[-1])[1] = 0.0
    want, want_best = risk_prototypes_reference(x, P, threshold=0.05, strength=0.7)
    for inplace in (False, True):
        xi = x.clone()
        got, best = ue.risk_prototypes(xi, P, threshold=0.05, strength=0.7, inplace=inplace)
        _close(best, want_best, torch.float32 if dtype == torch.float32 else dtype)
        _close(got, want, dtype)


@pytest.mark.parametrize("call,match", [
    (lambda: ue.risk_project(torch.randn(2, 3, 8), torch.randn(8, 2), threshold=0.1), "orthonormal"),
    (lambda: ue.risk_project(torch.randn(2, 3, 8), torch.zeros(8, 0), threshold=0.1), "at least one column"),
    (lambda: ue.risk_project(torch.randn(2, 3, 8), torch.eye(9)[:, :3], threshold=0.1), "x has H=8 but U has H=9"),
    (lambda: ue.risk_project(torch.randn(2, 3, 8), torch.eye(8)[:, :2], threshold=1.5), r"threshold must be in \[0, 1\]"),
    (lambda: ue.risk_project(torch.randn(2, 3, 8), torch.eye(8)[:, :2]), "exactly one of threshold or top_fraction"),
    (lambda: ue.risk_project(torch.randn(3, 8), torch.eye(8)[:, :2], top_fraction=0.5), r"needs x of shape \(B, T, H\)"),
    (lambda: ue.risk_project(torch.randn(2, 3, 8, requires_grad=True), torch.eye(8)[:, :2], threshold=0.1),
     "inference op"),
    (lambda: ue.unsafe_subspace(torch.randn(5, 8), 0), r"k must be an int in \[1, min"),
    (lambda: ue.unsafe_subspace(torch.randn(5, 8), 6), r"k must be an int in \[1, min"),
    (lambda: ue.risk_prototypes(torch.randn(3, 8), torch.zeros(2, 8), threshold=0.1), "zero prototype"),
    (lambda: ue.risk_prototypes(torch.randn(3, 8), torch.randn(65, 8), threshold=0.1), "at most"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unsafe_subspace_is_orthonormal_top_singular_space():
    E = torch.randn(30, 61)
    U = ue.unsafe_subspace(E, 6)
    torch.testing.assert_close(U.T @ U, torch.eye(6), atol=1e-5, rtol=0)
    _, s, vh = torch.linalg.svd(E)
    projector = U @ U.T
    torch.testing.assert_close(projector, vh[:6].T @ vh[:6], atol=1e-4, rtol=0)
    assert torch.equal(ue.unsafe_subspace(E, 6), U)


@pytest.mark.parametrize("mode", [dict(top_fraction=0.3), dict(threshold=0.2)])
def test_scores_are_energy_fractions_by_hand(mode):
    """Catches risk_project returning anything but s_i = ||U^T x_i||^2 / ||x_i||^2 as scores (e.g. the top-fraction
    selection mask), and a wrong x_out: both against an fp64 hand computation."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    x[0, 3] = 0.0
    U = ue.unsafe_subspace(torch.randn(6, 16, generator=g), 3)
    Ud = U.double()
    coef = x @ Ud
    norm2 = x.pow(2).sum(-1)
    want = torch.where(norm2 > 0, coef.pow(2).sum(-1) / norm2.clamp(min=1e-300), torch.zeros_like(norm2))
    if "threshold" in mode:
        chosen = want >= mode["threshold"]
    else:
        chosen = torch.zeros(2, 7, dtype=torch.bool)
        chosen.scatter_(1, want.argsort(dim=1, descending=True)[:, :3], True)  # ceil(0.3 * 7) = 3 per sequence
    want_x = torch.where(chosen.unsqueeze(-1), x + 1.5 * coef @ Ud.T, x)
    got_x, scores = ue.risk_project(x.float(), U, strength=1.5, **mode)
    assert scores.dtype == torch.float32 and scores.shape == (2, 7)
    assert len(set(want.flatten().tolist())) == 14  # all distinct (the zero row scores 0): no ties
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_x.double(), want_x, rtol=1e-5, atol=1e-5)
    assert 1 <= int(chosen.sum()) < 14


def test_unsafe_subspace_sign_convention():
    """Catches unsafe_subspace losing its documented sign convention (largest-magnitude entry of each basis
    vector positive): pinned on several bases, against the SVD flipped by hand, and as E -> -E invariance."""
    g = torch.Generator().manual_seed(7)
    for m, h, k in ((30, 61, 6), (9, 12, 4), (40, 16, 16)):
        E = torch.randn(m, h, generator=g)
        U = ue.unsafe_subspace(E, k)
        cols = torch.arange(k)
        peak = U[U.abs().argmax(0), cols]
        assert (peak > 0).all(), peak
        vh = torch.linalg.svd(E.double(), full_matrices=False)[2][:k].T
        by_hand = vh * vh[vh.abs().argmax(0), cols].sign()
        torch.testing.assert_close(U.double(), by_hand, rtol=0, atol=1e-4)
        torch.testing.assert_close(ue.unsafe_subspace(-E, k), U, rtol=0, atol=1e-5)


def test_opcheck():
    x = torch.randn(7, 12)
    U = ue.unsafe_subspace(torch.randn(9, 12), 3)
    torch.library.opcheck(ue.ops.risk_scores, (x, U, 0))
    torch.library.opcheck(ue.ops.risk_project_rows, (x, U, None, 0, 0.1, 1.5))
    torch.library.opcheck(ue.ops.risk_project_rows, (x, U, torch.rand(7) > 0.5, 0, 0.0, 1.0))
    torch.library.opcheck(ue.ops.risk_project_rows_, (x.clone(), U, None, 1, 0.1, 1.0))


# ----------------------------------------------------------------------------- paths no other test reaches
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
def test_strided_select_changes_the_selected_rows(device, inplace):
    """`select` given as a strided view (sel[:, 0]): the kernels used to read it as contiguous, so selecting rows
    {0, 2} changed rows {0, 4}. Exactly the selected rows change, by the reference's update."""
    U = _basis(32, 4, device)
    x = _x((6, 32), device, torch.float32)
    both = torch.zeros(6, 2, dtype=torch.bool, device=device)
    both[0, 0] = both[2, 0] = True  # column 0 selects rows {0, 2}; read as flat memory it would select {0, 4}
    both[:, 1] = True
    select = both[:, 0]
    assert not select.is_contiguous()
    want = torch.where(select.unsqueeze(1), x + 1.5 * (x @ U) @ U.T, x)
    if inplace:
        got = x.clone()
        ue.ops.risk_project_rows_(got, U, select, 0, 0.0, 1.5)
    else:
        got, _ = ue.ops.risk_project_rows(x, U, select, 0, 0.0, 1.5)
    changed = (got != x).any(1)
    assert changed.nonzero().flatten().tolist() == [0, 2]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [17, 32, 33])
def test_rank_in_the_32_bucket_and_beyond(device, k):
    """Ranks 17..32 run the JMAX=32 kernel (and 33 the 64 one): threshold and prototype modes."""
    U = _basis(96, k, device)
    x = _x((2, 23, 96), device, torch.float32, plant=U)
    want, want_scores = risk_project_reference(x, U, threshold=0.5, strength=1.5)
    assert 1 <= int((want_scores >= 0.5).sum()) < want_scores.numel()
    got, scores = ue.risk_project(x, U, threshold=0.5, strength=1.5)
    _close(scores, want_scores, torch.float32)
    _close(got, want, torch.float32)
    P = torch.randn(k, 96, device=device)
    want, want_best = risk_prototypes_reference(x, P, threshold=0.05, strength=0.7)
    got, best = ue.risk_prototypes(x, P, threshold=0.05, strength=0.7)
    _close(best, want_best, torch.float32)
    _close(got, want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_zero_rows(device, shape):
    """No rows at all: empty outputs of the right shapes, in every mode (no launch with an empty grid)."""
    U = _basis(16, 3, device)
    x = torch.randn(*shape, device=device)
    got, scores = ue.risk_project(x, U, threshold=0.1)
    assert got.shape == x.shape and scores.shape == x.shape[:-1]
    got, _ = ue.risk_project(x, U, threshold=0.1, inplace=True)
    assert got.shape == x.shape
    got, best = ue.risk_prototypes(x, torch.randn(4, 16, device=device), threshold=0.1)
    assert got.shape == x.shape and best.shape == x.shape[:-1]
    if x.dim() == 3:
        got, scores = ue.risk_project(x, U, top_fraction=0.5)
        assert got.shape == x.shape and scores.shape == x.shape[:-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
def test_top_fraction_ties_at_the_boundary_go_to_the_earlier_token(device, inplace):
    """Equal scores straddling the cut: ceil(0.5 * 6) = 3 rows per sequence, and the rows tied for places 2..5
    are copies of one row, so exactly the earliest two of them are selected (the reference's stable order)."""
    U = _basis(32, 4, device)
    x = _x((2, 6, 32), device, torch.float32, zero_rows=False)
    x[0, 0] += 10.0 * U[:, 0]  # the clear top of sequence 0 (score ~0.8)
    x[0, 1:] = x[0, 1] + 2.0 * U[:, 1]  # rows 1..5: one row five times (score ~0.2), so their scores tie exactly
    x[1] = x[0].flip(0)  # sequence 1: the same rows reversed, so the ties sit at tokens 0..4 and the top at 5
    want, want_scores = risk_project_reference(x, U, top_fraction=0.5, strength=1.5)
    original = x.clone()
    got, scores = ue.risk_project(x, U, top_fraction=0.5, strength=1.5, inplace=inplace)
    assert len(set(scores[0, 1:].tolist())) == 1 and scores[0, 0] > scores[0, 1]
    changed = (got != original).any(-1)
    assert changed.tolist() == [[True, True, True, False, False, False], [True, True, False, False, False, True]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("t,fraction,count", [(100, 0.07, 7), (10, 0.3, 3), (8, 0.25, 2), (576, 0.1, 58),
                                              (7, 1 / 7, 1)])
def test_top_fraction_count_when_t_times_fraction_is_an_integer(device, inplace, t, fraction, count):
    """ceil(fraction * T) rows per sequence, also where fraction * T is an integer in exact arithmetic but not
    in floating point (0.07 * 100 = 7.000000000000001): 7 rows, not 8."""
    U = _basis(24, 3, device)
    x = _x((2, t, 24), device, torch.float32, zero_rows=False)
    original = x.clone()
    want, _ = risk_project_reference(x, U, top_fraction=fraction, strength=1.0)
    got, _ = ue.risk_project(x, U, top_fraction=fraction, strength=1.0, inplace=inplace)
    assert (got != original).any(-1).sum(1).tolist() == [count, count]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


_ISA_SCRIPT = """
import torch
import unlearn_engine as ue
from unlearn_engine.reference import risk_project_reference, risk_prototypes_reference
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    for (b, t, h), k in (((2, 19, 61), 3), ((1, 21, 96), 20), ((2, 9, 128), 40), ((1, 17, 96), 64)):
        U = ue.unsafe_subspace(torch.randn(k + 5, h), k)
        x = torch.randn(b, t, h)
        x[:, ::3] += (torch.randn(b, (t + 2) // 3, k) * (h / k) ** 0.5) @ U.T
        x[0, 1] = 0.0
        x = x.to(dtype)
        for mode in (dict(threshold=0.3), dict(top_fraction=0.3)):
            want, want_scores = risk_project_reference(x, U, strength=1.5, **mode)
            for inplace in (False, True):
                got, scores = ue.risk_project(x.clone(), U, strength=1.5, inplace=inplace, **mode)
                torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
                torch.testing.assert_close(scores, want_scores, rtol=tol, atol=tol)
        P = torch.randn(k, h)
        want, want_best = risk_prototypes_reference(x, P, threshold=0.05, strength=0.7)
        got, best = ue.risk_prototypes(x, P, threshold=0.05, strength=0.7)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
        torch.testing.assert_close(best, want_best, rtol=tol, atol=tol)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_cpu_kernels_of_every_instruction_set(isa):
    """The CPU op picks its widest kernel (AVX-512 here, most likely); UE_RISK_CPU_ISA makes a fresh process run
    the narrower ones, against the reference on odd H, all rank buckets (3, 20, 40, 64), fp32 and bf16."""
    import os
    import subprocess
    import sys

    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if isa == "avx2" and not (" avx2" in flags and " fma" in flags):
        pytest.skip("no AVX2 + FMA on this CPU")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, UE_RISK_CPU_ISA=isa)
    run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
