"""Using the fused unlearning loss inside other trainers (Hugging Face Trainer, Accelerate, plain loops).

    class UnlearnTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return ue.trainer_loss(model, inputs, forget="npo", retain="nll", beta=0.1)

Batches carry input_ids, attention_mask, labels (-100 outside responses), roles (B,) with ue.FORGET /
ue.RETAIN / ue.IGNORE, ref_logp (B,) for NPO and the retain-side NPO term (from ue.reference_logp of a frozen
copy, e.g. in the collator, in each group's normalize setting; or pass ref_model and leave it out: trainer_loss
then computes it in the right setting), and pixel_values (+ image_grid_thw, mm_token_type_ids on Qwen-VL) for
images. Set
TrainingArguments(remove_unused_columns=False) so Trainer keeps `roles`.

preset="open-unlearning" or "safety-mirage" sets pooling, normalisation, weights and hyper-parameters so that the
loss equals that codebase's on the same batch (README: "Matching open-unlearning and Safety Mirage"); settings
given explicitly win over the preset's.
"""
import torch

from unlearn_engine.api.images import MODEL_INPUTS as IMAGE_MODEL_INPUTS
from unlearn_engine.api.methods import PRESETS, resolve_settings
from unlearn_engine.roles import FORGET
from unlearn_engine.unlearning_loss import causal_lm_hidden, resolve_normalize, sequence_logprob, unlearning_loss

MODEL_INPUTS = (*IMAGE_MODEL_INPUTS, "image_sizes")  # + LLaVA-NeXT's image sizes
# our method name of each (forget, retain) pair that a preset can reproduce
PAIR_METHODS = {("ga", None): "ga", ("ga", "nll"): "gd", ("npo", "nll"): "npo", ("simnpo", "nll"): "simnpo",
                ("ga", "kl"): "kl"}


def trainer_loss(model: torch.nn.Module, inputs: dict, *, forget: str = "ga", retain: str | None = "nll",
                 beta: float | None = None, delta: float | None = None, forget_weight: float | None = None,
                 retain_weight: float | None = None, retain_npo_weight: float | None = None,
                 forget_pooling: str | None = None, retain_pooling: str | None = None,
                 forget_normalize: str | None = None, retain_normalize: str | None = None,
                 length_normalize: bool | None = None, preset: str | None = None,
                 ref_model: torch.nn.Module | None = None) -> torch.Tensor:
    """The scalar unlearning loss of one batch, through the model's base (no N x V logits) and the fused op.
    retain="kl" needs ref_model (frozen); forget="npo" and retain_npo_weight > 0 need inputs["ref_logp"], or
    ref_model to compute it from (each sample in its group's normalize setting: summed under "sum").
    Unset (None) settings come from `preset`, else the defaults of ue.unlearning_loss; length_normalize is the
    shorthand for both normalize settings."""
    for key in ("input_ids", "labels", "roles"):
        if key not in inputs:
            raise ValueError(f"the batch lacks {key!r} (with HF Trainer, set remove_unused_columns=False)")
    if preset in PRESETS:
        method = PAIR_METHODS.get((forget, retain))
        if method not in PRESETS[preset]:
            supported = ", ".join(f"(forget={f!r}, retain={r!r})" for (f, r), m in PAIR_METHODS.items()
                                  if m in PRESETS[preset])
            raise ValueError(f"preset {preset!r} has no counterpart of forget={forget!r}, retain={retain!r}; it "
                             f"supports {supported} here (and method 'rmu' in the Unlearner)")
    else:
        method = PAIR_METHODS.get((forget, retain), "gd")
    if length_normalize is not None:
        forget_normalize, retain_normalize = resolve_normalize(length_normalize, forget_normalize, retain_normalize)
    settings = resolve_settings(method, preset, dict(
        beta=beta, delta=delta, forget_weight=forget_weight, retain_weight=retain_weight,
        retain_npo_weight=retain_npo_weight, forget_pooling=forget_pooling, retain_pooling=retain_pooling,
        forget_normalize=forget_normalize, retain_normalize=retain_normalize))
    # settings of the Unlearner, not the loss
    for name in ("rmu_coeff", "rmu_alpha", "rmu_nll_weight", "rmu_tokens", "nll_bound"):
        settings.pop(name)
    extra = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
    hidden, labels, sample_index = causal_lm_hidden(model, inputs["input_ids"], inputs["labels"], **extra)
    head = model.get_output_embeddings()
    refs = {}
    if retain == "kl":
        if ref_model is None:
            raise ValueError("retain='kl' needs ref_model (a frozen copy of the model)")
        with torch.no_grad():
            refs["ref_hidden"], _, _ = causal_lm_hidden(ref_model, inputs["input_ids"], inputs["labels"], **extra)
        refs["ref_weight"] = ref_model.get_output_embeddings().weight
    if forget == "npo" or settings["retain_npo_weight"] > 0:
        refs["ref_logp"] = inputs.get("ref_logp")
        if refs["ref_logp"] is None and ref_model is not None:
            refs["ref_logp"] = _reference_logp(ref_model, inputs, extra, settings)
    return unlearning_loss(hidden, head.weight, labels, sample_index, inputs["roles"], bias=head.bias,
                           forget=forget, retain=retain, **settings, **refs).loss


@torch.no_grad()
def _reference_logp(ref_model, inputs, extra, settings):
    """ref_logp (B,) under the frozen ref_model, each sample in its group's normalize setting (a preset's NPO may
    sum the forget samples' log-likelihoods and average the retain ones')."""
    hidden, labels, sample_index = causal_lm_hidden(ref_model, inputs["input_ids"], inputs["labels"], **extra)
    head = ref_model.get_output_embeddings()
    num_samples = inputs["input_ids"].shape[0]
    sums = sequence_logprob(hidden, head.weight, labels, sample_index, num_samples, bias=head.bias, normalize="sum")
    counts = torch.zeros_like(sums).index_add(0, sample_index, (labels != -100).float()).clamp(min=1)
    summed = torch.where(inputs["roles"] == FORGET, settings["forget_normalize"] == "sum",
                         settings["retain_normalize"] == "sum")
    return torch.where(summed, sums, sums / counts)
