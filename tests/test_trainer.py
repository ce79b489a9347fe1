"""The fused loss inside Hugging Face Trainer (compute_loss) and a plain loop."""
import copy
import math

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api.data import encode

from test_unlearner import FORGET, RETAIN


def test_hf_trainer_compute_loss(tiny_llava_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    ref = copy.deepcopy(model).requires_grad_(False)
    records = FORGET + RETAIN

    def collate(items):
        batch = encode(items, tok)
        batch["roles"] = torch.tensor([ue.FORGET if r.role == "forget" else ue.RETAIN for r in items])
        batch["ref_logp"] = ue.reference_logp(ref, batch["input_ids"], batch["labels"],
                                              attention_mask=batch["attention_mask"])
        return batch

    class UnlearnTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return ue.trainer_loss(model, inputs, forget="npo", retain="nll", beta=0.5)

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                          learning_rate=3e-3, remove_unused_columns=False, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    before = ue.mean_nll(model, tok, FORGET)
    UnlearnTrainer(model=model, args=args, train_dataset=records, data_collator=collate).train()
    assert ue.mean_nll(model, tok, FORGET) > before


def test_trainer_loss_errors(tiny_llava_dir, toy_tokenizer):
    model, tok = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    batch = encode(FORGET[:2], tok)
    with pytest.raises(ValueError, match="lacks 'roles'.*remove_unused_columns=False"):
        ue.trainer_loss(model, batch)
    batch["roles"] = torch.tensor([ue.FORGET, ue.FORGET])
    with pytest.raises(ValueError, match="retain='kl' needs ref_model"):
        ue.trainer_loss(model, batch, retain="kl")
    with pytest.raises(ValueError, match="forget='npo' needs ref_logp"):
        ue.trainer_loss(model, batch, forget="npo")
    loss = ue.trainer_loss(model, batch, forget="ga", retain="kl", ref_model=copy.deepcopy(model))
    loss.backward()
    assert model.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("length_normalize", [True, False])
def test_trainer_loss_npo_at_reference_is_2ln2_over_beta(length_normalize):
    """Catches trainer_loss ignoring beta, forget_weight or length_normalize: with the model as its own
    reference every NPO forget term is (2/beta) ln 2, so the loss is known exactly for each beta."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(5))
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[2, :6] = -100  # different labelled-token counts, so length_normalize matters
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                 roles=torch.tensor([ue.FORGET, ue.RETAIN, ue.FORGET]))
    batch["ref_logp"] = ue.reference_logp(model, input_ids, labels, length_normalize=length_normalize,
                                          attention_mask=batch["attention_mask"])
    for beta in (0.25, 2.0):
        loss = ue.trainer_loss(model, batch, forget="npo", retain=None, beta=beta, forget_weight=0.7,
                               length_normalize=length_normalize)
        assert loss.item() == pytest.approx(0.7 * (2.0 / beta) * math.log(2.0), rel=1e-5), beta


@pytest.mark.parametrize("preset,forget,retain_npo", [("open-unlearning", "npo", None), ("safety-mirage", "npo", None),
                                                      (None, "ga", 0.5)])
def test_trainer_loss_makes_ref_logp_from_ref_model_in_each_groups_setting(preset, forget, retain_npo):
    """Catches ref_logp made in one setting for every group (open-unlearning's NPO sums the forget samples'
    log-likelihoods and averages the retain ones'): without inputs["ref_logp"], ref_model gives the same loss as
    ref_logp computed by hand per group, and a mean-only ref_logp gives another."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model, ref = transformers.LlamaForCausalLM(config).eval(), transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(7))
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[1, :5] = -100  # unequal answer lengths: sum and mean differ by more than a constant
    roles = torch.tensor([ue.FORGET, ue.FORGET, ue.RETAIN, ue.RETAIN])
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, roles=roles)
    options = dict(forget=forget, retain="nll", preset=preset, retain_npo_weight=retain_npo)
    auto = ue.trainer_loss(model, batch, ref_model=ref, **options)
    sums = ue.reference_logp(ref, input_ids, labels, normalize="sum")
    means = ue.reference_logp(ref, input_ids, labels, normalize="mean")
    forget_sum = preset == "open-unlearning"
    by_hand = torch.where(roles == ue.FORGET, sums if forget_sum else means, means)
    assert auto.item() == pytest.approx(ue.trainer_loss(model, dict(batch, ref_logp=by_hand), **options).item(),
                                        rel=1e-6)
    if forget_sum:
        assert auto.item() != pytest.approx(ue.trainer_loss(model, dict(batch, ref_logp=means), **options).item(),
                                            rel=1e-3)
