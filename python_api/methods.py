"""The unlearning methods, as a registry: each is a small class saying what it trains, what it needs (a frozen
reference model, retain data) and its loss for one step. The loop in unlearner.py names none of them.

Adding a method: subclass UnlearningMethod, give it a `name`, implement `loss`, and register an instance:

    @register_method
    class MyMethod(UnlearningMethod):
        name = "mine"
        needs_retain = True
        def loss(self, run, forget, retain, step):
            return run.fused_loss(run.batch(forget, retain, step), forget="ga", retain="nll")

It is then reachable as Unlearner(method="mine") and `unlearn-engine unlearn --method mine`.
"""
from typing import Dict, List, Sequence, Tuple

import torch

from unlearn_engine.api.data import Record
from unlearn_engine.roles import FORGET
from unlearn_engine.unlearning_loss import rmu_loss


def language_model(model):
    """The decoder stack of a causal LM or a LLaVA / Qwen2-VL / Qwen2.5-VL model."""
    inner = model.base_model
    return getattr(inner, "language_model", inner)


def multimodal_projector(model):
    """The module that maps vision features to the language model's embedding space: LLaVA's
    multi_modal_projector, Qwen-VL's visual.merger; None for a text-only model."""
    inner = model.base_model
    projector = getattr(inner, "multi_modal_projector", None)
    if projector is None and getattr(inner, "visual", None) is not None:
        projector = getattr(inner.visual, "merger", None)
    return projector


class UnlearningMethod:
    """One unlearning method. `run` (the Unlearner) gives access to the batches, the fused loss and the config."""

    name: str = ""
    description: str = ""
    needs_reference = False   # a frozen copy of the starting model is kept (KL-retain, RMU)
    needs_ref_logp = False    # only the starting model's log-likelihoods: computed once, no copy kept (NPO)
    needs_retain = False      # fit() refuses an empty retain set
    supports_lora = True

    def trainable_modules(self, model, config) -> List[torch.nn.Module]:
        """The modules whose weights this method updates under scope 'full' (and 'mask')."""
        return [m for m in (language_model(model), multimodal_projector(model), model.get_output_embeddings())
                if m is not None]

    def check(self, config) -> None:
        """Method-specific configuration checks (raise ValueError naming the setting)."""

    def loss(self, run, forget: Sequence[Record], retain: Sequence[Record], step: int) -> Tuple[torch.Tensor, dict]:
        """(scalar loss, stats such as forget_nll / retain_nll) of training step `step`."""
        raise NotImplementedError


METHODS: Dict[str, UnlearningMethod] = {}


def register_method(method):
    """Register an UnlearningMethod instance (or a class, instantiated with no arguments); returns it."""
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, UnlearningMethod) or not instance.name:
        raise ValueError(f"{method!r} is not an UnlearningMethod with a name")
    METHODS[instance.name] = instance
    return method


def get_method(name: str) -> UnlearningMethod:
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


class FusedObjective(UnlearningMethod):
    """A forget objective and an optional retain objective of the fused loss, on mixed forget/retain batches."""

    def __init__(self, name: str, forget: str, retain: str | None, description: str):
        self.name, self.forget, self.retain, self.description = name, forget, retain, description
        self.needs_reference = retain == "kl"
        self.needs_ref_logp = forget == "npo"
        self.needs_retain = retain is not None

    def loss(self, run, forget, retain, step):
        batch = run.batch(forget, retain if self.retain else [], step)
        c = run.config
        return run.fused_loss(batch, forget=self.forget, retain=self.retain, forget_weight=c.forget_weight,
                              retain_weight=c.retain_weight)


for _method in (FusedObjective("ga", "ga", None, "gradient ascent on the forget set"),
                FusedObjective("gd", "ga", "nll", "gradient difference: ascent on forget, NLL on retain"),
                FusedObjective("npo", "npo", "nll", "NPO against the frozen model, NLL on retain"),
                FusedObjective("kl", "ga", "kl", "ascent on forget, KL to the frozen model on retain")):
    register_method(_method)


@register_method
class RMU(UnlearningMethod):
    """Representation misdirection: layer `rmu_layer`'s forget activations pulled to a random control vector
    of norm rmu_coeff, retain activations held to the frozen model's (weight rmu_alpha); only down_proj of
    layers rmu_layer-2..rmu_layer (and the projector) are trained."""

    name = "rmu"
    description = "steer a layer's forget activations to a random direction, hold retain activations"
    needs_reference = True
    needs_retain = True
    supports_lora = False

    def check(self, config):
        if config.scope == "lora":
            raise ValueError("RMU trains chosen down_proj weights directly; use scope='full' or 'mask'")

    def trainable_modules(self, model, config):
        layers = language_model(model).layers
        if not 0 <= config.rmu_layer < len(layers):
            raise ValueError(f"rmu_layer must be in [0, {len(layers) - 1}] for this model, got {config.rmu_layer}")
        modules = [layers[i].mlp.down_proj for i in range(max(0, config.rmu_layer - 2), config.rmu_layer + 1)]
        projector = multimodal_projector(model)
        return modules + ([projector] if projector is not None else [])

    def control(self, run):
        c = run.config
        g = torch.Generator().manual_seed(c.seed)
        u = torch.rand(language_model(run.model).config.hidden_size, generator=g)
        return (c.rmu_coeff * u / u.norm()).to(run.device, next(run.model.parameters()).dtype)

    def loss(self, run, forget, retain, step):
        c, batch = run.config, run.batch(forget, retain, step)

        def layer_out(model):
            out = model.base_model(input_ids=batch["input_ids"], output_hidden_states=True, **run.model_inputs(batch))
            return out.hidden_states[c.rmu_layer + 1]

        acts = layer_out(run.model)
        with torch.no_grad():
            ref_acts = layer_out(run.ref_model)
        mask = batch["attention_mask"].bool()  # padding positions count in neither term
        is_forget = batch["roles"] == FORGET
        f_mask, r_mask = mask & is_forget[:, None], mask & ~is_forget[:, None]
        return rmu_loss(acts[f_mask], self.control(run), acts[r_mask], ref_acts[r_mask], alpha=c.rmu_alpha), {}


@register_method
class Textual(UnlearningMethod):
    """Textual unlearning (Chakraborty et al.): 0.5 * GA on harmful answers + 1 * NLL on random mismatched
    answers to the same prompts + 1 * KL to the frozen model on normal data; text only, LLM part only."""

    name = "textual"
    description = "0.5 GA + mismatched answers + KL on text only, LLM part only"
    needs_reference = True
    needs_retain = True
    forget_weight = 0.5

    def trainable_modules(self, model, config):
        return [language_model(model), model.get_output_embeddings()]

    def loss(self, run, forget, retain, step):
        f_idx = run.indices(len(forget), step, 1)
        g = torch.Generator().manual_seed(run.config.seed * 7 + step)
        mismatch = [Record(forget[i].prompt, retain[int(torch.randint(len(retain), (1,), generator=g))].response,
                           "retain") for i in f_idx]
        batch = run.batch([forget[i] for i in f_idx], mismatch, 0)
        batch["ids"] = [("f", i) for i in f_idx] + [("m", n) for n in range(len(mismatch))]
        loss_a, stats = run.fused_loss(batch, forget="ga", retain="nll", forget_weight=self.forget_weight,
                                       retain_weight=1.0)
        loss_b, _ = run.fused_loss(run.batch([], retain, step), forget="ga", retain="kl", forget_weight=0.0,
                                   retain_weight=1.0)
        return loss_a + loss_b, {"forget_nll": stats.get("forget_nll")}
