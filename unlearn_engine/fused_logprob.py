"""The fused linear + log-likelihood op (csrc/unlearning_loss/fused_logprob.cpp) seen from Python: fake
kernels and autograd for torch.compile, the chunk-size rule, and `group_objective`, the one entry point the
losses of unlearning_loss.py are written in.

A group objective is a sum over token groups g (a sample, or a pooled set of samples) of
    term_g = linear_g * m_g + sigmoid_g * (2 / beta) * softplus(beta * (m_g + shift_g)),   m_g = S_g / denom_g
where S_g is the sum of the log-likelihoods of the group's labelled tokens, plus sum_t coef_kl_t * KL_t over
tokens when reference logits are given. GA / NLL are linear (sigmoid_g = 0); NPO, SimNPO and retain-side NPO use
the softplus part (shift = -ref, or +delta). Its gradient with respect to S_g is
    (linear_g + 2 * sigmoid_g * sigmoid(beta * (m_g + shift_g))) / denom_g.
With gradients wanted, the op fused_group_objective makes them in its one forward chunk walk (6 N H V flop, plus
the reference logits for KL), linear or not: a nonlinear group's rows are kept inside one chunk, so S_g, hence its
coefficient, is known before that chunk's logit gradient is written (a group longer than the chunk gets a
forward-only pre-pass over its own rows).
"""
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from unlearn_engine._library import ops


# ----------------------------------------------------------------------------- op registrations
def _grad_bias_like(bias, hidden, dtype=None):
    # The op returns an empty fp32 tensor for the bias gradient when there is no bias.
    return torch.empty_like(bias, dtype=dtype) if bias is not None else hidden.new_empty(0, dtype=torch.float32)


def _forward_grad_dtype(hidden):
    # Gradients made in the forward walk: fp32 for fp16 inputs (the backward rounds them after the loss scale).
    return torch.float32 if hidden.dtype == torch.float16 else None


def _forward_grads_fake(hidden, weight, bias, weight_grad=True):
    dtype = _forward_grad_dtype(hidden)
    if not weight_grad:  # frozen head: empty weight and bias gradients
        return (torch.empty_like(hidden, dtype=dtype), hidden.new_empty(0, dtype=torch.float32),
                hidden.new_empty(0, dtype=torch.float32))
    return (torch.empty_like(hidden, dtype=dtype), torch.empty_like(weight, dtype=dtype),
            _grad_bias_like(bias, hidden, dtype))


@torch.library.register_fake("unlearn_engine::fused_logprob")
def _fused_logprob_fake(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size, capturable=False):
    n = hidden.shape[0]
    kl_len = n if ref_hidden is not None else 0
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(kl_len, dtype=torch.float32)


@torch.library.register_fake("unlearn_engine::fused_logprob_backward")
def _fused_logprob_backward_fake(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, grad_logp,
                                 grad_kl, chunk_size, capturable=False):
    return torch.empty_like(hidden), torch.empty_like(weight), _grad_bias_like(bias, hidden)


@torch.library.register_fake("unlearn_engine::fused_linear_objective")
def _fused_linear_objective_fake(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, coef_logp,
                                 coef_kl, chunk_size):
    logp, kl = _fused_logprob_fake(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size)
    return (hidden.new_empty((), dtype=torch.float32), logp, kl, *_forward_grads_fake(hidden, weight, bias))


@torch.library.register_fake("unlearn_engine::fused_group_objective")
def _fused_group_objective_fake(hidden, weight, bias, labels, group_index, linear, sigmoid, shift, denom, beta,
                                ref_hidden, ref_weight, ref_bias, coef_kl, chunk_size, weight_grad=True,
                                capturable=False, nonlinear=True):
    logp, kl = _fused_logprob_fake(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size)
    return (hidden.new_empty((), dtype=torch.float32), torch.empty_like(linear), logp, kl,
            *_forward_grads_fake(hidden, weight, bias, weight_grad))


def _fused_logprob_setup(ctx, inputs, output):
    hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size = inputs[:8]
    ctx.save_for_backward(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias)
    ctx.chunk_size = chunk_size
    ctx.capturable = bool(inputs[8]) if len(inputs) > 8 else False
    ctx.has_bias = bias is not None
    ctx.has_ref = ref_hidden is not None


def _fused_logprob_backward(ctx, grad_logp, grad_kl):
    hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias = ctx.saved_tensors
    grad_kl = grad_kl.float().contiguous() if ctx.has_ref else None
    grad_hidden, grad_weight, grad_bias = ops.fused_logprob_backward(
        hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, grad_logp.float().contiguous(), grad_kl,
        ctx.chunk_size, ctx.capturable)
    return grad_hidden, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None, None, None


