"""Every op's gradient for each combination of which inputs require grad: hidden, weight, bias and the reference
inputs (ref_logp for NPO, ref_hidden / ref_weight for KL), through each differentiable output (the loss, the
per-sample terms, the log-likelihoods: the last two take the recompute path). A frozen input gets no gradient,
a trainable one gets the eager reference's (unlearn_engine.reference with full logits), and the reference inputs
never get one (the contract: gradients flow to hidden, weight and bias)."""
import itertools

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.reference import rmu_loss_reference, unlearning_loss_reference

N, H, V, B = 7, 4, 6, 3
OBJECTIVES = [("ga", "nll"), ("npo", "nll"), ("simnpo", None), ("ga", "kl"), ("ga", None)]
TRAINABLE = ("hidden", "weight", "bias")
SUBSETS = [set(c) for r in range(len(TRAINABLE) + 1) for c in itertools.combinations(TRAINABLE, r)]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(N, H, generator=g), weight=torch.randn(V, H, generator=g),
                bias=torch.randn(V, generator=g), ref_hidden=torch.randn(N, H, generator=g),
                ref_weight=torch.randn(V, H, generator=g), ref_logp=-torch.rand(B, generator=g) * 3,
                labels=torch.tensor([1, 0, -100, 5, 2, 3, 4]), sample_index=torch.tensor([0, 0, 0, 1, 1, 2, 2]),
                roles=torch.tensor([0, 1, 0]))


def _close(actual, expected, label):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{label}: {m}")


def _call(fn, t, forget, retain):
    extra = {}
    if forget == "npo":
        extra["ref_logp"] = t["ref_logp"]
    if retain == "kl":
        extra.update(ref_hidden=t["ref_hidden"], ref_weight=t["ref_weight"])
    return fn(t["hidden"], t["weight"], t["labels"], t["sample_index"], t["roles"], forget=forget, retain=retain,
              bias=t["bias"], beta=0.7, delta=0.3, **extra)


def _reduce(out, output):
    """A scalar of one output; per_sample and logp weighted so that every sample's gradient counts differently."""
    if output == "loss":
        return out[0]
    values = out[1] if output == "per_sample" else out[2]
    return (values * torch.tensor([1.0, -2.0, 0.5])).sum()


@pytest.mark.parametrize("output", ["loss", "per_sample", "logp"])
@pytest.mark.parametrize("forget,retain", OBJECTIVES)
def test_unlearning_loss_grad_for_each_trainable_subset(forget, retain, output):
    """per_sample and logp are differentiable for NPO-like objectives only (GA / NLL / KL: detached diagnostics,
    unlearning_loss's module docstring); the reference model's tensors requiring grad change nothing and get no
    gradient from the fused walk."""
    differentiable = output == "loss" or forget in ("npo", "simnpo")
    for trainable, ref_grad in itertools.product(SUBSETS, (False, True)):
        ours, ref = _inputs(), _inputs()
        for name in trainable:
            ours[name].requires_grad_(True)
            ref[name].requires_grad_(True)
        refs = [name for name in ("ref_hidden", "ref_weight") if ref_grad]
        for name in refs + (["ref_logp"] if ref_grad else []):
            ours[name].requires_grad_(True)
        what = f"{forget}/{retain} {output}: trainable {sorted(trainable)}, reference requires grad {ref_grad}"
        value = _reduce(_call(ue.unlearning_loss, ours, forget, retain), output)
        expected = _reduce(_call(unlearning_loss_reference, ref, forget, retain), output)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=what)
        if not trainable or not differentiable:
            if not ref_grad:
                assert not value.requires_grad, what
            continue
        value.backward()
        expected.backward()
        for name in TRAINABLE:
            if name in trainable:
                assert ours[name].grad is not None, f"{what}: {name} got no gradient"
                _close(ours[name].grad, ref[name].grad, f"{what}: {name}")
            else:
                assert ours[name].grad is None, f"{what}: frozen {name} got a gradient"
        for name in refs:
            assert ours[name].grad is None, f"{what}: the reference's {name} got a gradient"


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_sequence_logprob_grad_for_each_trainable_subset(normalize):
    for trainable in SUBSETS[1:]:
        ours, ref = _inputs(), _inputs()
        for name in trainable:
            ours[name].requires_grad_(True)
            ref[name].requires_grad_(True)
        value = ue.sequence_logprob(ours["hidden"], ours["weight"], ours["labels"], ours["sample_index"], B,
                                    bias=ours["bias"], normalize=normalize)
        _, _, logp = unlearning_loss_reference(ref["hidden"], ref["weight"], ref["labels"], ref["sample_index"],
                                               ref["roles"], bias=ref["bias"])
        if normalize == "mean":
            logp = logp / torch.zeros(B).index_add(0, ref["sample_index"], (ref["labels"] != -100).float())
        weights = torch.tensor([1.0, -2.0, 0.5])
        (value * weights).sum().backward()
        (logp * weights).sum().backward()
        for name in TRAINABLE:
            if name in trainable:
                _close(ours[name].grad, ref[name].grad, f"{sorted(trainable)}: {name}")
            else:
                assert ours[name].grad is None, f"{sorted(trainable)}: frozen {name} got a gradient"


