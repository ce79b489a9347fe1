"""Fused unlearning losses: GA / NPO / SimNPO forget terms, NLL / KL (+ retain-side NPO) retain terms, RMU.

The heavy lifting is in torch.ops.unlearn_engine (csrc/unlearning_loss); fused_logprob.py registers the op's fake
kernels and autograd and exposes it as `group_objective`. This module checks the arguments and writes each
objective as a group objective: one group per sample under "sample" pooling, one pooled group for the forget
(or retain) samples of the batch under "batch" pooling; then it reduces to per-sample outputs.

With gradients wanted, every objective (linear or not) gets its gradients in the forward chunk walk of
fused_group_objective (6 N H V flop, +2 N H V for KL's reference logits); backward only scales them by
grad_output. Without gradients the walk makes token log-likelihoods only. NPO / SimNPO per-sample outputs stay
differentiable (a recompute runs only if a gradient reaches them).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from unlearn_engine._library import ops
from unlearn_engine.checks import check_tensor, require
from unlearn_engine.fused_logprob import _TokenLogprob, default_chunk_size, group_objective
from unlearn_engine.roles import FORGET, IGNORE, RETAIN

FORGET_OBJECTIVES = ("ga", "npo", "simnpo")
RETAIN_OBJECTIVES = ("nll", "kl", None)
POOLINGS = ("sample", "batch")
NORMALIZES = ("mean", "sum")


# ----------------------------------------------------------------------------- RMU op registration
@torch.library.register_fake("unlearn_engine::rmu_loss")
def _rmu_loss_fake(forget_act, control, retain_act, retain_ref, alpha):
    return forget_act.new_empty((), dtype=torch.float32)


@torch.library.register_fake("unlearn_engine::rmu_loss_backward")
def _rmu_loss_backward_fake(grad, forget_act, control, retain_act, retain_ref, alpha):
    return torch.empty_like(forget_act), torch.empty_like(retain_act)


def _rmu_setup(ctx, inputs, output):
    forget_act, control, retain_act, retain_ref, alpha = inputs
    ctx.save_for_backward(forget_act, control, retain_act, retain_ref)
    ctx.alpha = alpha


def _rmu_backward(ctx, grad):
    forget_act, control, retain_act, retain_ref = ctx.saved_tensors
    grad_forget, grad_retain = ops.rmu_loss_backward(grad, forget_act, control, retain_act, retain_ref, ctx.alpha)
    grad_control = -grad_forget.sum(0) if ctx.needs_input_grad[1] else None
    grad_ref = -grad_retain if ctx.needs_input_grad[3] else None
    return grad_forget, grad_control, grad_retain, grad_ref, None


torch.library.register_autograd("unlearn_engine::rmu_loss", _rmu_backward, setup_context=_rmu_setup)


# ----------------------------------------------------------------------------- argument checks
def _check_unlearning_args(hidden, weight, labels, sample_index, roles, forget, retain, ref_logp, ref_hidden,
                           ref_weight, ref_bias, beta, bias, chunk_size, *, delta=0.0, retain_npo_weight=0.0,
                           pooling=("sample", "sample"), normalize=("mean", "mean")):
    check_tensor(hidden, "hidden", floating=True)
    require(hidden.dim() == 2, f"hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    n, h = hidden.shape
    device = hidden.device
    check_tensor(weight, "weight", dtype=hidden.dtype, device=device)
    require(weight.dim() == 2 and weight.shape[1] == h,
             f"weight must have shape (V, H={h}), got {tuple(weight.shape)}")
    v = weight.shape[0]
    require(v > 0, "weight must have at least one row (V > 0)")
    check_tensor(labels, "labels", shape=(n,), dtype=torch.int64, device=device)
    check_tensor(sample_index, "sample_index", shape=(n,), dtype=torch.int64, device=device)
    check_tensor(roles, "roles", dtype=torch.int64, device=device)
    require(roles.dim() == 1, f"roles must be 1-D (B,), got shape {tuple(roles.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", shape=(v,), dtype=hidden.dtype, device=device)
    require(forget in FORGET_OBJECTIVES, f"forget must be one of {FORGET_OBJECTIVES}, got {forget!r}")
    require(retain in RETAIN_OBJECTIVES, f"retain must be one of {RETAIN_OBJECTIVES}, got {retain!r}")
    require(isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta),
             f"beta must be a finite number > 0, got {beta!r}")
    require(isinstance(delta, (int, float)) and math.isfinite(delta), f"delta must be a finite number, got {delta!r}")
    require(isinstance(retain_npo_weight, (int, float)) and retain_npo_weight >= 0 and math.isfinite(retain_npo_weight),
            f"retain_npo_weight must be a finite number >= 0, got {retain_npo_weight!r}")
    for side, value in zip(("forget", "retain"), pooling):
        require(value in POOLINGS, f"{side}_pooling must be one of {POOLINGS}, got {value!r}")
    for side, value in zip(("forget", "retain"), normalize):
        require(value in NORMALIZES, f"{side}_normalize must be one of {NORMALIZES}, got {value!r}")
    if forget == "npo" or retain_npo_weight > 0:
        what = "forget='npo'" if forget == "npo" else "retain_npo_weight > 0"
        require(ref_logp is not None, f"{what} needs ref_logp (B,): the reference model's log-likelihoods "
                                       "(see unlearn_engine.reference_logp)")
        check_tensor(ref_logp, "ref_logp", shape=(roles.shape[0],), device=device, floating=True)
    if retain == "kl":
        require(ref_hidden is not None and ref_weight is not None,
                 "retain='kl' needs ref_hidden (N, H) and ref_weight (V, H) from the frozen reference model")
    if ref_hidden is not None or ref_weight is not None:
        require(ref_hidden is not None and ref_weight is not None, "ref_hidden and ref_weight go together")
        check_tensor(ref_hidden, "ref_hidden", shape=(n, h), dtype=hidden.dtype, device=device)
        check_tensor(ref_weight, "ref_weight", shape=(v, h), dtype=hidden.dtype, device=device)
    if ref_bias is not None:
        check_tensor(ref_bias, "ref_bias", shape=(v,), dtype=hidden.dtype, device=device)
    if chunk_size is not None:
        require(isinstance(chunk_size, int) and chunk_size > 0,
                f"chunk_size must be a positive int, got {chunk_size!r}")


def resolve_normalize(length_normalize: bool | None, forget_normalize: str | None,
                      retain_normalize: str | None) -> tuple[str, str]:
    """(forget, retain) normalize settings: each explicit setting wins, else length_normalize (True: "mean",
    False: "sum") for both, else "mean"."""
    shared = "mean" if length_normalize is None or length_normalize else "sum"
    return forget_normalize or shared, retain_normalize or shared


def _check_index_values(labels, sample_index, roles, vocab_size, *, on_device=False):
    """Data-dependent checks, done with one device sync (skipped under torch.compile); on_device=True makes them
    device-side asserts instead (no sync: a failure stops the CUDA context, or raises at once on CPU)."""
    num_samples = roles.shape[0]
    bad = torch.stack([
        ((labels != -100) & ((labels < 0) | (labels >= vocab_size))).any(),
        ((sample_index < 0) | (sample_index >= num_samples)).any(),
        ((roles < FORGET) | (roles > IGNORE)).any(),
    ])
    messages = [f"labels must be -100 (ignored) or in [0, V={vocab_size})",
                f"sample_index values must be in [0, B={num_samples}) where B = len(roles)",
                f"roles must be FORGET={FORGET}, RETAIN={RETAIN} or IGNORE={IGNORE}"]
    if on_device:
        for flag, message in zip(bad, messages):
            torch._assert_async(~flag, message)
        return
    for flag, message in zip(bad.tolist(), messages):
        require(not flag, message)


def _report_non_finite(named_tensors):
    culprits = [name for name, t in named_tensors if t is not None and not bool(torch.isfinite(t).all())]
    if culprits:
        raise FloatingPointError(f"non-finite values (NaN or Inf) in input(s): {', '.join(culprits)}")
    raise FloatingPointError("the loss is not finite although all inputs are: check beta, the weights and the scale "
                             "of the logits")


# ----------------------------------------------------------------------------- public ops
class UnlearningLossOutput(NamedTuple):
    loss: torch.Tensor        # scalar, fp32
    per_sample: torch.Tensor  # (B,) L_b, fp32
    logp: torch.Tensor        # (B,) sum of labelled-token log-probabilities, fp32


def unlearning_loss(hidden: Tensor, weight: Tensor, labels: Tensor, sample_index: Tensor, roles: Tensor, *,
                    forget: str = "ga", retain: str | None = "nll", ref_logp: Tensor | None = None,
                    ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None, ref_bias: Tensor | None = None,
                    beta: float = 0.1, delta: float = 0.0, forget_weight: float = 1.0, retain_weight: float = 1.0,
                    retain_npo_weight: float = 0.0, forget_pooling: str = "sample", retain_pooling: str = "sample",
                    forget_normalize: str | None = None, retain_normalize: str | None = None,
                    bias: Tensor | None = None, length_normalize: bool | None = None, chunk_size: int | None = None,
                    validate: bool = True, capturable: bool = False) -> UnlearningLossOutput:
    """Fused unlearning loss over a mixed forget/retain batch (DESIGN.md, op contract 1).

    hidden (N, H) are the final hidden states of the N tokens (already shifted so that row t predicts
    labels[t]), weight (V, H) the LM head, labels (N,) int64 with -100 ignored, sample_index (N,) the
    sample each token belongs to, roles (B,) FORGET/RETAIN/IGNORE per sample. Never materialises the
    N x V logits. Returns (loss, per_sample, logp).

    m = S / n ("mean") or S ("sum") with S the sum of the labelled tokens' log-probabilities and n their number,
    each group in its own setting (forget_normalize / retain_normalize; length_normalize=True/False is the
    shorthand for "mean"/"sum" on both). forget_pooling / retain_pooling: "sample" averages the per-sample terms,
    "batch" pools the group's labelled tokens of the batch as one sample (its m = sum of S over sum of n).
    Terms: forget "ga" m, "npo" (2/beta) softplus(beta (m - ref_m)), "simnpo" (2/beta) softplus(beta (m + delta));
    retain "nll" -m, "kl" the mean (or sum) over labelled tokens of KL(ref || model); retain_npo_weight w adds
    -w (2/beta) softplus(beta (m - ref_m)) per retain sample (or pooled group), not scaled by retain_weight.
    ref_logp (B,) holds each sample's reference m in its group's normalize setting; pooled references are
    pooled like m. loss = forget_weight * mean of forget terms + retain_weight * mean of retain terms + mean of
    the retain-side NPO terms. A sample with no labelled token counts as IGNORE: per_sample 0 and left out of its
    group's mean (and pool). per_sample is each sample's own term (its own m, also under "batch" pooling), before
    the group weights. validate=False skips the data-dependent checks (label range, finiteness), which each cost a
    device sync.

    capturable=True makes the call free of host syncs, so a CUDA graph can hold it: the checks (unless
    validate=False) become device-side asserts, and the fused walk covers every row instead of reading the
    labelled-row list (and, for NPO-like objectives, the group sizes) on the host; see
    fused_logprob.group_objective for its cost. Pass the labelled rows only, padded to a fixed count with -100, to
    keep it cheap.
    """
    normalize = resolve_normalize(length_normalize, forget_normalize, retain_normalize)
    _check_unlearning_args(hidden, weight, labels, sample_index, roles, forget, retain, ref_logp, ref_hidden,
                           ref_weight, ref_bias, beta, bias, chunk_size, delta=delta,
                           retain_npo_weight=retain_npo_weight, pooling=(forget_pooling, retain_pooling),
                           normalize=normalize)
    checking = validate and not torch.compiler.is_compiling()
    vocab_size = weight.shape[0]
    if checking:
        _check_index_values(labels, sample_index, roles, vocab_size, on_device=capturable)
    use_kl = retain == "kl"
    retain_npo = retain_npo_weight > 0
    chunk = chunk_size or default_chunk_size(hidden.shape[0], vocab_size, hidden.device,
                                             element_size=hidden.element_size(), with_ref=use_kl)
    kl_hidden, kl_weight, kl_bias = (ref_hidden, ref_weight, ref_bias) if use_kl else (None, None, None)

    num_samples = roles.shape[0]
    device = hidden.device
    valid = labels != -100
    zeros = torch.zeros(num_samples, dtype=torch.float32, device=device)
    counts = zeros.index_add(0, sample_index, valid.float())
    # a sample with no labelled token counts as IGNORE: it is left out of its group's mean
    is_forget, is_retain = (roles == FORGET) & (counts > 0), (roles == RETAIN) & (counts > 0)
    forget_mean, retain_mean = normalize[0] == "mean", normalize[1] == "mean"
    forget_batch, retain_batch = forget_pooling == "batch", retain_pooling == "batch"

    # Groups of the fused objective (fused_logprob.group_objective): 0..B-1 one per sample, B the pooled forget
    # samples and B+1 the pooled retain samples ("batch" pooling remaps their tokens there).
    pool_f, pool_r = num_samples, num_samples + 1
    group_index = sample_index
    token_role = roles[sample_index]
    if forget_batch:
        group_index = torch.where(token_role == FORGET, pool_f, group_index)
    if retain_batch:
        group_index = torch.where(token_role == RETAIN, pool_r, group_index)
    ones = torch.ones_like(counts)
    own_denom = torch.where(roles == RETAIN, counts.clamp(min=1) if retain_mean else ones,
                            counts.clamp(min=1) if forget_mean else ones)
    pooled_counts = torch.stack([(counts * is_forget).sum(), (counts * is_retain).sum()])
    # (no host-made tensor here: its copy to the GPU would sync)
    one = pooled_counts.new_ones(())
    pooled_denom = torch.stack([pooled_counts[0].clamp(min=1) if forget_mean else one,
                                pooled_counts[1].clamp(min=1) if retain_mean else one])
    denom = torch.cat([own_denom, pooled_denom])
    none = zeros.new_zeros(1)
    forget_unit = torch.cat([(is_forget & (not forget_batch)).float(),
                             is_forget.any().float().view(1) if forget_batch else none, none])
    retain_unit = torch.cat([(is_retain & (not retain_batch)).float(), none,
                             is_retain.any().float().view(1) if retain_batch else none])
    forget_coef = forget_weight * forget_unit / forget_unit.sum().clamp(min=1)
    retain_share = retain_unit / retain_unit.sum().clamp(min=1)
    retain_coef = retain_weight * retain_share

    ref = zeros
    group_ref = torch.zeros_like(denom)
    if forget == "npo" or retain_npo:
        ref = ref_logp.float()
        ref_sum = ref * own_denom  # back to a sum of log-probabilities under "mean", to pool
        pooled_ref = torch.stack([torch.where(is_forget, ref_sum, 0.0).sum(),
                                  torch.where(is_retain, ref_sum, 0.0).sum()]) / pooled_denom
        group_ref = torch.cat([ref, pooled_ref])

    linear, sigmoid, shift = torch.zeros_like(denom), torch.zeros_like(denom), torch.zeros_like(denom)
    if forget == "ga":
        linear = linear + forget_coef
    else:
        sigmoid = sigmoid + forget_coef
        shift = torch.where(forget_unit > 0, -group_ref if forget == "npo" else torch.full_like(denom, delta), shift)
    if retain == "nll":
        linear = linear - retain_coef
    if retain_npo:
        sigmoid = sigmoid - retain_npo_weight * retain_share
        shift = torch.where(retain_unit > 0, -group_ref, shift)
    coef_kl = ((retain_coef / denom)[group_index] * valid).contiguous() if use_kl else None
    loss, _, token_logp, token_kl = group_objective(
        hidden, weight, labels, group_index, linear, sigmoid, shift, denom, beta=beta,
        nonlinear=forget != "ga" or retain_npo, bias=bias, coef_kl=coef_kl, ref_hidden=kl_hidden,
        ref_weight=kl_weight, ref_bias=kl_bias, chunk_size=chunk, capturable=capturable)

    # per_sample: each sample's own term (its own m), before the group weights
    logp = zeros.index_add(0, sample_index, token_logp)
    mean_logp = logp / own_denom
    if forget == "ga":
        forget_term = mean_logp
    elif forget == "npo":
        forget_term = (2.0 / beta) * F.softplus(beta * (mean_logp - ref))
    else:
        forget_term = (2.0 / beta) * F.softplus(beta * (mean_logp + delta))
    if retain == "nll":
        retain_term = -mean_logp
    elif use_kl:
        retain_term = zeros.index_add(0, sample_index, token_kl) / own_denom
    else:
        retain_term = zeros
    if retain_npo:
        retain_term = retain_term - retain_npo_weight * (2.0 / beta) * F.softplus(beta * (mean_logp - ref))
    per_sample = torch.where(is_forget, forget_term, torch.where(is_retain, retain_term, zeros))

    if checking and capturable:
        torch._assert_async(torch.isfinite(loss), "the unlearning loss is not finite (NaN or Inf in the inputs, or "
                                                  "beta / the weights / the logits out of scale)")
    elif checking and not bool(torch.isfinite(loss)):
        _report_non_finite([("hidden", hidden), ("weight", weight), ("bias", bias), ("ref_logp", ref_logp),
                            ("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)])
    return UnlearningLossOutput(loss, per_sample, logp)


def sequence_logprob(hidden: Tensor, weight: Tensor, labels: Tensor, sample_index: Tensor, num_samples: int, *,
                     bias: Tensor | None = None, length_normalize: bool | None = None, normalize: str | None = None,
                     chunk_size: int | None = None, validate: bool = True, capturable: bool = False) -> Tensor:
    """Per-sample log-likelihood (B,) through the fused path: the sum of labelled-token log-probabilities
    (normalize="sum", or length_normalize=False) or their mean (normalize="mean", the default; 0 for a sample with
    no labelled token). Differentiable (the recompute path); under torch.no_grad() it is the cheap way to get a
    reference model's ref_logp in the normalize setting of the group that will use it. capturable: as in
    unlearning_loss (no host sync; every row walked)."""
    normalize = resolve_normalize(length_normalize, normalize, None)[0]
    roles = torch.full((num_samples,), IGNORE, dtype=torch.int64, device=hidden.device)
    _check_unlearning_args(hidden, weight, labels, sample_index, roles, "ga", None, None, None, None, None, 0.1,
                           bias, chunk_size, normalize=(normalize, normalize))
    if validate and not torch.compiler.is_compiling():
        _check_index_values(labels, sample_index, roles, weight.shape[0], on_device=capturable)
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device,
                                             element_size=hidden.element_size())
    token_logp, _ = _TokenLogprob.apply(hidden, weight, bias, labels, None, None, None, chunk, capturable)
    zeros = torch.zeros(num_samples, dtype=torch.float32, device=hidden.device)
    logp = zeros.index_add(0, sample_index, token_logp)
    if normalize == "sum":
        return logp
    return logp / zeros.index_add(0, sample_index, (labels != -100).float()).clamp(min=1)


def rmu_loss(forget_act: Tensor, control: Tensor, retain_act: Tensor, retain_ref: Tensor, alpha: float = 1.0) -> Tensor:
    """mean((forget_act - control)^2) + alpha * mean((retain_act - retain_ref)^2), fused, with gradients.

    forget_act (Nf, H), control (H,) (the scaled random direction c*u), retain_act (Nr, H) and retain_ref
    (Nr, H) (the frozen model's activations). An empty group contributes 0. Returns an fp32 scalar.
    """
    check_tensor(forget_act, "forget_act", floating=True)
    require(forget_act.dim() == 2, f"forget_act must be 2-D (Nf, H), got shape {tuple(forget_act.shape)}")
    h, device, dtype = forget_act.shape[1], forget_act.device, forget_act.dtype
    check_tensor(control, "control", shape=(h,), dtype=dtype, device=device)
    check_tensor(retain_act, "retain_act", dtype=dtype, device=device)
    require(retain_act.dim() == 2 and retain_act.shape[1] == h,
             f"retain_act must have shape (Nr, H={h}), got {tuple(retain_act.shape)}")
    check_tensor(retain_ref, "retain_ref", shape=tuple(retain_act.shape), dtype=dtype, device=device)
    require(isinstance(alpha, (int, float)) and alpha >= 0, f"alpha must be a number >= 0, got {alpha!r}")
    return ops.rmu_loss(forget_act, control, retain_act, retain_ref, float(alpha))


# ----------------------------------------------------------------------------- trainer helpers
class UnlearningLoss(torch.nn.Module):
    """nn.Module form of unlearning_loss for trainers: fixed options, call with the batch tensors.

    forward returns the scalar loss; `last` holds the detached (per_sample, logp) of the latest call.
    """

    def __init__(self, forget: str = "ga", retain: str | None = "nll", *, beta: float = 0.1, delta: float = 0.0,
                 forget_weight: float = 1.0, retain_weight: float = 1.0, retain_npo_weight: float = 0.0,
                 forget_pooling: str = "sample", retain_pooling: str = "sample", forget_normalize: str | None = None,
                 retain_normalize: str | None = None, length_normalize: bool | None = None,
                 chunk_size: int | None = None, validate: bool = True, capturable: bool = False) -> None:
        super().__init__()
        require(forget in FORGET_OBJECTIVES, f"forget must be one of {FORGET_OBJECTIVES}, got {forget!r}")
        require(retain in RETAIN_OBJECTIVES, f"retain must be one of {RETAIN_OBJECTIVES}, got {retain!r}")
        forget_normalize, retain_normalize = resolve_normalize(length_normalize, forget_normalize, retain_normalize)
        self.options = dict(forget=forget, retain=retain, beta=beta, delta=delta, forget_weight=forget_weight,
                            retain_weight=retain_weight, retain_npo_weight=retain_npo_weight,
                            forget_pooling=forget_pooling, retain_pooling=retain_pooling,
                            forget_normalize=forget_normalize, retain_normalize=retain_normalize,
                            chunk_size=chunk_size, validate=validate, capturable=capturable)
        self.last: UnlearningLossOutput | None = None

    def forward(self, hidden, weight, labels, sample_index, roles, *, bias=None, ref_logp=None, ref_hidden=None,
                ref_weight=None, ref_bias=None):
        out = unlearning_loss(hidden, weight, labels, sample_index, roles, bias=bias, ref_logp=ref_logp,
                              ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, **self.options)
        self.last = UnlearningLossOutput(out.loss.detach(), out.per_sample.detach(), out.logp.detach())
        return out.loss

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def causal_lm_hidden(model: torch.nn.Module, input_ids: Tensor, labels: Tensor,
                     **model_inputs) -> tuple[Tensor, Tensor, Tensor]:
    """Final hidden states of a Hugging Face causal LM or VLM, shifted for next-token prediction.

    Runs the model's base (no LM head, so no N x V logits) and returns (hidden (N, H), labels (N,),
    sample_index (N,)) over the B x (T-1) predicted positions, ready for the fused ops.
    """
    out = model.base_model(input_ids=input_ids, **model_inputs)
    states = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    batch, length = input_ids.shape
    hidden = states[:, :-1].reshape(-1, states.shape[-1])
    shifted = labels[:, 1:].reshape(-1)
    sample_index = torch.arange(batch, device=input_ids.device).repeat_interleave(length - 1)
    return hidden, shifted, sample_index


@torch.no_grad()
def reference_logp(model: torch.nn.Module, input_ids: Tensor, labels: Tensor, *, length_normalize: bool | None = None,
                   normalize: str | None = None, chunk_size: int | None = None, capturable: bool = False,
                   **model_inputs) -> Tensor:
    """Per-sample log-likelihood (B,) of `labels` under a frozen reference model, through the fused path.

    This is the ref_logp that forget='npo' and retain_npo_weight expect: pass each group's normalize setting
    ("mean" default, or "sum"; length_normalize=True/False is the same). Under "batch" pooling the op pools these
    per-sample values itself."""
    hidden, shifted, sample_index = causal_lm_hidden(model, input_ids, labels, **model_inputs)
    head = model.get_output_embeddings()
    return sequence_logprob(hidden, head.weight, shifted, sample_index, input_ids.shape[0], bias=head.bias,
                            length_normalize=length_normalize, normalize=normalize, chunk_size=chunk_size,
                            capturable=capturable)