torch.library.register_autograd("unlearn_engine::fused_logprob", _fused_logprob_backward,
                                setup_context=_fused_logprob_setup)


class _TokenLogprob(torch.autograd.Function):
    """Differentiable fused_logprob for the general path: backward recomputes each chunk's logits with
    the per-token coefficients autograd hands it. (Same formula as the op's register_autograd; a plain
    autograd.Function lets the fresh gradient buffers reach .grad without a copy.)"""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size, capturable=False):
        logp, kl = ops.fused_logprob(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size,
                                     capturable)
        _fused_logprob_setup(ctx, (hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size,
                                   capturable), None)
        return logp, kl

    @staticmethod
    def backward(ctx, grad_logp, grad_kl):
        return _fused_logprob_backward(ctx, grad_logp, grad_kl)


class _GroupObjective(torch.autograd.Function):
    """Differentiable wrapper of fused_group_objective: the gradients of the whole group objective (linear and
    softplus terms, KL) come from the forward walk (6 N H V flop); backward scales them by grad_loss in place.
    Only `loss` is differentiable; group_logp, token_logp and token_kl are diagnostics (see _Diagnostics)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, group_index, linear, sigmoid, shift, denom, beta, ref_hidden,
                ref_weight, ref_bias, coef_kl, chunk_size, capturable, nonlinear):
        # a frozen LM head (LoRA, a trained body) gets no V x H gradient: 4 N H V flop instead of 6
        weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        loss, group_logp, token_logp, token_kl, grad_hidden, grad_weight, grad_bias = ops.fused_group_objective(
            hidden, weight, bias, labels, group_index, linear, sigmoid, shift, denom, beta, ref_hidden, ref_weight,
            ref_bias, coef_kl, chunk_size, weight_grad, capturable, nonlinear)
        if not weight_grad:
            grad_weight = grad_bias = None
        ctx.grads = [grad_hidden, grad_weight, grad_bias]  # on ctx so backward can let go of them
        ctx.dtypes = [hidden.dtype, weight.dtype, bias.dtype if bias is not None else None]
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(group_logp, token_logp, token_kl)
        return loss, group_logp, token_logp, token_kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_group_logp, _grad_logp, _grad_kl):
        if ctx.grads is None:
            raise RuntimeError("the fused group-objective path of unlearning_loss supports one backward per "
                               "forward (its gradients are made in the forward pass)")
        grads, ctx.grads = ctx.grads, None
        # in place (no 2nd V x H buffer); fp16 inputs: fp32 gradients scaled first, then rounded once
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.mul_(grad_loss).to(d or g.dtype)
                                               for g, d in zip(grads, ctx.dtypes))
        return (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * 14


class _Diagnostics(torch.autograd.Function):
    """Makes the token log-likelihoods and KLs of a fused walk differentiable after the fact: forward passes the
    values through; backward, run only when a gradient reaches them (per-sample outputs used in a loss), is the
    recompute path's (fused_logprob_backward, 8 N H V flop). A loss that uses only `loss` never runs it."""

    @staticmethod
    def forward(ctx, token_logp, token_kl, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size,
                capturable):
        _fused_logprob_setup(ctx, (hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size,
                                   capturable), None)
        return token_logp.clone(), token_kl.clone()

    @staticmethod
    def backward(ctx, grad_logp, grad_kl):
        return (None, None) + _fused_logprob_backward(ctx, grad_logp, grad_kl)


# ----------------------------------------------------------------------------- chunking
# On a GPU the per-chunk weight-gradient GEMM (a V x H fp32 output, read and written once per chunk) turns
# memory-bound when chunks are short: at V=151936, H=4096 a 432-row chunk streams the 1.2 GB weight twice and the
# 2.5 GB fp32 gradient per chunk. At least this many rows keep it compute-bound (H100: ~990 TFLOP/s over 3.35 TB/s).
GPU_MIN_CHUNK_ROWS = 1216
GPU_CHUNK_WORKSPACE_BYTES = 1 << 30  # default cap on one chunk's logits (+ reference logits); UE_CHUNK_WORKSPACE_MB


