"""The unlearning loop: batches, optimizer and scope, checkpoints and resume, metrics, data parallelism.
What is trained and which loss is used come from the method registry (methods.py); the loop names none.

    unlearner = ue.Unlearner(model, tokenizer, method="npo", steps=100, lr=1e-5, out_dir="runs/npo")
    history = unlearner.fit(forget_records, retain_records, resume=True)

Batches are drawn from (seed, step) alone, so a resumed run sees exactly the batches an uninterrupted one
would. Checkpoints (every `checkpoint_every` steps, the newest `keep_checkpoints` kept) hold the fp32 master
copies of the trained parameters, the optimizer, loss-scaler and RNG state, NPO's reference values and the run's
fingerprint; a resume is refused unless the fingerprint matches (checkpoint.py).

Precision: the model computes in its dtype; what is trained has fp32 masters and fp32 optimizer state, and the
model's bf16/fp16 weights are rounded from the masters after every step (fp16 adds dynamic loss scaling). By default
(gradient_step='in_backward', backward_step.py) each parameter is stepped as soon as autograd has accumulated its
gradient, which is then freed; under scope 'mask' the masters and moments are packed (selected elements only).
"""
import copy
import dataclasses
import hashlib
import json
import os
import warnings
from typing import List, Sequence

import torch

from unlearn_engine.api.adapter import lora_config, lora_state_dict
from unlearn_engine.api.backward_step import InBackwardStep, ParamAdamW, selected_positions
from unlearn_engine.api.checkpoint import (
    apply_checkpoint,
    check_same_run,
    find_checkpoint,
    list_checkpoints,
    read_state,
    save_checkpoint,
)
from unlearn_engine.api.config import RESUME_SAFE, UnlearnConfig
from unlearn_engine.api.data import Record, cut_name, encode, image_tokens, model_positions
from unlearn_engine.api.images import MODEL_INPUTS, is_qwen_vl
from unlearn_engine.api.loading import CheckpointError
from unlearn_engine.api.methods import get_method, language_model
from unlearn_engine.api.offload import cpu_reference
from unlearn_engine.api.sharded_checkpoint import find_sharded, load_sharded, save_sharded
from unlearn_engine.atomic import write_text
from unlearn_engine.checks import require
from unlearn_engine.roles import FORGET, IGNORE, RETAIN
from unlearn_engine.unlearning_loss import causal_lm_hidden, reference_logp, sequence_logprob, unlearning_loss
from unlearn_engine.weight_masking import MaskedOptimizer, saliency, saliency_mask, topk_mask

SALIENCY_BATCHES = 4  # forget batches whose gradients choose the mask
__all__ = ["Unlearner", "UnlearnConfig", "DivergedError", "mean_nll", "merge_lora_"]


class DivergedError(ValueError):
    """The run diverged (a non-finite loss or trained weight): it stopped, the model is not saved, and the
    checkpoints written before stay (none holds a non-finite weight)."""


class HeadLoss(torch.nn.Module):
    """The LM head as a module whose forward is the fused unlearning loss: FSDP2 can shard it as a unit
    (its forward unshards the head weight and its backward reduce-scatters the gradient)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden, labels, sample_index, roles, **options):
        return unlearning_loss(hidden, self.head.weight, labels, sample_index, roles, bias=self.head.bias,
                                  **options)


def _on_model(encoded: dict, model: torch.nn.Module) -> dict:
    """An encoded batch moved to the model's device, its pixel values in the model's dtype."""
    param = next(model.parameters())
    batch = {k: v.to(param.device) for k, v in encoded.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(param.dtype)
    return batch


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_fingerprint(config: UnlearnConfig, forget: Sequence[Record], retain: Sequence[Record]) -> dict:
    """The part of a run's fingerprint known without the model: settings (but RESUME_SAFE) and the records."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUME_SAFE}
    return {**settings, "forget_data": _digest([dataclasses.astuple(r) for r in forget]),
            "retain_data": _digest([dataclasses.astuple(r) for r in retain])}


