"""NPO's reference log-likelihoods for the Unlearner: computed once before the first step (from the frozen
reference, or from the model before it is trained), cached per sample, stored with the checkpoints; then the
reference model is dropped unless the method needs its activations."""
from typing import Sequence

import torch

from unlearn_engine.api.data import Record, encode, on_model
from unlearn_engine.roles import FORGET, RETAIN
from unlearn_engine.unlearning_loss import reference_logp


class ReferenceValues:
    """The reference-value methods of Unlearner (a base class of it): they read its model, ref_model, config,
    method and tokenizer, and fill _ref_logp_cache, keyed by sample id ("f"/"r", index)."""

    def _needs_ref_logp(self) -> bool:
        return self.method.needs_ref_logp or self.config.retain_npo_weight > 0

    def _ref_normalize(self, kind: str) -> str:
        """The normalize setting of the group whose reference values a cache key of this kind holds."""
        return self.config.forget_normalize if kind == "f" else self.config.retain_normalize

    @torch.no_grad()
    def _precompute_ref_logp(self, forget: Sequence[Record], retain: Sequence[Record] = ()) -> None:
        """Reference log-likelihood (in its group's normalize setting) of every forget sample, and of every retain
        sample when the retain-side NPO term is on, not yet cached, from the frozen reference or the model before its
        first step; then the reference model is dropped unless the method needs its activations."""
        reference = self.ref_model if self.ref_model is not None else self.model
        was_training = reference.training
        reference.eval()
        groups = [("f", forget)] + ([("r", retain)] if self.config.retain_npo_weight > 0 else [])
        try:
            for kind, records_of in groups:
                missing = [i for i in range(len(records_of)) if (kind, i) not in self._ref_logp_cache]
                for start in range(0, len(missing), self.config.batch_size):
                    idx = missing[start:start + self.config.batch_size]
                    records = [records_of[i] for i in idx]
                    # a reference held on the CPU computes on the model's device: its inputs go there
                    on = self.model if self.config.reference_device == "cpu" else reference
                    batch = on_model(encode(records, self.tokenizer, max_length=self.config.max_length,
                                             positions=self.positions, **self._image_args(records)), on)
                    values = reference_logp(reference, batch["input_ids"], batch["labels"],
                                            normalize=self._ref_normalize(kind), **self.model_inputs(batch))
                    for i, v in zip(idx, values.tolist()):
                        self._ref_logp_cache[(kind, i)] = v
        finally:
            reference.train(was_training)
        if not self.method.uses_reference(self.config):
            self.ref_model = None

    def _ref_logp(self, batch):
        """(B,) reference values of the batch's samples, each in its group's normalize setting: forget samples, and
        retain samples when the retain-side NPO term is on; entries no term reads are 0."""
        roles = self.host_roles(batch)
        wanted = {FORGET} | ({RETAIN} if self.config.retain_npo_weight > 0 else set())
        missing = [i for i, key in enumerate(batch["ids"]) if key not in self._ref_logp_cache and roles[i] in wanted]
        if missing:
            if self.ref_model is None:
                raise ValueError(f"no reference log-likelihood for sample(s) {[batch['ids'][i] for i in missing]}: "
                                 "the reference model was freed after the precompute")
            values = {normalize: reference_logp(self.ref_model, batch["input_ids"], batch["labels"],
                                                normalize=normalize, **self.model_inputs(batch)).tolist()
                      for normalize in {self._ref_normalize(batch["ids"][i][0]) for i in missing}}
            for i in missing:
                key = batch["ids"][i]
                self._ref_logp_cache[key] = values[self._ref_normalize(key[0])][i]
        return torch.tensor([self._ref_logp_cache.get(k, 0.0) for k in batch["ids"]], device=self.device)

