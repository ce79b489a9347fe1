"""The registered ops work with torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch
from test_unlearning_loss import make_case, reference

import unlearn_engine as ue

from conftest import DEVICES, is_sim


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fused_ops(device):
    if is_sim(device):
        pytest.skip("opcheck checks the registration of torch.ops.unlearn_engine (schemas, fake kernels); the "
                    "simulator's ops run the same kernels in the other sim tests")
    c = make_case(device, n=13, h=9, v=29)
    h = c["hidden"].requires_grad_()
    w = c["weight"].requires_grad_()
    b = c["bias"].requires_grad_()
    torch.library.opcheck(ue.ops.fused_logprob, (h, w, b, c["labels"], None, None, None, 4))
    torch.library.opcheck(ue.ops.fused_logprob, (h, w, b, c["labels"], c["ref_hidden"], c["ref_weight"], None, 4))
    coef = torch.randn(13, device=device)
    # fused_linear_objective is differentiable only through unlearning_loss's autograd.Function
    torch.library.opcheck(ue.ops.fused_linear_objective, (h.detach(), w.detach(), b.detach(), c["labels"],
                                                          c["ref_hidden"], c["ref_weight"], None, coef, coef * 0.5, 5))
    groups = torch.tensor([0, 0, 1, -1, 1, 2, 2, 2, 0, 1, -1, 2, 2], device=device)
    g = torch.linspace(0.5, 1.5, 3, device=device)
    torch.library.opcheck(ue.ops.fused_group_objective, (h.detach(), w.detach(), b.detach(), c["labels"], groups, -g,
                                                         g, g * 2, g + 1, 0.3, c["ref_hidden"], c["ref_weight"], None,
                                                         coef * 0.5, 3))
    torch.library.opcheck(ue.ops.fused_group_objective, (h.detach(), w.detach(), b.detach(), c["labels"], groups, -g,
                                                         g, g * 2, g + 1, 0.3, None, None, None, None, 3, False))
    torch.library.opcheck(ue.ops.fused_group_objective, (h.detach().half(), w.detach().half(), b.detach().half(),
                                                         c["labels"], groups, -g, g, g * 2, g + 1, 0.3, None, None,
                                                         None, None, 3))  # fp16: fp32 gradients (fake agrees)
    torch.library.opcheck(ue.ops.fused_logprob_backward,
                          (h.detach(), w.detach(), None, c["labels"], None, None, None, coef, None, 3))
    f = torch.randn(4, 9, device=device, requires_grad=True)
    r = torch.randn(6, 9, device=device, requires_grad=True)
    torch.library.opcheck(ue.ops.rmu_loss, (f, torch.randn(9, device=device), r, torch.randn(6, 9, device=device), 0.5))


@pytest.mark.parametrize("forget,retain", [("ga", "nll"), ("npo", "kl"), ("npo", "nll"), ("ga", "kl")])
def test_torch_compile_fullgraph(forget, retain):
    case = make_case()

    def step(hidden, weight, bias):
        out = ue.unlearning_loss(hidden, weight, case["labels"], case["sample_index"], case["roles"], bias=bias,
                                 forget=forget, retain=retain, ref_logp=case["ref_logp"],
                                 ref_hidden=case["ref_hidden"], ref_weight=case["ref_weight"], chunk_size=8)
        return out.loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss = compiled(*inputs)
    loss.backward()
    ref = reference(case, forget=forget, retain=retain)
    torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs[0].grad, ref[3][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs[1].grad, ref[3][1], rtol=1e-5, atol=1e-5)
