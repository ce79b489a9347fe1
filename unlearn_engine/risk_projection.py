"""Visual-token risk projection for Risk Awareness Injection (RAI; DESIGN.md, op contract 2).

Training-free: build an unsafe subspace (or prototypes) from the language model's own input embeddings of
unsafe keywords, score each visual token against it, and amplify the risk direction on the few high-risk
tokens. Kernels in csrc/risk_projection; RiskAwareness attaches them to a LLaVA-family model by hooks.
"""
import math
from typing import Dict, List, Sequence

import torch

from unlearn_engine._library import ops
from unlearn_engine.checks import fail

SUBSPACE, PROTOTYPES = 0, 1
MAX_BASIS = 64  # rank / prototype count one fused pass handles

# A small default concept list in a few harm categories (override with your own).
DEFAULT_UNSAFE_KEYWORDS: Dict[str, List[str]] = {
    "violence": ["kill", "murder", "attack", "assault", "stab", "shoot"],
    "weapons": ["bomb", "explosive", "gun", "weapon", "grenade", "poison"],
    "drugs": ["cocaine", "heroin", "meth", "drug", "overdose"],
    "cybercrime": ["hack", "malware", "ransomware", "phishing", "exploit"],
    "fraud": ["steal", "fraud", "scam", "counterfeit", "launder"],
    "self_harm": ["suicide", "self-harm", "cut"],
    "hate": ["hate", "terrorist", "extremist"],
}


@torch.library.register_fake("unlearn_engine::risk_scores")
def _risk_scores_fake(x, basis, kind):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.register_fake("unlearn_engine::risk_project_rows")
def _risk_project_rows_fake(x, basis, select, kind, threshold, strength):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.register_fake("unlearn_engine::risk_project_rows_")
def _risk_project_rows_inplace_fake(x, basis, select, kind, threshold, strength):
    return x.new_empty(x.shape[0], dtype=torch.float32)