def check_resume_settings(ckpt_dir: str, config: UnlearnConfig, forget, retain, extra: dict | None = None) -> None:
    """Before any model is loaded: refuses (ValueError naming the fields) a resume whose settings, records or
    `extra` fields differ from those of the newest checkpoint whose state can be read."""
    current = {**settings_fingerprint(config, forget, retain), **(extra or {})}
    for _, path in list_checkpoints(ckpt_dir):
        try:
            saved = read_state(path).get("fingerprint")
        except CheckpointError:
            continue  # unreadable: fit() warns and falls back past it
        check_same_run(path, saved, current, known_only=True)
        return


class LossScaler:
    """Dynamic loss scaling for fp16 compute: the loss is multiplied by `scale` before backward; a step whose
    gradients are not all finite is skipped and the scale halved; after `growth_interval` good steps in a row
    it doubles (torch.amp.GradScaler's policy, kept here so its state lives in our checkpoints)."""

    def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale, self.growth_interval, self.good_steps = scale, growth_interval, 0

    def update(self, grads) -> bool:
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if not finite:
            self.scale, self.good_steps = self.scale / 2, 0
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * 2, 0
        return True

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


class Unlearner:
    """Runs one unlearning method on a model; `config` (or keyword overrides of UnlearnConfig's fields) sets it.
    Methods call back into batch(), indices() and fused_loss()."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: UnlearnConfig | None = None, *,
                 ref_model: torch.nn.Module | None = None, out_dir: str | None = None, progress: bool = True,
                 fingerprint: dict | None = None, image_loader=None, **overrides) -> None:
        config = dataclasses.replace(config or UnlearnConfig(), **overrides).validate()  # unset settings resolved
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor (as load_vlm returns) carries one
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.method = get_method(config.method)
        self.out_dir, self.progress = out_dir, progress
        self.extra_fingerprint = dict(fingerprint or {})  # e.g. the CLI's model path
        self.image_loader = image_loader  # records with an image: image_loader(record.image) -> (3, H, W)
        self.data_report: dict = {}
        self.device = next(model.parameters()).device
        self.positions = model_positions(model)  # no sample is cut longer than the model's positions
        # Only methods that need the frozen model's activations (KL-retain, RMU) keep a second model; NPO's
        # reference log-likelihoods are computed once before the first step (from `ref_model` when given, else
        # from the model itself, not yet trained), stored with the checkpoints, and the reference is dropped.
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        # (FSDP2 shards the model before fit(): NPO then computes its reference values from an unsharded copy,
        # dropped after the precompute)
        sharded = self.world > 1 and config.parallel == "fsdp"
        needs_ref_logp = self.method.needs_ref_logp or config.retain_npo_weight > 0
        needs_ref = self.method.uses_reference(config) or (sharded and needs_ref_logp)
        self.ref_model = ref_model if ref_model is not None or not needs_ref else model
        if self.ref_model is not None and config.reference_device == "cpu":
            self.ref_model = cpu_reference(self.ref_model, self.device)  # host memory, run layer by layer
        elif self.ref_model is model:
            self.ref_model = copy.deepcopy(model)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        self.named_params = self._select_params()
        self.head_loss = HeadLoss(model.get_output_embeddings())
        self.fsdp = sharded
        if self.fsdp:
            self._shard()
        if config.gradient_checkpointing == "on":  # decoder (and vision) layers recompute their forward in backward
            require(getattr(model, "supports_gradient_checkpointing", False),
                    f"gradient_checkpointing: {type(model).__name__} does not support it")
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 (the old name deprecated)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.stepper = None  # InBackwardStep when the optimizer steps inside backward
        self._ref_logp_cache = {}
        self._forget_nll = {}
        self.history: List[dict] = []
        self.divergence: dict | None = None  # the first step whose retain NLL grew past divergence_factor
        self.adapter_state: dict | None = None  # scope lora: the trained adapters (PEFT names), before the merge

    # ------------------------------------------------------------------ setup
    def _select_params(self):
        model = self.model
        model.requires_grad_(False)
        if self.config.scope == "lora":
            from peft import inject_adapter_in_model

            # the adapters' random init comes from the run's seed (not the global RNG): same seed, same run
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.config.seed)
                inject_adapter_in_model(lora_config(self.config.lora_rank), model)
            return [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        for m in self.method.trainable_modules(model, self.config):
            m.requires_grad_(True)
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def _shard(self):
        """FSDP2: each decoder layer, the model's base and the head-with-loss become sharded units."""
        from torch.distributed.fsdp import fully_shard

        c, model = self.config, self.model
        if c.scope != "full":  # README, "Scale-out": why mask and LoRA stay with parallel='ddp'
            raise ValueError(f"parallel='fsdp' supports scope='full', got scope={c.scope!r} (use parallel='ddp')")
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head.weight is embed.weight:
            raise ValueError("parallel='fsdp' needs untied input/output embeddings")
        for layer in language_model(model).layers:
            fully_shard(layer)
        fully_shard(model.base_model)
        fully_shard(self.head_loss)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def full_state_dict(self):
        """The model's state with every sharded tensor gathered (a collective: call it on every rank)."""
        from torch.distributed.tensor import DTensor

        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in self.model.state_dict().items()}

    def _make_masters(self):
        """fp32 master copies of the trained bf16/fp16 parameters (fp32 ones are their own master): the optimizer
        updates these, and the model's low-precision weights are rounded from them after each step, so updates
        smaller than half a bf16 ulp accumulate instead of being lost. fp16 compute gets a dynamic loss scaler."""
        self.masters = [p.detach().float().clone() if p.dtype in (torch.float16, torch.bfloat16) else p
                        for _, p in self.named_params]
        self.mixed = any(m is not p for m, (_, p) in zip(self.masters, self.named_params))
        fp16 = any(p.dtype == torch.float16 for p in self.model.parameters())
        self.scaler = LossScaler() if fp16 else None

    def named_masters(self):
        """(name, fp32 master) of every trained parameter: what the optimizer updates and a checkpoint holds."""
        return [(n, m) for (n, _), m in zip(self.named_params, self.masters)]

    def _steps_in_backward(self) -> bool:
        """gradient_step 'in_backward' applies but under FSDP and for fp16 full / LoRA scopes (a loss-scaled step
        is known to be finite only after backward)."""
        fp16 = any(p.dtype == torch.float16 for p in self.model.parameters())
        c = self.config
        return c.gradient_step == "in_backward" and not self.fsdp and (c.scope == "mask" or not fp16)

    def _saliency_batches(self, forget):
        """The forget batches of steps 0-3, whatever `steps` is: a resume may change `steps`, never the mask."""
        return [self.batch(forget, [], step) for step in range(SALIENCY_BATCHES)]

    def _make_in_backward(self, forget):
        """The optimizer and hooks of gradient_step='in_backward' (backward_step.py): under scope 'mask' the mask
        from the streamed saliency and packed fp32 masters of the selected elements."""
        c = self.config
        params = [p for _, p in self.named_params]
        fp16 = any(p.dtype == torch.float16 for p in self.model.parameters())
        self.scaler = LossScaler() if fp16 else None
        positions = None
        if c.scope == "mask":
            def average(scores):  # one mask for all ranks (each score moved to the device for the collective)
                for t in scores:
                    on_device = t.to(self.device)
                    self._average_gradients([on_device])
                    t.copy_(on_device)

            self.mask = saliency_mask(self.model, self._saliency_batches(forget),
                                      lambda m, b: -self._forget_logp(b).mean(), c.mask_fraction, params=params,
                                      reduce=average if self.world > 1 else None, progress=self.progress)
            positions = [selected_positions(self.mask, i, p.device) for i, p in enumerate(params)]
            self.masters = [p.detach().reshape(-1).index_select(0, idx).float() for p, idx in zip(params, positions)]
        else:
            self.masters = [p.detach().float().clone() if p.dtype in (torch.float16, torch.bfloat16) else p
                            for p in params]
        self.mixed = any(m is not p for m, p in zip(self.masters, params))
        optimizer = ParamAdamW(self.masters, lr=c.lr, weight_decay=c.weight_decay, state=c.optimizer_state)
        if self.stepper is not None:
            self.stepper.remove()
        self.stepper = InBackwardStep(params, self.masters, optimizer, positions=positions, scaler=self.scaler,
                                      average=self._average_gradients if self.world > 1 else None)
        return optimizer

    def _make_optimizer(self, forget):
        c = self.config
        if self._steps_in_backward():
            return self._make_in_backward(forget)
        require(c.optimizer_state == "fp32", f"optimizer_state={c.optimizer_state!r} needs the step in backward, "
                                             "which FSDP and fp16 full / LoRA scopes do not take: use 'fp32'")
        self._make_masters()
        if c.scope != "mask":
            return torch.optim.AdamW(self.masters, lr=c.lr, weight_decay=c.weight_decay)
        params = [p for _, p in self.named_params]
        scores = saliency(self.model, self._saliency_batches(forget), lambda m, b: -self._forget_logp(b).mean(),
                          params=params, progress=self.progress)
        self._average_gradients(scores)  # one mask for all ranks
        self.mask = topk_mask(scores, c.mask_fraction)
        return MaskedOptimizer(self.masters, self.mask, lr=c.lr, weight_decay=c.weight_decay, compact_state=True)

    @torch.no_grad()
    def _optimizer_step(self, optimizer) -> bool:
        """Unscales the gradients (fp16), moves them onto the fp32 masters, steps the optimizer on the masters and
        rounds them back into the model. Under mixed precision the optimizer steps one parameter at a time (its
        state is per parameter, so the result is the same), so that one fp32 gradient exists at a time, not a
        full fp32 copy of all of them. Returns False when an fp16 step was skipped (non-finite gradients)."""
        params = [p for _, p in self.named_params]
        grads = [p.grad for p in params]
        if self.scaler and not self.scaler.update([g for g in grads if g is not None]):
            for p in params:
                p.grad = None
            optimizer.zero_grad(set_to_none=True)
            return False
        inv_scale = 1.0 / self.scaler.scale if self.scaler else 1.0
        if not self.mixed:  # fp32 training: the parameters are their own masters
            if inv_scale != 1.0:
                for g in grads:
                    if g is not None:
                        g.mul_(inv_scale)
            optimizer.step()
            return True
        for p in params:
            p.grad = None
        for i, (p, m) in enumerate(zip(params, self.masters)):
            if grads[i] is None:
                continue
            m.grad = grads[i].float() if m is not p else grads[i]
            grads[i] = None  # the low-precision gradient is freed as soon as it is converted
            if inv_scale != 1.0:
                m.grad.mul_(inv_scale)
            optimizer.step()  # only m has a gradient: only m (and its state) is updated
            m.grad = None
            if m is not p:
                p.copy_(m)
        return True

    def fingerprint(self, forget: Sequence[Record], retain: Sequence[Record]) -> dict:
        """What decides the run's trajectory: every setting but RESUME_SAFE, the records' content, the model's
        architecture and dtype, and what is trained. A checkpoint is resumed only by a run with an equal one."""
        config = self.model.config.to_dict() if hasattr(self.model, "config") else {}
        config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "torch_dtype",
                                                                "dtype")}
        return {**settings_fingerprint(self.config, forget, retain), "model_config": _digest(config),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "trained": _digest([(n, list(p.shape)) for n, p in self.named_params]), **self.extra_fingerprint,
                # sharded checkpoints: another format, and each rank's batch slice depends on the world size
                **({"checkpoint_format": "dcp", "world_size": self.world} if self.fsdp else {})}

    # ------------------------------------------------------------------ batches
    def indices(self, n: int, step: int, salt: int) -> List[int]:
        """The global batch of (seed, step); under torch.distributed each rank takes its own slice."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step * 17 + salt)
        chosen = torch.randperm(n, generator=g)[: min(self.config.batch_size, n)].tolist()
        return chosen[self.rank::self.world] if self.world > 1 else chosen

    def _average_gradients(self, tensors):
        """Data parallelism: every rank ends with the mean over ranks (the gradient of the global batch)."""
        import torch.distributed as dist

        if self.world > 1:
            for t in tensors:
                if t is not None:
                    dist.all_reduce(t)
                    t.div_(self.world)

    def batch(self, forget: Sequence[Record], retain: Sequence[Record], step: int) -> dict:
        """The encoded batch of (seed, step): forget samples first, then retain; roles and sample ids added."""
        f_idx = self.indices(len(forget), step, 1) if forget else []
        r_idx = self.indices(len(retain), step, 2) if retain else []
        records = [forget[i] for i in f_idx] + [retain[i] for i in r_idx]
        batch = _on_model(encode(records, self.tokenizer, max_length=self.config.max_length, positions=self.positions,
                                 **self._image_args(records)), self.model)
        batch["role_list"] = [FORGET] * len(f_idx) + [RETAIN] * len(r_idx)  # on the host: no device sync to read
        batch["roles"] = torch.tensor(batch["role_list"], device=self.device)
        batch["ids"] = [("f", i) for i in f_idx] + [("r", i) for i in r_idx]
        return batch

    @staticmethod
    def host_roles(batch) -> List[int]:
        """The batch's roles as a host list (from the batch's records, never read back from the device)."""
        if "role_list" in batch:
            return list(batch["role_list"])
        return [FORGET if key[0] == "f" else RETAIN for key in batch["ids"]]

    def _image_args(self, records, loader=None):
        if not any(r.image for r in records):
            return {}
        require((loader or self.image_loader) is not None,
                "records with an image need image_loader (CLI: --image-root)")
        return {"image_loader": loader or self.image_loader, "image_tokens": image_tokens(self.model)}

    @staticmethod
    def model_inputs(batch):
        """The model's keyword inputs of an encoded batch: attention mask, and the image inputs when it has images
        (LLaVA pixel values; Qwen-VL flattened patches, image_grid_thw and mm_token_type_ids)."""
        return {k: batch[k] for k in MODEL_INPUTS if k in batch}

    def _hidden(self, model, batch):
        return causal_lm_hidden(model, batch["input_ids"], batch["labels"], **self.model_inputs(batch))

    def usable_records(self, records: Sequence[Record], kind: str) -> List[Record]:
        """The records that keep at least one labelled token after the max_length cut; how many lost labelled
        tokens, have no response or were skipped goes to self.data_report and, when any, to a warning."""
        stats = {}
        if records:
            # LLaVA's image token count is fixed, so no pixels are needed; a Qwen-VL image's depends on its size
            placeholder = None if is_qwen_vl(self.model) else (lambda path: torch.zeros(3, 1, 1))
            encode(records, self.tokenizer, max_length=self.config.max_length, positions=self.positions, stats=stats,
                   **self._image_args(records, loader=placeholder))
        skipped = [i for i, n in enumerate(stats.get("labelled", [])) if n == 0]
        report = {"records": len(records), "truncated": sum(1 for n in stats.get("cut", []) if n > 0),
                  "no_response": sum(stats.get("no_response", [])), "skipped": skipped}
        self.data_report[kind] = report
        if report["truncated"] or report["no_response"] or skipped:
            warnings.warn(f"{kind}: {report['truncated']} of {len(records)} record(s) lost labelled tokens to the "
                          + (f"{self.config.max_length}-token cut (max_length)" if self.config.max_length else
                             f"cut of {cut_name(None)}") + f", {report['no_response']} have no response "
                          f"(only the end token is labelled), {len(skipped)} left with no labelled token are skipped"
                          + (f" (record indices {skipped[:20]})" if skipped else ""), stacklevel=3)
        keep = set(range(len(records))) - set(skipped)
        return [r for i, r in enumerate(records) if i in keep]

    def _forget_logp(self, batch):
        hidden, labels, sample_index = self._hidden(self.model, batch)
        head = self.model.get_output_embeddings()
        return sequence_logprob(hidden, head.weight, labels, sample_index, batch["input_ids"].shape[0],
                                bias=head.bias)

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
                    batch = _on_model(encode(records, self.tokenizer, max_length=self.config.max_length,
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

    # ------------------------------------------------------------------ losses
    def fused_loss(self, batch: dict, *, forget: str, retain: str | None, forget_weight: float = 1.0,
                   retain_weight: float = 1.0, guard: bool = True, **settings):
        """The fused unlearning loss of `batch` and its per-group NLL stats; the divergence guard drops forget
        samples whose NLL passed nll_bound from gradient ascent. `settings`: the fused loss's pooling, normalize,
        delta and retain_npo_weight (methods.fused_settings of the config)."""
        hidden, labels, sample_index = self._hidden(self.model, batch)
        roles = self.host_roles(batch)  # decided on the host: the guard below makes no device sync
        if guard and forget == "ga":
            roles = [IGNORE if role == FORGET and self._forget_nll.get(key, 0.0) > self.config.nll_bound else role
                     for key, role in zip(batch["ids"], roles)]
        roles = torch.tensor(roles, device=self.device)
        extra = dict(settings)
        if forget == "npo" or settings.get("retain_npo_weight", 0.0) > 0:
            extra["ref_logp"] = self._ref_logp(batch)
        if retain == "kl":
            with torch.no_grad():
                ref_hidden, _, _ = self._hidden(self.ref_model, batch)
            # (read outside the reference's forward: a CPU-held head is copied to the device for this step only)
            ref_weight = self.ref_model.get_output_embeddings().weight.to(self.device)
            extra.update(ref_hidden=ref_hidden, ref_weight=ref_weight)
        out = self.head_loss(hidden, labels, sample_index, roles, forget=forget, retain=retain, beta=self.config.beta,
                             forget_weight=forget_weight, retain_weight=retain_weight, **extra)
        counts = torch.zeros(len(roles), device=self.device).index_add_(0, sample_index, (labels != -100).float())
        nll = (-out.logp / counts.clamp(min=1)).tolist()
        stats = {}
        for kind, name in (("f", "forget_nll"), ("r", "retain_nll")):
            values = [v for key, v in zip(batch["ids"], nll) if key[0] == kind]
            if values:
                stats[name] = sum(values) / len(values)
        for key, value in zip(batch["ids"], nll):
            if key[0] == "f":
                self._forget_nll[key] = value
        return out.loss, stats

    # ------------------------------------------------------------------ loop
    def fit(self, forget: Sequence[Record], retain: Sequence[Record] = (), *, resume: bool = False) -> List[dict]:
        from tqdm.auto import tqdm

        c = self.config
        if not forget:
            raise ValueError("forget must hold at least one record")
        if self.method.needs_retain and not retain:
            raise ValueError(f"method {c.method!r} needs retain records")
        fingerprint = self.fingerprint(forget, retain)  # of the records as given
        forget, retain = self.usable_records(forget, "forget"), self.usable_records(retain, "retain")
        require(bool(forget), f"no forget record keeps a labelled token within {cut_name(c.max_length)}")
        require(not self.method.needs_retain or bool(retain),
                f"no retain record keeps a labelled token within {cut_name(c.max_length)}")
        self.model.train()
        optimizer = self.optimizer = self._make_optimizer(forget)
        start = 0
        writer = self.out_dir is not None and self.rank == 0  # one rank writes files
        ckpt_dir = os.path.join(self.out_dir, "checkpoints") if self.out_dir else None
        metrics_path = os.path.join(self.out_dir, "metrics.jsonl") if writer else None
        require(resume or not list_checkpoints(ckpt_dir), f"{ckpt_dir} already holds checkpoints of a run: pass "
                                                          "resume=True to continue it, or use another out_dir")
        find = (lambda: find_sharded(ckpt_dir, fingerprint)) if self.fsdp else \
            (lambda: find_checkpoint(ckpt_dir, self.named_masters(), optimizer, fingerprint))
        ckpt = find() if resume and ckpt_dir else None
        if ckpt is not None:  # the stored reference values: none is recomputed from the restored weights
            self._ref_logp_cache = {tuple(json.loads(k)): v for k, v in ckpt["state"].get("ref_logp", {}).items()}
        if self._needs_ref_logp():  # before the first step (and before a checkpoint's weights are applied)
            self._precompute_ref_logp(forget, retain)
        if ckpt is not None:
            state = load_sharded(ckpt, self.named_masters(), optimizer) if self.fsdp else \
                apply_checkpoint(ckpt, self.named_masters(), optimizer, self.device)
            with torch.no_grad():
                if self.stepper is not None:
                    self.stepper.write_model()  # packed masters go to their selected positions only
                else:
                    for (_, p), m in zip(self.named_params, self.masters):
                        if m is not p:
                            p.copy_(m)
            if self.scaler and state.get("loss_scaler"):
                self.scaler.load_state_dict(state["loss_scaler"])
            start = state["step"]
            forget_nll = state["rank"]["forget_nll"] if self.fsdp else state["forget_nll"]  # each rank's own
            self._forget_nll = {tuple(json.loads(k)): v for k, v in forget_nll.items()}
            self.history = [h for h in state["history"] if h["step"] <= start]
            for h in self.history:  # a divergence before the interruption is reported again
                self._watch_retain(h)
        if writer:
            write_text(os.path.join(self.out_dir, "data.json"), json.dumps(self.data_report, indent=2))
        if metrics_path:
            # rewritten from the restored history: no duplicate lines
            write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in self.history))
        bar = tqdm(range(start, c.steps), desc=f"unlearn[{c.method}]", disable=not self.progress, initial=start,
                   total=c.steps)
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            try:
                loss, stats = self.method.loss(self, forget, retain, step)
            except FloatingPointError as err:  # the fused loss refuses NaN/inf activations: the weights blew up
                self._diverged(f"step {step + 1}: {err}", ckpt_dir)
            if not torch.isfinite(loss):
                self._diverged(f"the loss of step {step + 1} is {float(loss)}", ckpt_dir)
            if self.stepper is not None:  # the optimizer steps inside backward, as each gradient is accumulated
                self.stepper.arm()
                (loss * self.scaler.scale if self.scaler else loss).backward()
                stepped = self.stepper.finish()
            else:
                (loss * self.scaler.scale if self.scaler else loss).backward()
                if not self.fsdp:  # FSDP2 already reduce-scattered (averaged) the gradients
                    self._average_gradients([p.grad for _, p in self.named_params])
                stepped = self._optimizer_step(optimizer)
            record = {"step": step + 1, "loss": float(loss.detach()),
                      **{k: v for k, v in stats.items() if v is not None}}  # batch NLLs, before this step
            if self.scaler:
                record["loss_scale"] = self.scaler.scale
                if not stepped:
                    record["skipped"] = True  # non-finite fp16 gradients: no update, the scale was halved
            self.history.append(record)
            self._watch_retain(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if metrics_path:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if ckpt_dir and c.checkpoint_every and (step + 1) % c.checkpoint_every == 0 and (writer or self.fsdp):
                self._check_weights(step + 1, ckpt_dir)  # a checkpoint never holds a NaN/inf weight
                extra = {"config": dataclasses.asdict(c), "fingerprint": fingerprint, "history": self.history,
                         "loss_scaler": self.scaler.state_dict() if self.scaler else None,
                         "ref_logp": {json.dumps(k): v for k, v in self._ref_logp_cache.items()}}
                forget_nll = {"forget_nll": {json.dumps(k): v for k, v in self._forget_nll.items()}}
                if self.fsdp:  # every rank writes its shards
                    save_sharded(ckpt_dir, step + 1, self.named_masters(), optimizer, extra, forget_nll,
                                 keep=c.keep_checkpoints)
                else:
                    save_checkpoint(ckpt_dir, step + 1, self.named_masters(), optimizer, {**extra, **forget_nll},
                                    keep=c.keep_checkpoints)
        self._check_weights(c.steps, ckpt_dir)  # nor does the model the caller saves
        if c.scope == "lora":
            self.adapter_state = lora_state_dict(self.model)  # what adapter.save_lora_adapter writes
            merge_lora_(self.model)
        self.model.eval()
        return self.history

    def _watch_retain(self, record: dict) -> None:
        """Warns once when the retain NLL grows past divergence_factor x its first value (at least 1) or is not
        finite: the run goes on (the user decides), self.divergence records it for the summary."""
        factor, value = self.config.divergence_factor, record.get("retain_nll")
        if not factor or value is None or self.divergence is not None:
            return
        first = next(h["retain_nll"] for h in self.history if "retain_nll" in h)
        limit = factor * max(first, 1.0)
        if value == value and value <= limit:  # finite and below the limit (NaN fails both comparisons)
            return
        self.divergence = {"step": record["step"], "retain_nll": value, "first_retain_nll": first,
                           "factor": factor}
        warnings.warn(f"the run is diverging: retain NLL {value:.6g} at step {record['step']}, over {factor:g} x "
                      f"its step-1 value {first:.6g} (counted from at least 1); lower --lr (divergence_factor sets "
                      "the factor)", stacklevel=3)

    def _check_weights(self, step: int, ckpt_dir: str | None) -> None:
        """DivergedError when a trained weight is NaN/inf (one fp32 sum per tensor: the scan of _check_finite)."""
        local = [m.to_local() if hasattr(m, "to_local") else m for m in self.masters]  # FSDP2: this rank's shard
        if all(bool(torch.isfinite(m.detach().sum(dtype=torch.float32))) or bool(torch.isfinite(m).all())
               for m in local):
            return
        self._diverged(f"the trained weights hold NaN/inf after step {step}", ckpt_dir)

    def _diverged(self, what: str, ckpt_dir: str | None) -> None:
        newest = list_checkpoints(ckpt_dir)
        kept = (f"the newest good checkpoint, {newest[0][1]}, is kept" if newest else "no checkpoint was written")
        raise DivergedError(f"diverged: {what}; stopped, the model is not saved and {kept}: lower --lr and start "
                            "again")


@torch.no_grad()
def merge_lora_(model):
    """Fold injected LoRA adapters into their base weights and put the plain layers back, so the model
    saves and loads like the original architecture."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return model


