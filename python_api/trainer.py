"""Using the fused unlearning loss inside other trainers (Hugging Face Trainer, Accelerate, plain loops).

    class UnlearnTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return ue.trainer_loss(model, inputs, forget="npo", retain="nll", beta=0.1)

Batches carry input_ids, attention_mask, labels (-100 outside responses), roles (B,) with ue.FORGET /
ue.RETAIN / ue.IGNORE, ref_logp (B,) for NPO (from ue.reference_logp of a frozen copy, e.g. in the collator),
and pixel_values for images. Set TrainingArguments(remove_unused_columns=False) so Trainer keeps `roles`.
"""
import torch

from unlearn_engine.unlearning_loss import causal_lm_hidden, unlearning_loss

MODEL_INPUTS = ("attention_mask", "pixel_values", "image_sizes")


def trainer_loss(model: torch.nn.Module, inputs: dict, *, forget: str = "ga", retain: str | None = "nll",
                 beta: float = 0.1, forget_weight: float = 1.0, retain_weight: float = 1.0,
                 ref_model: torch.nn.Module | None = None, length_normalize: bool = True) -> torch.Tensor:
    """The scalar unlearning loss of one batch, through the model's base (no N x V logits) and the fused op.
    retain="kl" needs ref_model (frozen); forget="npo" needs inputs["ref_logp"]."""
    for key in ("input_ids", "labels", "roles"):
        if key not in inputs:
            raise ValueError(f"the batch lacks {key!r} (with HF Trainer, set remove_unused_columns=False)")
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
    if forget == "npo":
        refs["ref_logp"] = inputs.get("ref_logp")
    return unlearning_loss(hidden, head.weight, labels, sample_index, inputs["roles"], bias=head.bias,
                              forget=forget, retain=retain, beta=beta, forget_weight=forget_weight,
                              retain_weight=retain_weight, length_normalize=length_normalize, **refs).loss