def test_frozen_head_weight_with_trainable_bias():
    """The LoRA / trained-body case turned around: the head weight frozen, its bias trained. The fused path
    skips the V x H weight gradient for a frozen head; the bias must still get its gradient."""
    for forget, retain in OBJECTIVES:
        ours, ref = _inputs(), _inputs()
        ours["bias"].requires_grad_(True)
        ref["bias"].requires_grad_(True)
        _call(ue.unlearning_loss, ours, forget, retain).loss.backward()
        _call(unlearning_loss_reference, ref, forget, retain)[0].backward()
        assert ours["bias"].grad is not None and ours["weight"].grad is None, (forget, retain)
        torch.testing.assert_close(ours["bias"].grad, ref["bias"].grad, rtol=1e-4, atol=1e-6)


RMU_INPUTS = ("forget_act", "control", "retain_act", "retain_ref")


def test_rmu_loss_grad_for_each_trainable_subset():
    g = torch.Generator().manual_seed(1)
    base = dict(forget_act=torch.randn(5, H, generator=g), control=torch.randn(H, generator=g),
                retain_act=torch.randn(3, H, generator=g), retain_ref=torch.randn(3, H, generator=g))
    for r in range(1, len(RMU_INPUTS) + 1):
        for trainable in itertools.combinations(RMU_INPUTS, r):
            ours = {k: v.clone().requires_grad_(k in trainable) for k, v in base.items()}
            ref = {k: v.clone().requires_grad_(k in trainable) for k, v in base.items()}
            value = ue.rmu_loss(*(ours[k] for k in RMU_INPUTS), alpha=2.5)
            expected = rmu_loss_reference(*(ref[k] for k in RMU_INPUTS), alpha=2.5)
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
            value.backward()
            expected.backward()
            for name in RMU_INPUTS:
                if name in trainable:
                    _close(ours[name].grad, ref[name].grad, f"{trainable}: {name}")
                else:
                    assert ours[name].grad is None, f"{trainable}: frozen {name} got a gradient"


def test_head_loss_module_trains_only_what_requires_grad():
    """The Unlearner's head module (HeadLoss, the fused loss with the head's weight and bias): a head with a bias,
    its weight frozen, trains the bias only, by the eager loss's gradient."""
    from unlearn_engine.api.unlearner import HeadLoss

    t = _inputs()
    head = torch.nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(t["weight"])
        head.bias.copy_(t["bias"])
    head.weight.requires_grad_(False)
    hidden = t["hidden"].requires_grad_(True)
    HeadLoss(head)(hidden, t["labels"], t["sample_index"], t["roles"], forget="ga", retain="nll").loss.backward()
    bias = t["bias"].clone().requires_grad_(True)
    unlearning_loss_reference(t["hidden"].detach(), t["weight"], t["labels"], t["sample_index"], t["roles"],
                              bias=bias)[0].backward()
    assert head.weight.grad is None and hidden.grad is not None
    torch.testing.assert_close(head.bias.grad, bias.grad, rtol=1e-4, atol=1e-6)
