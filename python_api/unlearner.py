"""The unlearning loop: batches, scope, checkpoints and resume, metrics, data parallelism.
What is trained and which loss is used come from the method registry (methods.py); the loop names none.

    unlearner = ue.Unlearner(model, tokenizer, method="npo", steps=100, lr=1e-5, out_dir="runs/npo")
    history = unlearner.fit(forget_records, retain_records, resume=True)

Batches are drawn from (seed, step) alone, so a resumed run sees exactly the batches an uninterrupted one
would. Checkpoints (every `checkpoint_every` steps, the newest `keep_checkpoints` kept) hold the fp32 master
copies of the trained parameters, the optimizer, loss-scaler and RNG state, NPO's reference values and the run's
fingerprint; a resume is refused unless the fingerprint matches (checkpoint.py, fingerprint.py).

The optimizer side (fp32 masters, fp16 loss scaling) is precision.py's MasterWeights, NPO's reference values
reference_values.py's ReferenceValues; both are base classes of Unlearner.
"""
import copy
import dataclasses
import json
import os
import warnings
from typing import List, Sequence

import torch

from unlearn_engine.api.adapter import lora_config, lora_state_dict, merge_lora_
from unlearn_engine.api.checkpoint import apply_checkpoint, find_checkpoint, list_checkpoints, save_checkpoint
from unlearn_engine.api.config import UnlearnConfig
from unlearn_engine.api.data import Record, cut_name, encode, image_tokens, model_positions, on_model
from unlearn_engine.api.divergence import DivergedError, check_finite_weights, diverged
from unlearn_engine.api.fingerprint import digest, settings_fingerprint
from unlearn_engine.api.images import is_qwen_vl, model_inputs
from unlearn_engine.api.methods import get_method, language_model
from unlearn_engine.api.offload import cpu_reference
from unlearn_engine.api.precision import MasterWeights
from unlearn_engine.api.reference_values import ReferenceValues
from unlearn_engine.api.sharded_checkpoint import find_sharded, load_sharded, save_sharded
from unlearn_engine.atomic import write_text
from unlearn_engine.checks import require
from unlearn_engine.roles import FORGET, IGNORE, RETAIN
from unlearn_engine.unlearning_loss import causal_lm_hidden, sequence_logprob, unlearning_loss

__all__ = ["Unlearner", "UnlearnConfig", "DivergedError"]  # DivergedError: what fit() raises (divergence.py)


class HeadLoss(torch.nn.Module):
    """The LM head as a module whose forward is the fused unlearning loss: FSDP2 can shard it as a unit
    (its forward unshards the head weight and its backward reduce-scatters the gradient)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden, labels, sample_index, roles, **options):
        return unlearning_loss(hidden, self.head.weight, labels, sample_index, roles, bias=self.head.bias,
                                  **options)


class Unlearner(MasterWeights, ReferenceValues):
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

    def fingerprint(self, forget: Sequence[Record], retain: Sequence[Record]) -> dict:
        """What decides the run's trajectory: every setting but RESUME_SAFE, the records' content, the model's
        architecture and dtype, and what is trained. A checkpoint is resumed only by a run with an equal one."""
        config = self.model.config.to_dict() if hasattr(self.model, "config") else {}
        config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "torch_dtype",
                                                                "dtype")}
        return {**settings_fingerprint(self.config, forget, retain), "model_config": digest(config),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "trained": digest([(n, list(p.shape)) for n, p in self.named_params]), **self.extra_fingerprint,
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
        batch = on_model(encode(records, self.tokenizer, max_length=self.config.max_length, positions=self.positions,
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

    model_inputs = staticmethod(model_inputs)  # methods read it from the run

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
                diverged(f"step {step + 1}: {err}", ckpt_dir)
            if not torch.isfinite(loss):
                diverged(f"the loss of step {step + 1} is {float(loss)}", ckpt_dir)
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
                check_finite_weights(self.masters, step + 1, ckpt_dir)  # a checkpoint never holds a NaN/inf weight
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
        check_finite_weights(self.masters, c.steps, ckpt_dir)  # nor does the model the caller saves
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
