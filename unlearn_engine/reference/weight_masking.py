"""Eager references for the masking kernels: sort-based top-k, and torch.optim with restore."""
import torch

from unlearn_engine.weight_masking import selection_count


def topk_mask_reference(tensors, fraction, scope="global"):
    """Bool masks by a stable sort of |x| (descending; ties keep (tensor, index) order)."""
    flats = [t.detach().float().abs().reshape(-1) for t in tensors]
    if scope == "per_tensor":
        return [_top(f, selection_count(fraction, f.numel())).reshape(t.shape) for f, t in zip(flats, tensors)]
    chosen = _top(torch.cat(flats), selection_count(fraction, sum(f.numel() for f in flats)))
    return [m.reshape(t.shape) for m, t in zip(chosen.split([f.numel() for f in flats]), tensors)]


def _top(values, k):
    order = torch.sort(-values, stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[order[:k]] = True
    return mask


def masked_step_reference(optimizer, params, masks):
    """torch.optim step on all params, then restore unselected params and state: what masked steps must equal."""
    before = [p.detach().clone() for p in params]
    state_before = [{k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
                    for p in params]
    optimizer.step()
    with torch.no_grad():
        for p, old, old_state, m in zip(params, before, state_before, masks):
            p.copy_(torch.where(m, p, old))
            for k, v in optimizer.state[p].items():
                if torch.is_tensor(v) and v.shape == p.shape:  # state made on this step started at zero
                    v.copy_(torch.where(m, v, old_state.get(k, torch.zeros_like(v))))
