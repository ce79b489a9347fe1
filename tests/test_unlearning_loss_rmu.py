"""Fused RMU loss vs the eager reference, with gradients for every input."""
import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.reference import rmu_loss_reference

from conftest import DEVICES


def _inputs(device, dtype, nf=13, nr=7, h=61):
    return [torch.randn(*shape, device=device).to(dtype).requires_grad_() for shape in ((nf, h), (h,), (nr, h), (nr, h))]


def _loss_and_grads(fn, inputs, alpha):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves, alpha)
    (loss * 1.7).backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("nf,nr", [(13, 7), (0, 5), (4, 0), (1, 1)])
def test_rmu_matches_reference(device, dtype, tol, nf, nr):
    inputs = _inputs(device, dtype, nf, nr)
    loss, grads = _loss_and_grads(ue.rmu_loss, inputs, 0.6)
    ref_loss, ref_grads = _loss_and_grads(rmu_loss_reference, [t.float() for t in inputs], 0.6)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * max(want.abs().max().item() if want.numel() else 0.0, 1e-3))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(3, 4), torch.randn(5), torch.randn(2, 4), torch.randn(2, 4)), r"control must have shape \(4,\)"),
    ((torch.randn(3, 4), torch.randn(4), torch.randn(2, 5), torch.randn(2, 5)), r"retain_act must have shape \(Nr, H=4\)"),
    ((torch.randn(3, 4), torch.randn(4), torch.randn(2, 4), torch.randn(3, 4)), r"retain_ref must have shape \(2, 4\)"),
    ((torch.randn(3, 4), torch.randn(4).double(), torch.randn(2, 4), torch.randn(2, 4)), "control must have dtype"),
    ((torch.randn(4), torch.randn(4), torch.randn(2, 4), torch.randn(2, 4)), "forget_act must be 2-D"),
])
def test_rmu_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ue.rmu_loss(*args, alpha=1.0)


def test_rmu_negative_alpha():
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        ue.rmu_loss(torch.randn(2, 3), torch.randn(3), torch.randn(2, 3), torch.randn(2, 3), alpha=-1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_rmu_beyond_one_grid_sweep(device):
    """More elements than one sweep of the CUDA grid covers (1024 blocks x 256 threads = 262144): the grid-stride
    loops take several turns, and the fixed grid's per-block partials still sum to the reference."""
    inputs = _inputs(device, torch.float32, nf=300, nr=290, h=1001)
    assert inputs[0].numel() > 1024 * 256 and inputs[2].numel() > 1024 * 256
    loss, grads = _loss_and_grads(ue.rmu_loss, inputs, 0.6)
    ref_loss, ref_grads = _loss_and_grads(rmu_loss_reference, inputs, 0.6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
