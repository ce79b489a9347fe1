"""The fused unlearning loss at the real Qwen2-VL / Qwen2.5-VL vocabulary size (151,936), against the eager
reference in fp32 with gradients: small H and few tokens keep it to a second or two on a CPU."""
import pytest
import torch
from test_unlearning_loss import assert_matches, make_case, reference, run

import unlearn_engine as ue

QWEN_VOCAB = 151936  # Qwen2-VL-7B / Qwen2.5-VL-7B text_config.vocab_size


@pytest.mark.parametrize("forget,retain", [("npo", "nll"), ("ga", "kl")])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_qwen_vocab_matches_reference(forget, retain, chunk_size):
    """Catches a vocab-size limit or an index overflow past 2^16 / 2^17 (labels at the last ids), or a V-chunking
    error: loss, per-sample terms, log-likelihoods and the gradients of hidden and weight equal the reference."""
    case = make_case(n=12, h=16, v=QWEN_VOCAB, roles=(0, 1, 0), with_bias=False, empty_sample=None)
    case["labels"][:4] = torch.tensor([QWEN_VOCAB - 1, QWEN_VOCAB - 2, 1 << 17, (1 << 16) + 1])
    options = dict(forget=forget, retain=retain, beta=0.3, forget_weight=0.7, retain_weight=1.3)
    fused = run(ue.unlearning_loss, case, grad_scale=2.0, chunk_size=chunk_size, **options)
    want = reference(case, grad_scale=2.0, **options)
    assert_matches(fused, want, torch.float32)
    assert fused[3][1].shape == (QWEN_VOCAB, 16)
    assert fused[3][1][QWEN_VOCAB - 1].abs().sum() > 0  # the last row gets its label's gradient
