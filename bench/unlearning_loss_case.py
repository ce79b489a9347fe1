"""One forward+backward of the unlearning loss, fused or eager, on generated inputs.

Imported by the benchmark; also run as `python -m bench.loss_case IMPL FORGET RETAIN N H V DTYPE DEVICE`
to report peak extra memory of a single step in a fresh process (prints one JSON line)."""
import json
import sys

import torch

import unlearn_engine as ue
from unlearn_engine.fused_logprob import default_chunk_size
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


def capturable_loss(*args, **kwargs):
    # no host sync (a CUDA graph can hold it): every row walked, NPO with a forward pre-pass
    return ue.unlearning_loss(*args, validate=False, capturable=True, **kwargs)


IMPLS = {"eager": eager_loss, "fused": fused_loss, "capturable": capturable_loss}


def _plain_ce(fn):
    """A fused cross-entropy library as a speed baseline: token-mean CE over the same GEMMs (GA + NLL's shape of
    work: 6NHV), not the unlearning objective itself."""
    def loss(hidden, weight, labels, *_args, **_kwargs):
        return (fn(hidden, weight, labels),)
    return loss


def baseline_impls(device: str) -> dict:
    """What the GPU benchmark compares against besides eager, where installed: torch.compile of the eager loss,
    liger-kernel's fused linear cross entropy and cut-cross-entropy (carry them with scripts/fetch_gpu_wheels.sh)."""
    found = {}
    if device != "cuda":
        return found
    found["compile"] = torch.compile(eager_loss)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        found["liger"] = _plain_ce(lambda h, w, y: liger(w, h, y))
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        found["cce"] = _plain_ce(lambda h, w, y: linear_cross_entropy(h, w, y))
    except ImportError:
        pass
    IMPLS.update(found)
    return found


def flop_count(impl: str, forget: str, retain: str | None, n: int, h: int, v: int, *, chunk_size: int | None = None,
               samples: int = 8, device: str = "cpu", element_size: int = 4) -> int:
    """Flop of one forward + backward on the LM-head GEMMs (2 per multiply-add), as each path really does them.

    Logits 2NHV (the reference model's too, forward only, under retain="kl"); dL/dh and dL/dW 4NHV. The fused path
    makes every objective's gradients in its one forward walk, NPO included: GA+NLL and NPO+NLL 6NHV, GA+KL and
    NPO+KL 8NHV, as eager (which keeps its logits). The only extra is the fused NPO's forward-only pre-pass over a
    forget sample longer than the chunk (2 H V per such row; make_inputs' samples are n / samples rows long, and
    chunk_size defaults to the rule unlearning_loss uses on `device`). The capturable path walks every row (all are
    labelled here) and gives NPO a forward pre-pass over all of them (+2NHV). The plain-CE baselines do GA+NLL's
    6NHV."""
    gemm = 2 * n * h * v
    logits = gemm * (2 if retain == "kl" else 1)
    total = logits + 2 * gemm
    if impl == "capturable" and forget == "npo":
        total += gemm
    if impl == "fused" and forget == "npo":
        chunk = chunk_size or default_chunk_size(n, v, torch.device(device), element_size=element_size,
                                                 with_ref=retain == "kl")
        length = n // samples
        if length > chunk:
            total += 2 * h * v * length * (samples // 2)  # the forget samples' rows, once more, forward only
    return total


def measured_gemm_flop(fn) -> int:
    """GEMM flop that fn() really runs, C++ kernels included: every aten mm / addmm the profiler records, with its
    shapes (2 m k n each)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    total = 0
    for event in prof.events():
        first = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1}.get(event.name)  # addmm: (self, a, b, ...)
        if first is not None:
            (m, k), (_, n) = event.input_shapes[first:first + 2]
            total += 2 * m * k * n
    return total


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