@torch.no_grad()
def mean_nll(model: torch.nn.Module, tokenizer, records: Sequence[Record], *, batch_size: int = 16,
             max_length: int | None = None, image_loader=None) -> float:
    """Mean per-sample response NLL (length-normalised) of `records` under `model`, through the fused path
    (records with no labelled token left after the max_length cut are not counted; max_length None: as the
    Unlearner's default, data.TEXT_LENGTH text tokens plus the image's, within the model's positions)."""
    values, positions = [], model_positions(model)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = {"image_loader": image_loader, "image_tokens": image_tokens(model)} if any(r.image for r in chunk) \
            else {}
        stats = {}
        encode(chunk, tokenizer, max_length=max_length, stats=stats, positions=positions, **images)
        # a record cut before its response is left out, and never reaches the model: its cut may fall inside
        # the image tokens, which the model would refuse (tokens and image features no longer match)
        chunk = [r for r, n in zip(chunk, stats["labelled"]) if n > 0]
        if not chunk:
            continue
        batch = _on_model(encode(chunk, tokenizer, max_length=max_length, positions=positions, **images), model)
        logp = reference_logp(model, batch["input_ids"], batch["labels"], **Unlearner.model_inputs(batch))
        values.append(-logp[(batch["labels"][:, 1:] != -100).any(1)])
    require(bool(values), f"none of the {len(records)} record(s) keeps a response token after the "
                          f"{cut_name(max_length)} cut: raise max_length")
    return float(torch.cat(values).mean())
