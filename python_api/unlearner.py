"""The unlearning loop: GA, GD, NPO, KL-retain, RMU and the textual recipe, all through the fused ops.

    unlearner = ue.Unlearner(model, tokenizer, method="npo", steps=100, lr=1e-5, out_dir="runs/npo")
    history = unlearner.fit(forget_records, retain_records, resume=True)

Batches are drawn from (seed, step) alone, so a resumed run sees exactly the batches an uninterrupted one
would. Checkpoints (every `checkpoint_every` steps) hold the trainable parameters, optimizer and RNG state.
"""
import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

import unlearn_engine as ue
from unlearn_engine.api.checkpoint import load_latest, save_checkpoint
from unlearn_engine.api.data import Record, encode

METHODS = ("ga", "gd", "npo", "kl", "rmu", "textual")
SCOPES = ("full", "lora", "mask")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass
class UnlearnConfig:
    method: str = "npo"
    steps: int = 20
    lr: float = 1e-4
    batch_size: int = 4
    beta: float = 0.1              # NPO temperature
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    scope: str = "full"            # "full": the weights the method trains; "lora": LoRA adapters on the
    #                                language model (merged back at the end); "mask": saliency top fraction
    mask_fraction: float = 0.05
    lora_rank: int = 8
    rmu_layer: int = 1             # RMU: steer this decoder layer's output; train down_proj of layers <= it
    rmu_coeff: float = 20.0        # RMU: |control| = rmu_coeff
    rmu_alpha: float = 10.0        # RMU: retain weight
    nll_bound: float = 15.0        # divergence guard: stop ascending a forget sample once its NLL passes this
    weight_decay: float = 0.0
    parallel: str = "ddp"          # under torch.distributed: "ddp" (gradients averaged) or "fsdp" (FSDP2 shards)
    seed: int = 0
    checkpoint_every: int = 0
    max_length: int = 256

    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.beta <= 0:
            raise ValueError(f"lr and beta must be > 0, got lr={self.lr}, beta={self.beta}")
        if not 0 < self.mask_fraction <= 1:
            raise ValueError(f"mask_fraction must be in (0, 1], got {self.mask_fraction}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")


