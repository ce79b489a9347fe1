"""Selective weight masking: exact top-k masks by magnitude, and optimizer steps that touch only the
selected weights (DESIGN.md, op contract 3). Kernels in csrc/weight_masking.

    sal = ue.saliency(model, forget_batches, loss_fn)          # |sum of forget-loss gradients|
    mask = ue.topk_mask(sal, 0.05)                              # top 5% over the whole model
    opt = ue.MaskedOptimizer(model.parameters(), mask, lr=1e-5) # AdamW on those weights only
"""
import json
import math
from typing import List, Sequence

import torch
from safetensors.torch import load_file, save_file

from unlearn_engine._library import ops
from unlearn_engine.atomic import atomic_path
from unlearn_engine.checks import fail

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_BIT = torch.arange(8, dtype=torch.uint8)


@torch.library.register_fake("unlearn_engine::topk_mask")
def _topk_mask_fake(tensors, k, per_tensor):
    return [t.new_empty((t.numel() + 7) // 8, dtype=torch.uint8) for t in tensors]


@torch.library.register_fake("unlearn_engine::masked_adamw_")
def _masked_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, indices, compact_state, lr, beta1, beta2, eps,
                       weight_decay, step, validate=True):
    return None


@torch.library.register_fake("unlearn_engine::masked_sgd_")
def _masked_sgd_fake(params, grads, momentum_buffers, indices, compact_state, lr, momentum, dampening,
                     weight_decay, nesterov, first_step, validate=True):
    return None


def _check_tensor_list(tensors, name):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        tensors = list(tensors) if not isinstance(tensors, torch.Tensor) else [tensors]
    if not tensors:
        fail(f"{name} must be a non-empty list of tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            fail(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != tensors[0].dtype or t.device != tensors[0].device:
            fail(f"{name} must share one dtype and device: {name}[0] is {tensors[0].dtype} on {tensors[0].device}, "
                  f"{name}[{i}] is {t.dtype} on {t.device}")
    if tensors[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        fail(f"{name} must be float32, float16 or bfloat16, got {tensors[0].dtype}")
    return list(tensors)


def selection_count(fraction: float, n: int) -> int:
    """k = ceil(fraction * n), robust to the binary rounding of fraction (0.1 * 30 -> 3, not 4)."""
    return min(n, math.ceil(fraction * n * (1 - 1e-12)))


class Mask:
    """One bit per element for a list of tensors (bit j of byte b is flat element 8b + j)."""

    def __init__(self, bits: List[torch.Tensor], shapes: Sequence[torch.Size]):
        if len(bits) != len(shapes):
            fail(f"bits ({len(bits)}) and shapes ({len(shapes)}) must have the same length")
        for i, (b, s) in enumerate(zip(bits, shapes)):
            if b.dtype != torch.uint8 or b.dim() != 1 or b.numel() != (math.prod(s) + 7) // 8:
                fail(f"bits[{i}] must be a 1-D uint8 tensor of {(math.prod(s) + 7) // 8} bytes for shape {tuple(s)}")
        self.bits = list(bits)
        self.shapes = [torch.Size(s) for s in shapes]
        self._indices: dict = {}
        self._source = None  # (parent Mask, positions) for a subset: indices are cached in the parent

    def __len__(self):
        return len(self.bits)

    def __repr__(self):
        total = sum(s.numel() for s in self.shapes)
        return f"Mask({len(self)} tensors, {self.count()} of {total} selected)"

    def count(self, i: int | None = None) -> int:
        bits = self.bits if i is None else [self.bits[i]]
        return int(sum(_POPCOUNT.to(b.device)[b.long()].sum() for b in bits))

    def dense(self, i: int) -> torch.Tensor:
        """The mask of tensor i as a bool tensor of its shape."""
        b = self.bits[i]
        unpacked = (b.unsqueeze(1) >> _BIT.to(b.device)) & 1
        return unpacked.reshape(-1)[: self.shapes[i].numel()].reshape(self.shapes[i]).bool()

    def indices(self, i: int) -> torch.Tensor:
        """Flat int32 indices of the selected elements of tensor i, ascending (cached)."""
        if i not in self._indices and self._source is not None:
            parent, positions = self._source
            self._indices[i] = parent.indices(positions[i])  # made once, in the parent: no recompute per subset
        if i not in self._indices:
            if self.shapes[i].numel() >= 2**31:
                fail(f"tensor {i} has {self.shapes[i].numel()} elements; masked steps index with int32")
            self._indices[i] = self.dense(i).reshape(-1).nonzero().squeeze(1).to(torch.int32)
        return self._indices[i]

    def subset(self, positions: Sequence[int]) -> "Mask":
        """The mask of the tensors at `positions` (sharing bits and cached indices)."""
        positions = list(positions)
        sub = Mask([self.bits[i] for i in positions], [self.shapes[i] for i in positions])
        sub._indices = {n: self._indices[i] for n, i in enumerate(positions) if i in self._indices}
        sub._source = (self, positions)
        return sub

    def check_matches(self, tensors: Sequence[torch.Tensor], name: str):
        if len(tensors) != len(self.shapes):
            fail(f"mask was built for {len(self.shapes)} tensors, {name} has {len(tensors)}")
        for i, t in enumerate(tensors):
            if t.shape != self.shapes[i]:
                fail(f"mask was built for shape {tuple(self.shapes[i])} at position {i}, {name}[{i}] has "
                      f"{tuple(t.shape)}")
            if t.device != self.bits[i].device:
                fail(f"mask is on {self.bits[i].device}, {name}[{i}] is on {t.device}")

    def apply_(self, grads: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Zero the unselected elements of each gradient, in place."""
        self.check_matches(grads, "grads")
        for i, g in enumerate(grads):
            g.masked_fill_(~self.dense(i), 0)
        return grads

    def to(self, device) -> "Mask":
        return Mask([b.to(device) for b in self.bits], self.shapes)

    def save(self, path: str):
        """safetensors file, written atomically (temp file + rename)."""
        tensors = {f"bits.{i}": b.contiguous().cpu() for i, b in enumerate(self.bits)}
        meta = {"shapes": json.dumps([list(s) for s in self.shapes]), "format": "unlearn_engine.Mask/1"}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str, device="cpu") -> "Mask":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "unlearn_engine.Mask/1":
            fail(f"{path} is not an unlearn_engine mask file")
        shapes = json.loads(meta["shapes"])
        tensors = load_file(path, device=str(device))
        return cls([tensors[f"bits.{i}"] for i in range(len(shapes))], shapes)


def topk_mask(tensors: Sequence[torch.Tensor], fraction: float, *, scope: str = "global") -> Mask:
    """Select exactly k = ceil(fraction * N) elements of largest |value| (N over the whole list for
    scope="global", over each tensor for "per_tensor"). Every selected |value| >= every unselected one; ties
    at the threshold go to the earliest (tensor, flat index). Radix select: no sort, no concatenation."""
    tensors = _check_tensor_list(tensors, "tensors")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        fail(f"fraction must be a number in (0, 1], got {fraction!r}")
    if scope not in ("global", "per_tensor"):
        fail(f"scope must be 'global' or 'per_tensor', got {scope!r}")
    flat = [t.detach().reshape(-1) for t in tensors]
    if scope == "global":
        k = [selection_count(fraction, sum(t.numel() for t in flat))]
    else:
        k = [selection_count(fraction, t.numel()) for t in flat]
    try:
        bits = ops.topk_mask(flat, k, scope == "per_tensor")
    except RuntimeError as err:
        if "NaN" in str(err):
            raise ValueError(f"tensors: {err}") from None
        raise
    return Mask(bits, [t.shape for t in tensors])


def _check_finite(grads, name):
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).tolist()
    bad = [i for i, ok in enumerate(finite) if not ok]
    if bad:
        raise FloatingPointError(f"{name}{bad} contain NaN or Inf")


def masked_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                  exp_avg_sqs: Sequence[torch.Tensor], mask: Mask, *, step: int, lr: float,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                  compact_state: bool = False) -> None:
    """AdamW on the selected elements only, in place, one launch for all tensors. Unselected parameters and
    their state are not read or written. With compact_state, exp_avgs[i] / exp_avg_sqs[i] hold one slot per
    selected element of params[i] (mask.count(i) elements) instead of the parameter's shape."""
    params = _check_tensor_list(params, "params")
    mask.check_matches(params, "params")
    if not step >= 1:
        fail(f"step must be >= 1, got {step}")
    if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
        fail(f"need lr >= 0, eps > 0, weight_decay >= 0, betas in [0, 1); got lr={lr}, eps={eps}, "
              f"weight_decay={weight_decay}, betas={betas}")
    ops.masked_adamw_(params, list(grads), list(exp_avgs), list(exp_avg_sqs),
                      [mask.indices(i) for i in range(len(params))], compact_state, float(lr), float(betas[0]),
                      float(betas[1]), float(eps), float(weight_decay), int(step),
                      False)  # Mask.indices are in range, ascending and unique by construction: no device sync


def masked_sgd_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                momentum_buffers: Sequence[torch.Tensor], mask: Mask, *, lr: float, momentum: float = 0.0,
                dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, first_step: bool = False,
                compact_state: bool = False) -> None:
    """SGD (torch.optim.SGD semantics: coupled weight decay, momentum buffer = grad on the first step) on the
    selected elements only. momentum_buffers may be None when momentum == 0."""
    params = _check_tensor_list(params, "params")
    mask.check_matches(params, "params")
    if nesterov and (momentum <= 0 or dampening != 0):
        fail("nesterov needs momentum > 0 and dampening == 0")
    buffers = list(momentum_buffers) if momentum_buffers is not None else []
    ops.masked_sgd_(params, list(grads), buffers, [mask.indices(i) for i in range(len(params))], compact_state,
                    float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov),
                    bool(first_step), False)  # Mask.indices are valid by construction (see masked_adamw_)


class MaskedOptimizer(torch.optim.Optimizer):
    """Drop-in optimizer that updates only the weights a Mask selects (AdamW or SGD), bit-for-bit leaving
    the rest, with compact_state=True keeping optimizer state for the selected elements only.

    Parameters whose .grad is None are skipped, as torch.optim does."""

    def __init__(self, params, mask: Mask, *, algorithm: str = "adamw", lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, compact_state: bool = False, check_finite: bool = True):
        if algorithm not in ("adamw", "sgd"):
            fail(f"algorithm must be 'adamw' or 'sgd', got {algorithm!r}")
        params = list(params)
        mask.check_matches(params, "params")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        dampening=dampening, nesterov=nesterov)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            fail("MaskedOptimizer takes one parameter group (the mask is positional)")
        self.mask, self.algorithm, self.compact_state, self.check_finite = mask, algorithm, compact_state, check_finite

    def _slot(self, i, p):
        return torch.zeros(self.mask.count(i) if self.compact_state else p.shape, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        active = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
        if not active:
            return loss
        grads = [p.grad for _, p in active]
        sub_mask = self.mask.subset([i for i, _ in active])
        if self.check_finite:  # only the selected entries are ever read
            _check_finite([g.reshape(-1)[sub_mask.indices(j)] for j, g in enumerate(grads)], "grads")
        params = [p for _, p in active]
        for i, p in active:
            state = self.state[p]
            if not state:
                state["step"] = 0
                if self.algorithm == "adamw":
                    state["exp_avg"], state["exp_avg_sq"] = self._slot(i, p), self._slot(i, p)
                elif group["momentum"] != 0:
                    state["momentum_buffer"] = self._slot(i, p)
            state["step"] += 1
        # One fused launch per distinct step count (params that got gradients later are at lower steps).
        by_step = {}
        for j, p in enumerate(params):
            by_step.setdefault(self.state[p]["step"], []).append(j)
        for step, js in by_step.items():
            ps, gs = [params[j] for j in js], [grads[j] for j in js]
            m = sub_mask.subset(js)
            if self.algorithm == "adamw":
                masked_adamw_(ps, gs, [self.state[p]["exp_avg"] for p in ps], [self.state[p]["exp_avg_sq"] for p in ps],
                              m, step=step, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                              weight_decay=group["weight_decay"], compact_state=self.compact_state)
            else:
                buffers = [self.state[p]["momentum_buffer"] for p in ps] if group["momentum"] != 0 else None
                masked_sgd_(ps, gs, buffers, m, lr=group["lr"], momentum=group["momentum"],
                            dampening=group["dampening"], weight_decay=group["weight_decay"],
                            nesterov=group["nesterov"], first_step=step == 1, compact_state=self.compact_state)
        return loss

    def state_bytes(self) -> int:
        """Bytes held as optimizer state (moments, plus the int32 index lists of the mask)."""
        total = sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        return total + sum(self.mask.indices(i).numel() * 4 for i in range(len(self.mask)))


def saliency(model: torch.nn.Module, forget_batches, loss_fn, *, params: Sequence[torch.Tensor] | None = None,
             progress: bool = True) -> List[torch.Tensor]:
    """SalUn-style saliency: |sum over forget batches of d loss_fn(model, batch) / d param|.

    Gradients accumulate in the parameters' own .grad buffers (no second copy of all gradients); the
    parameters' previous .grad values are restored afterwards."""
    from tqdm.auto import tqdm

    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        fail("model has no parameter with requires_grad=True")
    previous = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        for batch in tqdm(forget_batches, desc="saliency", disable=not progress, leave=False):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss_fn returned a non-finite loss ({loss.item()}) on a forget batch")
            loss.backward()
        result = [p.grad.abs_() if p.grad is not None else torch.zeros_like(p) for p in params]
    finally:
        for p, g in zip(params, previous):
            p.grad = g
    return result


def saliency_mask(model: torch.nn.Module, forget_batches, loss_fn, fraction: float, *,
                  params: Sequence[torch.Tensor] | None = None, hold="cpu", reduce=None,
                  progress: bool = True) -> Mask:
    """topk_mask(saliency(model, forget_batches, loss_fn, params=params), fraction), bit for bit, without the
    gradient of the whole model on the parameters' device: each parameter's gradient is added, as soon as autograd
    has accumulated it (a post-accumulate-grad hook), into a running sum held on `hold` (CPU memory by default) in
    the gradient's dtype, and freed; the same additions in the same order as .grad accumulation makes, so the sums
    are the ones saliency() ranks. The device holds one parameter's gradient at a time; `hold` holds the sums (the
    gradient's bytes). `reduce(scores)` (e.g. an average over ranks, in place) runs on the |sums| before the
    selection. The Mask lives on `hold`; the parameters' previous .grad values are restored afterwards."""
    from tqdm.auto import tqdm

    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        fail("model has no parameter with requires_grad=True")
    sums: List[torch.Tensor | None] = [None] * len(params)

    def hook_for(i):
        def hook(p):
            grad, p.grad = p.grad.to(hold), None
            if sums[i] is None:
                sums[i] = grad
            else:
                sums[i].add_(grad)
        return hook

    previous = [p.grad for p in params]
    handles = [p.register_post_accumulate_grad_hook(hook_for(i)) for i, p in enumerate(params)]
    try:
        for p in params:
            p.grad = None
        for batch in tqdm(forget_batches, desc="saliency", disable=not progress, leave=False):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss_fn returned a non-finite loss ({loss.item()}) on a forget batch")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(params, previous):
            p.grad = g
    scores = [s.abs_() if s is not None else torch.zeros(p.shape, dtype=p.dtype, device=hold)
              for s, p in zip(sums, params)]
    if reduce is not None:
        reduce(scores)
    return topk_mask(scores, fraction)