def unsafe_subspace(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal top-k right singular vectors (H, k) of the embedding rows (M, H), no centering, fp32.
    Signs are fixed (largest-magnitude entry of each vector positive) so the result is deterministic."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        fail("embeddings must be a 2-D floating tensor (M, H)")
    m, h = embeddings.shape
    if not isinstance(k, int) or k < 1 or k > min(m, h):
        fail(f"k must be an int in [1, min(M, H) = {min(m, h)}], got {k!r}")
    _, _, vh = torch.linalg.svd(embeddings.float(), full_matrices=False)
    basis = vh[:k].T.contiguous()
    flip = basis.gather(0, basis.abs().argmax(0, keepdim=True)).sign()
    return basis * torch.where(flip == 0, torch.ones_like(flip), flip)


def _check_x(x, h_expected, name_basis):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        fail("x must be a floating tensor (..., H)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        fail(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != h_expected:
        fail(f"x has H={x.shape[-1]} but {name_basis} has H={h_expected}")
    if x.requires_grad and torch.is_grad_enabled():
        fail("risk projection is an inference op: call it under torch.no_grad() or pass x.detach()")


def _check_basis(basis, name, *, orthonormal):
    if not isinstance(basis, torch.Tensor) or basis.dim() != 2 or not basis.is_floating_point():
        fail(f"{name} must be a 2-D floating tensor")
    h, k = basis.shape
    if k < 1:
        fail(f"{name} must have at least one column (rank >= 1)")
    if k > min(h, MAX_BASIS):
        fail(f"{name} has {k} columns; at most min(H={h}, {MAX_BASIS}) are supported")
    if orthonormal:
        gram = basis.float().T @ basis.float()
        err = (gram - torch.eye(k, device=basis.device)).abs().max().item()
        if err > 1e-3:
            fail(f"{name} must have orthonormal columns (max |U^T U - I| = {err:.3g}); build it with "
                  "unlearn_engine.unsafe_subspace")


def _run_rows(x, basis, select, mode, threshold, strength, inplace):
    rows = x.reshape(-1, x.shape[-1])
    if inplace:
        if not x.is_contiguous():
            fail("inplace=True needs a contiguous x")
        scores = ops.risk_project_rows_(rows, basis, select, mode, float(threshold), float(strength))
        return x, scores.reshape(x.shape[:-1])
    out, scores = ops.risk_project_rows(rows, basis, select, mode, float(threshold), float(strength))
    return out.reshape(x.shape), scores.reshape(x.shape[:-1])


def risk_project(x: torch.Tensor, U: torch.Tensor, *, threshold: float | None = None,
                 top_fraction: float | None = None, strength: float = 1.0,
                 inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Subspace mode: s_i = ||U^T x_i||^2 / ||x_i||^2 (0 for a zero row); selected rows (s_i >= threshold, or
    among the ceil(top_fraction * T) highest scores of their sequence for x of shape (B, T, H), ties to the
    earlier token) become x_i + strength * U U^T x_i. Returns (x_out, scores fp32 of shape x.shape[:-1])."""
    _check_basis(U, "U", orthonormal=True)
    _check_x(x, U.shape[0], "U")
    if (threshold is None) == (top_fraction is None):
        fail("give exactly one of threshold or top_fraction")
    if U.device != x.device:
        fail(f"U is on {U.device}, x is on {x.device}")
    basis = U.float().contiguous()
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            fail(f"threshold must be in [0, 1] in subspace mode (scores are energy fractions), got {threshold}")
        return _run_rows(x, basis, None, SUBSPACE, threshold, strength, inplace)
    if not 0.0 < top_fraction <= 1.0:
        fail(f"top_fraction must be in (0, 1], got {top_fraction}")
    if x.dim() != 3:
        fail(f"top_fraction needs x of shape (B, T, H), got {tuple(x.shape)}")
    return _top_fraction(x, basis, top_fraction, strength, inplace)


def _top_fraction(x, basis, top_fraction, strength, inplace):
    # One pass over x scores every row (and, out of place, copies it to the output); only the selected
    # rows (about top_fraction of them) are then read again, updated and written back.
    b, t, h = x.shape
    rows = x.reshape(-1, h)
    if inplace:
        if not x.is_contiguous():
            fail("inplace=True needs a contiguous x")
        out_rows, scores = rows, ops.risk_scores(rows, basis, SUBSPACE)
    else:
        none = torch.zeros(rows.shape[0], dtype=torch.bool, device=x.device)
        out_rows, scores = ops.risk_project_rows(rows, basis, none, SUBSPACE, 0.0, float(strength))
    count = math.ceil(top_fraction * t * (1 - 1e-12))
    order = torch.sort(-scores.reshape(b, t), dim=1, stable=True).indices[:, :count]  # ties: earlier token
    index = (order + torch.arange(b, device=x.device).unsqueeze(1) * t).reshape(-1)
    picked = rows.index_select(0, index)
    everyone = torch.ones(index.numel(), dtype=torch.bool, device=x.device)
    ops.risk_project_rows_(picked, basis, everyone, SUBSPACE, 0.0, float(strength))
    out_rows.index_copy_(0, index, picked)
    return out_rows.reshape(x.shape), scores.reshape(b, t)


def risk_prototypes(x: torch.Tensor, P: torch.Tensor, *, threshold: float, strength: float = 1.0,
                    inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototype mode: c_ik = cos(x_i, p_k); x_i += strength * sum_{k: c_ik > threshold} c_ik p_k / ||p_k||.
    Returns (x_out, max_k c_ik) (0 for a zero row)."""
    _check_basis(P.T if isinstance(P, torch.Tensor) and P.dim() == 2 else P, "P^T", orthonormal=False)
    _check_x(x, P.shape[1], "P")
    if not -1.0 <= threshold <= 1.0:
        fail(f"threshold must be a cosine in [-1, 1], got {threshold}")
    norms = P.float().norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        fail("P has a zero prototype row")
    basis = (P.float() / norms).T.contiguous()
    return _run_rows(x, basis, None, PROTOTYPES, threshold, strength, inplace)


def concept_embeddings(tokenizer, embedding_matrix: torch.Tensor,
                       keywords: Sequence[str] | None = None) -> torch.Tensor:
    """One row per keyword: the mean input embedding of its tokens (no special tokens). Keywords that the
    tokenizer maps to nothing, or only to unknown tokens, are skipped; an error if none is left."""
    if keywords is None:
        keywords = [w for words in DEFAULT_UNSAFE_KEYWORDS.values() for w in words]
    unk = getattr(tokenizer, "unk_token_id", None)
    rows = []
    for word in keywords:
        ids = [i for i in tokenizer(word, add_special_tokens=False)["input_ids"] if i != unk]
        if ids:
            rows.append(embedding_matrix.detach()[torch.tensor(ids, device=embedding_matrix.device)].float().mean(0))
    if not rows:
        fail("none of the keywords maps to known tokens of this tokenizer")
    return torch.stack(rows)
