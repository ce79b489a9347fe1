"""Eager references for risk projection: matmul, norms, mask, index_add (the composite users write today)."""
import math

import torch


def risk_project_reference(x, U, *, threshold=None, top_fraction=None, strength=1.0):
    xf = x.float()
    coef = xf @ U.float()
    norm2 = xf.pow(2).sum(-1)
    scores = torch.where(norm2 > 0, coef.pow(2).sum(-1) / norm2.clamp(min=1e-30), torch.zeros_like(norm2))
    if threshold is not None:
        selected = scores >= threshold
    else:
        t = x.shape[1]
        count = math.ceil(top_fraction * t * (1 - 1e-12))
        order = torch.sort(-scores, dim=1, stable=True).indices[:, :count]
        selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    selected = selected & (norm2 > 0)
    update = strength * (coef @ U.float().T)
    out = torch.where(selected.unsqueeze(-1), xf + update, xf).to(x.dtype)
    return out, scores


def risk_prototypes_reference(x, P, *, threshold, strength=1.0):
    xf = x.float()
    unit = P.float() / P.float().norm(dim=1, keepdim=True)
    norm = xf.norm(dim=-1, keepdim=True)
    cos = torch.where(norm > 0, (xf @ unit.T) / norm.clamp(min=1e-30), torch.zeros_like(xf @ unit.T))
    weights = torch.where(cos > threshold, strength * cos, torch.zeros_like(cos))
    out = (xf + weights @ unit).to(x.dtype)
    best = torch.where(norm.squeeze(-1) > 0, cos.max(-1).values, torch.zeros_like(norm.squeeze(-1)))
    return out, best
