"""One forward+backward of the unlearning loss, fused or eager, on generated inputs.

Imported by the benchmark; also run as `python -m bench.loss_case IMPL FORGET RETAIN N H V DTYPE DEVICE`
to report peak extra memory of a single step in a fresh process (prints one JSON line)."""
import json
import sys

import torch

import unlearn_engine as ue
from unlearn_engine.fused_logprob import default_chunk_size
from unlearn_engine.reference import unlearning_loss_reference
from unlearn_engine.reference.unlearning_loss import objective_from_token_terms


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
    """A fused cross-entropy library that only returns the token-mean CE: timed on GA + NLL, whose work it has
    (6NHV), as the plain loss, not the unlearning objective itself."""
    def loss(hidden, weight, labels, *_args, **_kwargs):
        return (fn(hidden, weight, labels),)
    return loss


def _per_token_peer(token_nll):
    """A fused cross-entropy library that returns per-token CE, finished with the same objective as ours and eager
    (objective_from_token_terms: per-sample sums, GA or NPO forget terms, the NLL retain term). The KL objectives
    need each token's full distributions, which such libraries never hand out."""
    def loss(hidden, weight, labels, sample_index, roles, **kwargs):
        token_logp = -token_nll(hidden, weight, labels).float()
        return objective_from_token_terms(token_logp, labels != -100, sample_index, roles, **kwargs)
    return loss


PEERS = {}  # name -> the objectives (forget, retain) it can compute; filled by peer_impls


def peer_impls(device: str) -> dict:
    """The peers a user would pick instead of our fused loss, where installed (requirements-dev.txt pins
    cut-cross-entropy; scripts/fetch_gpu_wheels.sh carries the GPU-only ones):
      compile      torch.compile of the eager loss, every objective
      cce_compile  cut-cross-entropy's impl="torch_compile" (torch.compile of logits + cross entropy, per token)
                   finished with the same objective: the NLL objectives
      cce          (GPU) cut-cross-entropy's own Triton kernels, the same way
      liger        (GPU) liger-kernel's fused linear cross entropy: token-mean CE only, so GA + NLL's work"""
    nll = [(f, "nll") for f in ("ga", "npo")]
    every = [("ga", "nll"), ("npo", "nll"), ("ga", "kl"), ("npo", "kl")]
    found = {"compile": (torch.compile(eager_loss), every)}
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        linear_cross_entropy = None
    if linear_cross_entropy is not None:
        found["cce_compile"] = (_per_token_peer(lambda h, w, y: linear_cross_entropy(
            h, w, y, reduction="none", impl="torch_compile")), nll)
    if device == "cuda" and linear_cross_entropy is not None:
        found["cce"] = (_per_token_peer(lambda h, w, y: linear_cross_entropy(h, w, y, reduction="none", impl="cce")),
                        nll)
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            pass
        else:
            liger = LigerFusedLinearCrossEntropyLoss()
            found["liger"] = (_plain_ce(lambda h, w, y: liger(w, h, y)), [("ga", "nll")])
    IMPLS.update({name: fn for name, (fn, _) in found.items()})
    PEERS.update({name: objectives for name, (_, objectives) in found.items()})
    return {name: fn for name, (fn, _) in found.items()}


def supports(impl: str, forget: str, retain: str) -> bool:
    return impl not in PEERS or (forget, retain) in PEERS[impl]


def flop_count(impl: str, forget: str, retain: str | None, n: int, h: int, v: int, *, chunk_size: int | None = None,
               samples: int = 8, device: str = "cpu", element_size: int = 4) -> int:
    """Flop of one forward + backward on the LM-head GEMMs (2 per multiply-add), as each path really does them.

    Logits 2NHV (the reference model's too, forward only, under retain="kl"); dL/dh and dL/dW 4NHV. The fused path
    makes every objective's gradients in its one forward walk, NPO included: GA+NLL and NPO+NLL 6NHV, GA+KL and
    NPO+KL 8NHV, as eager (which keeps its logits). The only extra is the fused NPO's forward-only pre-pass over a
    forget sample longer than the chunk (2 H V per such row; make_inputs' samples are n / samples rows long, and
    chunk_size defaults to the rule unlearning_loss uses on `device`). The capturable path walks every row (all are
    labelled here) and gives NPO a forward pre-pass over all of them (+2NHV). The peers: torch.compile of eager does
    eager's GEMMs, cut-cross-entropy's torch_compile path and liger-kernel 6NHV (NLL objectives), cut-cross-entropy's
    kernels 8NHV (the backward makes the logits again)."""
    gemm = 2 * n * h * v
    logits = gemm * (2 if retain == "kl" else 1)
    total = logits + 2 * gemm
    if (impl == "capturable" and forget == "npo") or impl == "cce":
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


def lm_head_gemms(args, kwargs, chunk_size=None):
    """The LM-head GEMMs of one forward + backward and nothing else, the floor under any implementation that does
    them through the vendor BLAS: the logits (and, for retain="kl", the reference logits), dL/dh and dL/dW, on the
    logits themselves standing in for their gradient. chunk_size=None: eager's full-size GEMMs, h W^T, G W, G^T h.
    Else the fused CPU walk's: per chunk W h^T (logits column-major), then dz W and dW += dz^T h."""
    hidden, weight = args[0].detach(), args[1].detach()
    ref = (kwargs["ref_hidden"], kwargs["ref_weight"]) if kwargs.get("retain") == "kl" else None
    if chunk_size is None:
        z = hidden @ weight.t()
        if ref:
            ref[0] @ ref[1].t()
        return z @ weight, z.t() @ hidden
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros_like(weight)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start:start + chunk_size]
        z_t = weight @ h.t()
        if ref:
            ref[1] @ ref[0][start:start + chunk_size].t()
        grad_hidden[start:start + chunk_size] = z_t.t() @ weight
        grad_weight.addmm_(z_t, h)
    return grad_hidden, grad_weight


def _peak_memory(impl, forget, retain, n, h, v, dtype, device):
    """Peak extra memory of one step after a warm-up step (a compiled peer compiles there; every impl gets the same
    warm-up). The probe's process runs with a fixed glibc mmap threshold (probe_in_subprocess), so buffers freed by
    the warm-up go back to the kernel and the measured step's allocations show in its peak RSS."""
    import gc

    from common import peak_rss_bytes, reset_peak_rss  # bench/ is on sys.path when run from the probe

    dtype = getattr(torch, dtype)
    peer_impls(device)
    args, kwargs = make_inputs(forget, retain, int(n), int(h), int(v), dtype, device)
    step(impl, args, kwargs)
    args[0].grad = args[1].grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(impl, args, kwargs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = reset_peak_rss()
    step(impl, args, kwargs)
    return peak_rss_bytes() - base


def gradient_bytes(args):
    """Bytes of the gradients a step must produce (any method): excluded from 'workspace'."""
    return sum(t.numel() * t.element_size() for t in args[:2])


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    print(json.dumps({"peak_extra_bytes": _peak_memory(*sys.argv[1:])}))
