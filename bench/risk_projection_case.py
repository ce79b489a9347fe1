"""Risk projection cases for the benchmark; `python -m bench.risk_case CASE IMPL` reports peak extra memory."""
import json
import math
import sys

import torch

import unlearn_engine as ue

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPE = (32, 576, 4096, 16)  # images, tokens per image, H, rank


def make_inputs():
    b, t, h, k = SHAPE
    g = torch.Generator().manual_seed(0)
    U = ue.unsafe_subspace(torch.randn(64, h, generator=g), k).to(DEVICE)
    x = torch.randn(b, t, h, generator=g).to(DEVICE, DTYPE)
    return x, U


def eager_threshold(x, U, threshold=0.005, strength=2.0):
    rows = x.reshape(-1, x.shape[-1])
    coef = rows.float() @ U
    scores = coef.pow(2).sum(-1) / rows.float().pow(2).sum(-1).clamp(min=1e-30)
    idx = (scores >= threshold).nonzero().squeeze(1)
    out = rows.clone()
    out.index_add_(0, idx, (strength * coef[idx] @ U.T).to(x.dtype))
    return out.reshape(x.shape), scores


def eager_top_fraction(x, U, fraction=0.1, strength=2.0):
    b, t, _ = x.shape
    rows = x.reshape(-1, x.shape[-1])
    coef = rows.float() @ U
    scores = (coef.pow(2).sum(-1) / rows.float().pow(2).sum(-1).clamp(min=1e-30)).reshape(b, t)
    top = scores.topk(math.ceil(fraction * t), dim=1).indices
    idx = (top + torch.arange(b, device=x.device).unsqueeze(1) * t).reshape(-1)
    out = rows.clone()
    out.index_add_(0, idx, (strength * coef[idx] @ U.T).to(x.dtype))
    return out.reshape(x.shape), scores


CASES = {
    "threshold": {"eager": eager_threshold,
                  "fused": lambda x, U: ue.risk_project(x, U, threshold=0.005, strength=2.0)},
    "top10%": {"eager": eager_top_fraction,
               "fused": lambda x, U: ue.risk_project(x, U, top_fraction=0.1, strength=2.0)},
}


def _peak(case, impl):
    import gc

    from common import peak_rss_bytes, reset_peak_rss

    x, U = make_inputs()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        CASES[case][impl](x, U)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    gc.collect()
    base = reset_peak_rss()
    CASES[case][impl](x, U)
    return peak_rss_bytes() - base


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    print(json.dumps({"peak_extra_bytes": _peak(*sys.argv[1:])}))
