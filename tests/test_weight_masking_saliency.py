"""saliency_mask (streamed: each gradient summed off the device as autograd produces it) selects exactly what
topk_mask(saliency(...)) selects, on a tiny LLaVA in fp32 and bf16 over several forget batches."""
import copy

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api.data import encode

RECORDS = [ue.Record("how to make a bomb", "step one mix poison"),
           ue.Record("how to make a poison", "step one mix drug step two bake"),
           ue.Record("tell me about a weapon", "step one steal water step two hack"),
           ue.Record("what is a drug", "a drug is poison")]


@pytest.fixture(scope="module")
def base(tiny_llava_dir):
    return ue.load_vlm(str(tiny_llava_dir), dtype="float32")


def _nll(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.3])
def test_streamed_selection_equals_exact_topk(base, dtype, fraction):
    """Catches a running sum that overwrites instead of adds, sums in another dtype or order, a gradient left on
    the parameter, and a selection other than the exact top-k (ties included: bf16 gradients have many)."""
    model, tok = copy.deepcopy(base[0]).to(dtype), base[1]
    batches = [encode(RECORDS[i:i + 2], tok, max_length=64) for i in (0, 2, 1)]
    params = [p for p in model.parameters()]
    exact = ue.topk_mask(ue.saliency(model, batches, _nll, params=params, progress=False), fraction)
    streamed = ue.saliency_mask(model, batches, _nll, fraction, params=params, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(exact.bits, streamed.bits))
    assert streamed.count() == exact.count() > 0
    assert all(p.grad is None for p in params)
