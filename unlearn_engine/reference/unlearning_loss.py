"""Eager references for the fused unlearning losses: full logits, log_softmax, fp32 math."""
import torch
import torch.nn.functional as F

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
                              ref_logp=None, ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.1,
                              forget_weight=1.0, retain_weight=1.0, bias=None, length_normalize=True,
                              upcast_inputs=True):
    """Same contract as unlearn_engine.unlearning_loss, computed the obvious way (N x V logits).

    upcast_inputs=False makes the logits in the inputs' dtype, as eager training code does."""
    num_samples = roles.shape[0]
    token_logp, log_probs, valid = _token_log_probs(hidden, weight, bias, labels, upcast_inputs)
    zeros = torch.zeros(num_samples, dtype=torch.float32, device=hidden.device)
    logp = zeros.index_add(0, sample_index, token_logp)
    counts = zeros.index_add(0, sample_index, valid.float())
    denom = counts.clamp(min=1) if length_normalize else torch.ones_like(counts)
    mean_logp = logp / denom

    if forget == "ga":
        forget_term = mean_logp
    else:
        forget_term = (2.0 / beta) * F.softplus(beta * (mean_logp - ref_logp.float()))

    if retain == "nll":
        retain_term = -mean_logp
    elif retain == "kl":
        _, ref_log_probs, _ = _token_log_probs(ref_hidden, ref_weight, ref_bias, labels, upcast_inputs)
        ref_probs = ref_log_probs.exp()
        # a token the reference bans (logit -inf, probability 0) carries no KL mass: 0, not 0 * (-inf - z) = NaN
        token_kl = torch.where(ref_probs > 0, ref_probs * (ref_log_probs - log_probs), 0.0).sum(-1)
        token_kl = torch.where(valid, token_kl, torch.zeros_like(token_kl))
        retain_term = zeros.index_add(0, sample_index, token_kl) / denom
    else:
        retain_term = torch.zeros_like(mean_logp)

    is_forget, is_retain = (roles == FORGET) & (counts > 0), (roles == RETAIN) & (counts > 0)  # empty: IGNORE
    per_sample = torch.where(is_forget, forget_term, torch.where(is_retain, retain_term, zeros))
    per_sample = torch.where(counts > 0, per_sample, zeros)
    loss = (forget_weight * (per_sample * is_forget).sum() / is_forget.sum().clamp(min=1)
            + retain_weight * (per_sample * is_retain).sum() / is_retain.sum().clamp(min=1))
    return loss, per_sample, logp


def rmu_loss_reference(forget_act, control, retain_act, retain_ref, alpha):
    """mean((forget_act - control)^2) + alpha * mean((retain_act - retain_ref)^2); empty groups give 0."""
    def mse(a, b):
        return ((a.float() - b.float()) ** 2).sum() / max(a.numel(), 1)
    return mse(forget_act, control.expand_as(forget_act)) + alpha * mse(retain_act, retain_ref)
