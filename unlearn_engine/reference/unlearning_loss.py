"""Eager references for the fused unlearning losses: full logits, log_softmax, fp32 math."""
import torch
import torch.nn.functional as F

from unlearn_engine.checks import require
from unlearn_engine.roles import FORGET, RETAIN


def _token_log_probs(hidden, weight, bias, labels, upcast_inputs=True):
    if upcast_inputs:  # the exact answer: GEMM in fp32
        hidden, weight, bias = hidden.float(), weight.float(), bias.float() if bias is not None else None
    logits = hidden @ weight.T  # else the usual eager recipe: logits in the model dtype, softmax in fp32
    if bias is not None:
        logits = logits + bias
    logits = logits.float()
    log_probs = F.log_softmax(logits, dim=-1)
    valid = labels != -100
    picked = log_probs.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked)), log_probs, valid


def unlearning_loss_reference(hidden, weight, labels, sample_index, roles, *, forget="ga", retain="nll",
                              ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.1, delta=0.0,
                              forget_weight=1.0, retain_weight=1.0, retain_npo_weight=0.0, forget_pooling="sample",
                              retain_pooling="sample", forget_normalize=None, retain_normalize=None, bias=None,
                              length_normalize=None, upcast_inputs=True):
    """Same contract as unlearn_engine.unlearning_loss, computed the obvious way (N x V logits): per-sample terms
    averaged over a group's samples ("sample" pooling), or one term of the group's pooled tokens ("batch").

    upcast_inputs=False makes the logits in the inputs' dtype, as eager training code does."""
    token_logp, log_probs, valid = _token_log_probs(hidden, weight, bias, labels, upcast_inputs)
    token_kl = None
    if retain == "kl":
        _, ref_log_probs, _ = _token_log_probs(ref_hidden, ref_weight, ref_bias, labels, upcast_inputs)
        ref_probs = ref_log_probs.exp()
        # a token the reference bans (logit -inf, probability 0) carries no KL mass: 0, not 0 * (-inf - z) = NaN
        token_kl = torch.where(ref_probs > 0, ref_probs * (ref_log_probs - log_probs), 0.0).sum(-1)
        token_kl = torch.where(valid, token_kl, torch.zeros_like(token_kl))
    return objective_from_token_terms(
        token_logp, valid, sample_index, roles, token_kl=token_kl, forget=forget, retain=retain, ref_logp=ref_logp,
        beta=beta, delta=delta, forget_weight=forget_weight, retain_weight=retain_weight,
        retain_npo_weight=retain_npo_weight, forget_pooling=forget_pooling, retain_pooling=retain_pooling,
        forget_normalize=forget_normalize, retain_normalize=retain_normalize, length_normalize=length_normalize)


def objective_from_token_terms(token_logp, valid, sample_index, roles, *, token_kl=None, forget="ga", retain="nll",
                               ref_logp=None, beta=0.1, delta=0.0, forget_weight=1.0, retain_weight=1.0,
                               retain_npo_weight=0.0, forget_pooling="sample", retain_pooling="sample",
                               forget_normalize=None, retain_normalize=None, length_normalize=None):
    """unlearning_loss_reference's objective from per-token log-likelihoods (0 where not `valid`) and, for
    retain="kl", per-token KLs: what any library that returns per-token cross entropy can be finished with."""
    shared = "sum" if length_normalize is False else "mean"
    forget_normalize, retain_normalize = forget_normalize or shared, retain_normalize or shared
    num_samples = roles.shape[0]
    zeros = torch.zeros(num_samples, dtype=torch.float32, device=token_logp.device)
    logp = zeros.index_add(0, sample_index, token_logp)
    counts = zeros.index_add(0, sample_index, valid.float())
    require(token_kl is not None or retain != "kl", "token_kl must be given (per-token KLs) for retain='kl', got None")
    if token_kl is None:
        token_kl = torch.zeros_like(token_logp)
    kl = zeros.index_add(0, sample_index, token_kl)
    ref = ref_logp.float() if ref_logp is not None else zeros

    def normalized(total, n, normalize):  # m of a sample or of a pool: a sum, or a mean over its n tokens
        return total / n.clamp(min=1) if normalize == "mean" else total

    def npo(m, ref_m):
        return (2.0 / beta) * F.softplus(beta * (m - ref_m))

    def forget_term(total, n, ref_m):
        m = normalized(total, n, forget_normalize)
        if forget == "ga":
            return m
        if forget == "npo":
            return npo(m, ref_m)
        return (2.0 / beta) * F.softplus(beta * (m + delta))

    def retain_base(total, n, kl_total):  # the retain objective, without the retain-side NPO term
        m = normalized(total, n, retain_normalize)
        return {"nll": -m, "kl": normalized(kl_total, n, retain_normalize), None: torch.zeros_like(m)}[retain]

    def retain_npo(total, n, ref_m):
        return -retain_npo_weight * npo(normalized(total, n, retain_normalize), ref_m)

    is_forget, is_retain = (roles == FORGET) & (counts > 0), (roles == RETAIN) & (counts > 0)  # empty: IGNORE
    per_sample = torch.where(is_forget, forget_term(logp, counts, ref),
                             torch.where(is_retain, retain_base(logp, counts, kl) + retain_npo(logp, counts, ref),
                                         zeros))

    def group_loss(mask, pooling, normalize, term):
        if not bool(mask.any()):
            return zeros.sum()
        if pooling == "sample":
            return term(logp[mask], counts[mask], kl[mask], ref[mask]).mean()
        n = counts[mask].sum()
        ref_total = (ref * counts)[mask].sum() if normalize == "mean" else ref[mask].sum()
        return term(logp[mask].sum(), n, kl[mask].sum(), normalized(ref_total, n, normalize))

    # the retain-side NPO terms are weighted by retain_npo_weight alone, not by retain_weight
    loss = (forget_weight * group_loss(is_forget, forget_pooling, forget_normalize,
                                       lambda t, n, k, r: forget_term(t, n, r))
            + retain_weight * group_loss(is_retain, retain_pooling, retain_normalize,
                                         lambda t, n, k, r: retain_base(t, n, k))
            + group_loss(is_retain, retain_pooling, retain_normalize, lambda t, n, k, r: retain_npo(t, n, r)))
    return loss, per_sample, logp


def rmu_loss_reference(forget_act, control, retain_act, retain_ref, alpha):
    """mean((forget_act - control)^2) + alpha * mean((retain_act - retain_ref)^2); empty groups give 0."""
    def mse(a, b):
        return ((a.float() - b.float()) ** 2).sum() / max(a.numel(), 1)
    return mse(forget_act, control.expand_as(forget_act)) + alpha * mse(retain_act, retain_ref)