class HeadLoss(torch.nn.Module):
    """The LM head as a module whose forward is the fused unlearning loss: FSDP2 can shard it as a unit
    (its forward unshards the head weight and its backward reduce-scatters the gradient)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden, labels, sample_index, roles, **options):
        return ue.unlearning_loss(hidden, self.head.weight, labels, sample_index, roles, bias=self.head.bias,
                                  **options)


def language_model(model):
    """The decoder stack of a causal LM or a LLaVA-style VLM."""
    inner = model.base_model
    return getattr(inner, "language_model", inner)


class Unlearner:
    def __init__(self, model, tokenizer, config: Optional[UnlearnConfig] = None, *, ref_model=None,
                 out_dir: Optional[str] = None, progress: bool = True, **overrides):
        config = dataclasses.replace(config or UnlearnConfig(), **overrides)
        config.validate()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.out_dir, self.progress = out_dir, progress
        self.device = next(model.parameters()).device
        needs_ref = config.method in ("npo", "kl", "rmu", "textual")
        self.ref_model = ref_model if ref_model is not None or not needs_ref else copy.deepcopy(model)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.named_params = self._select_params()
        self.head_loss = HeadLoss(model.get_output_embeddings())
        self.fsdp = self.world > 1 and config.parallel == "fsdp"
        if self.fsdp:
            self._shard()
        self._ref_logp_cache = {}
        self._forget_nll = {}
        self.history: List[dict] = []

    # ------------------------------------------------------------------ setup
    def _select_params(self):
        model, method = self.model, self.config.method
        model.requires_grad_(False)
        if self.config.scope == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            if method == "rmu":
                raise ValueError("RMU trains chosen down_proj weights directly; use scope='full' or 'mask'")
            inject_adapter_in_model(LoraConfig(r=self.config.lora_rank, lora_alpha=2 * self.config.lora_rank,
                                               target_modules=LORA_TARGETS, lora_dropout=0.0), model)
            return [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        lm = language_model(model)
        if method == "rmu":
            layers = lm.layers
            chosen = range(max(0, self.config.rmu_layer - 2), self.config.rmu_layer + 1)
            modules = [layers[i].mlp.down_proj for i in chosen]
            projector = getattr(model.base_model, "multi_modal_projector", None)
            if projector is not None:
                modules.append(projector)
        elif method == "textual":  # text only, LLM part only
            modules = [lm, model.get_output_embeddings()]
        else:
            modules = [m for m in (lm, getattr(model.base_model, "multi_modal_projector", None),
                                   model.get_output_embeddings()) if m is not None]
        for m in modules:
            m.requires_grad_(True)
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def _shard(self):
        """FSDP2: each decoder layer, the model's base and the head-with-loss become sharded units."""
        from torch.distributed.fsdp import fully_shard

        c, model = self.config, self.model
        if c.scope != "full" or c.checkpoint_every:
            raise ValueError("parallel='fsdp' supports scope='full' without checkpoints (checkpoint_every=0)")
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

    def _make_optimizer(self, forget):
        params = [p for _, p in self.named_params]
        c = self.config
        if c.scope == "full":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        batches = [self._batch(forget, [], step) for step in range(min(4, c.steps))]
        saliency = ue.saliency(self.model, batches, lambda m, b: -self._forget_logp(b).mean(), params=params,
                               progress=self.progress)
        self._average_gradients(saliency)  # one mask for all ranks
        self.mask = ue.topk_mask(saliency, c.mask_fraction)
        return ue.MaskedOptimizer(params, self.mask, lr=c.lr, weight_decay=c.weight_decay, compact_state=True)

    # ------------------------------------------------------------------ batches
    def _indices(self, n, step, salt):
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

    def _batch(self, forget: Sequence[Record], retain: Sequence[Record], step: int):
        f_idx = self._indices(len(forget), step, 1) if forget else []
        r_idx = self._indices(len(retain), step, 2) if retain else []
        records = [forget[i] for i in f_idx] + [retain[i] for i in r_idx]
        batch = {k: v.to(self.device) for k, v in encode(records, self.tokenizer, max_length=self.config.max_length).items()}
        batch["roles"] = torch.tensor([ue.FORGET] * len(f_idx) + [ue.RETAIN] * len(r_idx), device=self.device)
        batch["ids"] = [("f", i) for i in f_idx] + [("r", i) for i in r_idx]
        return batch

    def _hidden(self, model, batch):
        return ue.causal_lm_hidden(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])

    def _forget_logp(self, batch):
        hidden, labels, sample_index = self._hidden(self.model, batch)
        head = self.model.get_output_embeddings()
        return ue.sequence_logprob(hidden, head.weight, labels, sample_index, batch["input_ids"].shape[0],
                                   bias=head.bias)

    def _ref_logp(self, batch):
        missing = [i for i, key in enumerate(batch["ids"]) if key not in self._ref_logp_cache]
        if missing:
            values = ue.reference_logp(self.ref_model, batch["input_ids"], batch["labels"],
                                       attention_mask=batch["attention_mask"])
            for i in missing:
                self._ref_logp_cache[batch["ids"][i]] = float(values[i])
        return torch.tensor([self._ref_logp_cache[k] for k in batch["ids"]], device=self.device)

    # ------------------------------------------------------------------ losses
    def _fused(self, batch, *, forget, retain, forget_weight, retain_weight, guard=True):
        hidden, labels, sample_index = self._hidden(self.model, batch)
        roles = batch["roles"].clone()
        if guard and forget == "ga":
            for i, key in enumerate(batch["ids"]):
                if roles[i] == ue.FORGET and self._forget_nll.get(key, 0.0) > self.config.nll_bound:
                    roles[i] = ue.IGNORE
        extra = {}
        if forget == "npo":
            extra["ref_logp"] = self._ref_logp(batch)
        if retain == "kl":
            with torch.no_grad():
                ref_hidden, _, _ = self._hidden(self.ref_model, batch)
            extra.update(ref_hidden=ref_hidden, ref_weight=self.ref_model.get_output_embeddings().weight)
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

    def _rmu(self, batch):
        c, lm = self.config, language_model(self.model)
        if not hasattr(self, "_control"):
            g = torch.Generator().manual_seed(c.seed)
            u = torch.rand(lm.config.hidden_size, generator=g)
            self._control = (c.rmu_coeff * u / u.norm()).to(self.device, next(self.model.parameters()).dtype)

        def layer_out(model):
            out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   output_hidden_states=True)
            return out.hidden_states[c.rmu_layer + 1]

        acts = layer_out(self.model)
        with torch.no_grad():
            ref_acts = layer_out(self.ref_model)
        mask = batch["attention_mask"].bool()
        is_forget = batch["roles"] == ue.FORGET
        f_mask, r_mask = mask & is_forget[:, None], mask & ~is_forget[:, None]
        loss = ue.rmu_loss(acts[f_mask], self._control, acts[r_mask], ref_acts[r_mask], alpha=c.rmu_alpha)
        return loss, {}

    def _loss(self, forget, retain, step):
        c = self.config
        if c.method == "rmu":
            return self._rmu(self._batch(forget, retain, step))
        if c.method == "textual":
            # 0.5 * GA on harmful answers + 1 * NLL on random mismatched answers + 1 * KL on normal data
            f_idx = self._indices(len(forget), step, 1)
            g = torch.Generator().manual_seed(c.seed * 7 + step)
            mismatch = [Record(forget[i].prompt, retain[int(torch.randint(len(retain), (1,), generator=g))].response,
                               "retain") for i in f_idx]
            batch = self._batch([forget[i] for i in f_idx], mismatch, 0)
            batch["ids"] = [("f", i) for i in f_idx] + [("m", n) for n in range(len(mismatch))]
            loss_a, stats = self._fused(batch, forget="ga", retain="nll", forget_weight=0.5, retain_weight=1.0)
            loss_b, _ = self._fused(self._batch([], retain, step), forget="ga", retain="kl", forget_weight=0.0,
                                    retain_weight=1.0)
            return loss_a + loss_b, {"forget_nll": stats.get("forget_nll")}
        retain_objective = {"ga": None, "gd": "nll", "npo": "nll", "kl": "kl"}[c.method]
        forget_objective = "npo" if c.method == "npo" else "ga"
        batch = self._batch(forget, retain if retain_objective else [], step)
        return self._fused(batch, forget=forget_objective, retain=retain_objective, forget_weight=c.forget_weight,
                           retain_weight=c.retain_weight)

    # ------------------------------------------------------------------ loop
    def fit(self, forget: Sequence[Record], retain: Sequence[Record] = (), *, resume: bool = False) -> List[dict]:
        from tqdm.auto import tqdm

        c = self.config
        if not forget:
            raise ValueError("forget must hold at least one record")
        if c.method in ("gd", "npo", "kl", "rmu", "textual") and not retain:
            raise ValueError(f"method {c.method!r} needs retain records")
        self.model.train()
        optimizer = self._make_optimizer(forget)
        start = 0
        writer = self.out_dir is not None and self.rank == 0  # one rank writes files
        ckpt_dir = os.path.join(self.out_dir, "checkpoints") if self.out_dir else None
        metrics_path = os.path.join(self.out_dir, "metrics.jsonl") if writer else None
        if resume and ckpt_dir:
            state = load_latest(ckpt_dir, self.named_params, optimizer, self.device)
            if state is not None:
                start = state["step"]
                self._ref_logp_cache = {tuple(json.loads(k)): v for k, v in state["ref_logp"].items()}
                self._forget_nll = {tuple(json.loads(k)): v for k, v in state["forget_nll"].items()}
                self.history = [h for h in state["history"] if h["step"] <= start]
        if metrics_path:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(metrics_path, "w") as f:  # rewritten from the restored history: no duplicate lines
                f.writelines(json.dumps(h) + "\n" for h in self.history)
        bar = tqdm(range(start, c.steps), desc=f"unlearn[{c.method}]", disable=not self.progress, initial=start,
                   total=c.steps)
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            loss, stats = self._loss(forget, retain, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step + 1}: lower lr or check the data")
            loss.backward()
            if not self.fsdp:  # FSDP2 already reduce-scattered (averaged) the gradients
                self._average_gradients([p.grad for _, p in self.named_params])
            optimizer.step()
            record = {"step": step + 1, "loss": float(loss.detach()),
                      **{k: v for k, v in stats.items() if v is not None}}  # batch NLLs, before this step
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if metrics_path:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if writer and c.checkpoint_every and (step + 1) % c.checkpoint_every == 0:
                save_checkpoint(ckpt_dir, step + 1, self.named_params, optimizer, {
                    "config": dataclasses.asdict(c), "history": self.history,
                    "ref_logp": {json.dumps(k): v for k, v in self._ref_logp_cache.items()},
                    "forget_nll": {json.dumps(k): v for k, v in self._forget_nll.items()}})
        if c.scope == "lora":
            merge_lora_(self.model)
        self.model.eval()
        return self.history


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
def mean_nll(model, tokenizer, records: Sequence[Record], *, batch_size: int = 16, max_length: int = 256) -> float:
    """Mean per-sample response NLL (length-normalised) of `records` under `model`, through the fused path."""
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(records), batch_size):
        batch = {k: v.to(device) for k, v in encode(records[start:start + batch_size], tokenizer,
                                                   max_length=max_length).items()}
        values.append(-ue.reference_logp(model, batch["input_ids"], batch["labels"],
                                         attention_mask=batch["attention_mask"]))
    return float(torch.cat(values).mean())
