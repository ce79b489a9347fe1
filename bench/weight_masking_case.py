"""Selection and masked-step cases for the masking benchmark, on a model-shaped list of tensors.

Also run as `python -m bench.masking_case WHAT IMPL` to report the peak extra memory of one call in a
fresh process (prints one JSON line)."""
import json
import sys

import torch

import unlearn_engine as ue

SHAPES = [(1024, 4096)] * 24  # ~100M parameters, the model-shaped list
FRACTION = 0.05


def make_tensors(device="cpu", shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device) for s in shapes]


# ---------------------------------------------------------------- selection
def select_ours(tensors):
    return ue.topk_mask(tensors, FRACTION)


def select_kthvalue(tensors):
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs_()
    k = ue.weight_masking.selection_count(FRACTION, flat.numel())
    threshold = flat.kthvalue(flat.numel() - k + 1).values
    return [t.abs() >= threshold for t in tensors]


def select_topk(tensors):
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs_()
    k = ue.weight_masking.selection_count(FRACTION, flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[flat.topk(k, sorted=False).indices] = True
    return chosen.split([t.numel() for t in tensors])


SELECT = {"ours": select_ours, "kthvalue": select_kthvalue, "topk": select_topk}


# ---------------------------------------------------------------- optimizer steps
class StepCase:
    """One optimizer step on the tensors: ours (masked, dense or compact state), or torch AdamW."""

    def __init__(self, impl, tensors):
        self.impl = impl
        self.params = [t.clone() for t in tensors]
        for p in self.params:
            p.grad = torch.randn_like(p)
        self.mask = ue.topk_mask([p.grad for p in self.params], FRACTION)
        if impl.startswith("ours"):
            self.opt = ue.MaskedOptimizer(self.params, self.mask, lr=1e-3, compact_state=impl == "ours_compact")
        else:
            # torch's AdamW on the whole model; "grad_mask_restore" is the usual way to mask it
            self.opt = torch.optim.AdamW(self.params, lr=1e-3, foreach=True)
            self.dense = [self.mask.dense(i) for i in range(len(self.params))] if impl == "grad_mask_restore" else None

    def step(self):
        if self.impl == "grad_mask_restore":
            keep = [p.detach().clone() for p in self.params]
            for p, m in zip(self.params, self.dense):
                p.grad.mul_(m)
            self.opt.step()
            with torch.no_grad():
                for p, k, m in zip(self.params, keep, self.dense):
                    p.copy_(torch.where(m, p, k))
        else:
            self.opt.step()

    def state_bytes(self):
        if isinstance(self.opt, ue.MaskedOptimizer):
            return self.opt.state_bytes()
        return sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)


def _peak(what, impl):
    import gc

    from common import peak_rss_bytes, reset_peak_rss

    tensors = make_tensors()
    if what == "select":
        gc.collect()
        base = reset_peak_rss()
        SELECT[impl](tensors)
        return peak_rss_bytes() - base
    case = StepCase(impl, tensors)
    case.step()  # state exists, as in training: measure a steady-state step
    del tensors
    gc.collect()
    base = reset_peak_rss()
    case.step()
    return peak_rss_bytes() - base


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    print(json.dumps({"peak_extra_bytes": _peak(*sys.argv[1:])}))
