"""One forward+backward of the unlearning loss, fused or eager, on generated inputs.

Imported by the benchmark; also run as `python -m bench.loss_case IMPL FORGET RETAIN N H V DTYPE DEVICE`
to report peak extra memory of a single step in a fresh process (prints one JSON line)."""
import json
import sys

import torch

import unlearn_engine as ue
from unlearn_engine.reference import unlearning_loss_reference


def make_inputs(forget, retain, n, h, v, dtype, device, samples=8):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    sample_index = (torch.arange(n) * samples // max(n, 1)).to(device)
    roles = torch.tensor([ue.FORGET, ue.RETAIN] * (samples // 2), device=device)
    extra = {}
    if forget == "npo":
        extra["ref_logp"] = -torch.rand(samples, generator=g).to(device) * 5
    if retain == "kl":
        extra["ref_hidden"] = (hidden.detach() + 0.1 * torch.randn(n, h, generator=g).to(device, dtype))
        extra["ref_weight"] = weight.detach().clone()
    return (hidden, weight, labels, sample_index, roles), dict(forget=forget, retain=retain, **extra)


def eager_loss(*args, **kwargs):
    # The way people write it today: full logits in the model dtype, log_softmax in fp32.
    return unlearning_loss_reference(*args, upcast_inputs=False, **kwargs)


def fused_loss(*args, **kwargs):
    return ue.unlearning_loss(*args, validate=False, **kwargs)


IMPLS = {"eager": eager_loss, "fused": fused_loss}


def step(impl, args, kwargs):
    hidden, weight = args[0], args[1]
    hidden.grad = weight.grad = None
    loss = IMPLS[impl](*args, **kwargs)[0]
    loss.backward()
    return loss


def _peak_memory(impl, forget, retain, n, h, v, dtype, device):
    import gc

    from common import peak_rss_bytes, reset_peak_rss  # bench/ is on sys.path when run from the probe

    dtype = getattr(torch, dtype)
    args, kwargs = make_inputs(forget, retain, int(n), int(h), int(v), dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(impl, args, kwargs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    gc.collect()
    base = reset_peak_rss()
    step(impl, args, kwargs)
    return peak_rss_bytes() - base


def gradient_bytes(args):
    """Bytes of the gradients a step must produce (any method): excluded from 'workspace'."""
    return sum(t.numel() * t.element_size() for t in args[:2])


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    print(json.dumps({"peak_extra_bytes": _peak_memory(*sys.argv[1:])}))