def default_chunk_size(num_tokens: int, vocab_size: int, device: torch.device, *, element_size: int = 2,
                       with_ref: bool = False, workspace_bytes: int | None = None) -> int:
    """Rows per chunk. CPU: one chunk of logits is ~8M elements (32 MB fp32: 256 rows at V=32064, where the
    per-chunk dW update stops costing more than the GEMMs save). GPU: ~64M elements, but never fewer than
    GPU_MIN_CHUNK_ROWS rows (large V), within a workspace budget for the chunk's logits (element_size bytes each,
    twice with reference logits): workspace_bytes, else $UE_CHUNK_WORKSPACE_MB, else 1 GiB."""
    vocab_size = max(vocab_size, 1)
    if device.type == "cpu":
        rows = (1 << 23) // vocab_size
    else:
        if workspace_bytes is None:
            mb = os.environ.get("UE_CHUNK_WORKSPACE_MB")
            workspace_bytes = int(float(mb) * 2**20) if mb else GPU_CHUNK_WORKSPACE_BYTES
        per_row = vocab_size * element_size * (2 if with_ref else 1)
        rows = min(max((1 << 26) // vocab_size, GPU_MIN_CHUNK_ROWS), workspace_bytes // per_row)
    rows = (max(16, rows) // 16) * 16
    return max(1, min(rows, max(num_tokens, 1)))




def _distinct(tensors: list) -> list:
    """Dynamo cannot trace an autograd.Function given one tensor twice (GA passes one zeros for sigmoid and shift):
    later repeats become copies."""
    seen = set()
    out = []
    for t in tensors:
        if t is not None and id(t) in seen:
            t = t.clone()
        elif t is not None:
            seen.add(id(t))
        out.append(t)
    return out


def group_objective(hidden: Tensor, weight: Tensor, labels: Tensor, group_index: Tensor, linear: Tensor,
                    sigmoid: Tensor, shift: Tensor, denom: Tensor, *, beta: float, nonlinear: bool,
                    bias: Tensor | None = None, coef_kl: Tensor | None = None, ref_hidden: Tensor | None = None,
                    ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
                    chunk_size: int, capturable: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The objective of the module docstring, fused (never N x V logits). Arguments are already checked.

    group_index (N,) int64: the token's group in [0, G), or -1 for a token in no group (its log-likelihood is
    still returned). linear, sigmoid, shift, denom: (G,) fp32. nonlinear: whether any sigmoid_g may be nonzero
    (known to the caller without a device sync; False is a promise, checked by a device-side assert). coef_kl (N,)
    fp32 with ref_hidden / ref_weight.
    Returns (loss (), group_logp S (G,), token_logp (N,), token_kl (N,) or (0,)). `loss` is
    differentiable; with nonlinear=True the others are too (a gradient reaching them costs a recompute walk, run only
    then); with nonlinear=False and gradients wanted they are detached diagnostics.

    capturable=True: no device-to-host read (a CUDA graph can hold the call). Every row is walked, labelled or not
    (pass only the rows you need, padded to a fixed count, to keep that cheap), and a nonlinear objective runs a
    forward-only pre-pass over every row first: 8 N H V flop instead of 6. The default reads the labelled-row list
    on the host and, for a nonlinear objective, the group sizes (one sync each).
    """
    num_groups = linear.shape[0]
    # slot num_groups collects the tokens of no group (and of out-of-range groups, which the op reports)
    in_group = (group_index >= 0) & (group_index < num_groups)
    group_slot = torch.where(in_group, group_index, num_groups)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if wants_grad:
        # Gradients of the whole objective in the forward walk (6 N H V flop, nothing recomputed).
        args = [hidden, weight, bias, labels, group_index, linear, sigmoid, shift, denom, ref_hidden, ref_weight,
                ref_bias, coef_kl]
        if torch.compiler.is_compiling():
            args = _distinct(args)
        loss, group_logp, token_logp, token_kl = _GroupObjective.apply(*args[:9], float(beta), *args[9:], chunk_size,
                                                                       capturable, nonlinear)
        if not nonlinear:
            # GA / NLL / KL: the outputs other than loss are detached diagnostics.
            return loss, group_logp, token_logp, token_kl
        # NPO-like objectives keep their per-group and per-token outputs differentiable; the recompute behind
        # them runs only if a gradient reaches them.
        token_logp, token_kl = _Diagnostics.apply(token_logp, token_kl, hidden, weight, bias, labels, ref_hidden,
                                                  ref_weight, ref_bias, chunk_size, capturable)
    else:
        # No gradient wanted: the forward walk alone.
        loss = None
        token_logp, token_kl = _TokenLogprob.apply(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias,
                                                   chunk_size, capturable)
    group_logp = hidden.new_zeros(num_groups + 1, dtype=torch.float32).index_add(0, group_slot, token_logp)[:-1]
    if loss is None:
        mean = group_logp / denom
        loss = (linear * mean + sigmoid * (2.0 / beta) * F.softplus(beta * (mean + shift))).sum()
        if coef_kl is not None:
            loss = loss + (coef_kl * token_kl).sum()
    return loss, group_logp, token_logp, token_kl
