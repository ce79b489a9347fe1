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
import math
from typing import Dict, List, Sequence, Tuple

import torch

from unlearn_engine.api.data import Record
from unlearn_engine.checks import require
from unlearn_engine.roles import FORGET, RETAIN
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
    defaults: dict = {}       # this method's own defaults of the loss settings (SETTING_DEFAULTS otherwise)

    def trainable_modules(self, model, config) -> List[torch.nn.Module]:
        """The modules whose weights this method updates under scope 'full' (and 'mask')."""
        return [m for m in (language_model(model), multimodal_projector(model), model.get_output_embeddings())
                if m is not None]

    def uses_reference(self, config) -> bool:
        """Whether a run with `config` reads the frozen copy (needs_reference, unless a setting turns its term off)."""
        return self.needs_reference

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
        batch = run.batch(forget, retain if self.retain or run.config.retain_npo_weight else [], step)
        c = run.config
        return run.fused_loss(batch, forget=self.forget, retain=self.retain, forget_weight=c.forget_weight,
                              retain_weight=c.retain_weight, **fused_settings(c))


def fused_settings(config) -> dict:
    """The fused loss's pooling / normalisation / SimNPO / retain-side NPO settings of a resolved UnlearnConfig."""
    return {k: getattr(config, k) for k in ("delta", "retain_npo_weight", "forget_pooling", "retain_pooling",
                                            "forget_normalize", "retain_normalize")}


for _method in (FusedObjective("ga", "ga", None, "gradient ascent on the forget set"),
                FusedObjective("gd", "ga", "nll", "gradient difference: ascent on forget, NLL on retain"),
                FusedObjective("npo", "npo", "nll", "NPO against the frozen model, NLL on retain"),
                FusedObjective("simnpo", "simnpo", "nll", "SimNPO (no reference: softplus of the length-normalised "
                                                          "log-likelihood + delta), NLL on retain"),
                FusedObjective("kl", "ga", "kl", "ascent on forget, KL to the frozen model on retain")):
    register_method(_method)


class _LayerTaken(Exception):
    """Raised by layer_output's hook to end a forward once the steered layer's output is taken."""


def layer_output(model, index: int, forward, *, stop: bool):
    """(decoder layer `index`'s own output (B, T, H), what forward() returned) of one forward of `model`, taken by a
    forward hook on language_model(model).layers[index], as both peers take it. Not hidden_states[index + 1]: at the
    last layer that is the final norm's output. stop=True ends the forward at that layer (nothing after it is read;
    forward() then returns None)."""
    taken = []

    def hook(module, args, output):
        taken.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _LayerTaken

    handle = language_model(model).layers[index].register_forward_hook(hook)
    try:
        result = forward()
    except _LayerTaken:
        result = None
    finally:
        handle.remove()
    require(bool(taken), f"decoder layer {index} did not run in the model's forward")
    return taken[0], result


@register_method
class RMU(UnlearningMethod):
    """Representation misdirection: layer `rmu_layer`'s forget activations pulled to a random control vector
    of norm rmu_coeff, retain activations held to the frozen model's (weight rmu_alpha), plus rmu_nll_weight times
    the retain samples' NLL; only down_proj of layers rmu_layer-2..rmu_layer (and the projector) are trained."""

    name = "rmu"
    description = "steer a layer's forget activations to a random direction, hold retain activations"
    needs_reference = True
    needs_retain = True
    supports_lora = False
    defaults = dict(forget_pooling="batch", retain_pooling="batch")  # every row of the batch weighs the same

    def uses_reference(self, config):
        return config.rmu_alpha > 0  # alpha 0: no retain activation term, the frozen model is never run

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

        def forward(model):
            return lambda: model.base_model(input_ids=batch["input_ids"], **run.model_inputs(batch))

        nll, stats = None, {}
        if c.rmu_nll_weight > 0:
            # one full forward: the hook takes the layer's output, the fused loss the retain samples' NLL (the
            # forget samples weigh 0 there; their NLL is only reported)
            acts, (nll, stats) = layer_output(run.model, c.rmu_layer, lambda: run.fused_loss(
                batch, forget="ga", retain="nll", forget_weight=0.0, retain_weight=c.rmu_nll_weight, guard=False,
                retain_pooling=c.retain_pooling, retain_normalize=c.retain_normalize), stop=False)
        else:  # the layers after the steered one are not run (under FSDP2 the whole forward is, for its hooks)
            acts, _ = layer_output(run.model, c.rmu_layer, forward(run.model), stop=not getattr(run, "fsdp", False))
        # rows: every attended position (padding counts in neither term), or only the labelled (answer) positions
        rows = batch["attention_mask"].bool() if c.rmu_tokens == "attended" else batch["labels"] != -100
        roles = torch.tensor(run.host_roles(batch), device=rows.device)
        f_rows, r_rows = rows & (roles == FORGET)[:, None], rows & (roles == RETAIN)[:, None]
        control = self.control(run)
        forget_act = weighted_rows(acts, control, f_rows, c.forget_pooling, c.forget_weight)
        if c.rmu_alpha > 0:
            with torch.no_grad():
                ref_acts, _ = layer_output(run.ref_model, c.rmu_layer, forward(run.ref_model), stop=True)
            retain_act, retain_ref = weighted_rows(acts, ref_acts, r_rows, c.retain_pooling, 1.0), ref_acts[r_rows]
        else:  # no retain activation term (Safety Mirage's default): the frozen model is not run
            retain_act = retain_ref = acts.new_zeros(0, acts.shape[-1])
        loss = rmu_loss(forget_act, control, retain_act, retain_ref, alpha=c.rmu_alpha)
        return (loss if nll is None else loss + nll), stats


def weighted_rows(acts, target, rows, pooling: str, weight: float):
    """The selected rows of acts (B, T, H), rescaled about `target` ((H,) or (B, T, H)) so that rmu_loss's mean over
    rows of mean_h (row - target)^2 becomes weight * that mean under "batch" pooling, or weight * the mean over
    samples of each sample's mean over its rows under "sample" pooling (samples without rows left out)."""
    if pooling == "batch" and weight == 1.0:
        return acts[rows]  # as is: no rounding of low-precision activations
    counts = rows.sum(1, keepdim=True).expand_as(rows)[rows].float()  # the row's sample's number of rows
    target = target.expand_as(acts)[rows] if target.dim() == 1 else target[rows]
    if pooling == "batch":
        scale = torch.full_like(counts, weight)
    else:
        samples = (rows.sum(1) > 0).sum()
        scale = weight * rows.sum() / (samples.clamp(min=1) * counts)
    return target + scale.sqrt().to(acts.dtype)[:, None] * (acts[rows] - target)


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


# ----------------------------------------------------------------------------- settings and peer presets
# The loss settings a preset or a method may set, and their values when neither does.
SETTING_DEFAULTS = dict(beta=0.1, delta=0.0, forget_weight=1.0, retain_weight=1.0, retain_npo_weight=0.0,
                        forget_pooling="sample", retain_pooling="sample", forget_normalize="mean",
                        retain_normalize="mean", rmu_coeff=20.0, rmu_alpha=10.0, rmu_nll_weight=0.0,
                        rmu_tokens="attended", nll_bound=15.0)
# Neither peer has our divergence guard (a forget sample stops being ascended once its NLL passes nll_bound): a
# preset turns it off unless the user sets nll_bound.
NO_GUARD = dict(nll_bound=math.inf)

# Settings that reproduce a peer codebase's loss on the same batch (README: "Matching open-unlearning and Safety
# Mirage"), by our method name; hyper-parameters are the peer's shipped defaults. Its names, in the comments.
PRESETS = {
    "open-unlearning": {  # locuslab/open-unlearning, src/trainer/unlearn/*.py and configs/trainer/*.yaml
        # GradAscent: -model(**forget).loss, the token mean over the whole forget batch
        "ga": dict(**NO_GUARD, forget_pooling="batch", forget_normalize="mean"),
        # GradDiff: gamma * forget + alpha * retain NLL, both token means over their batch
        "gd": dict(**NO_GUARD, forget_pooling="batch", forget_normalize="mean", retain_pooling="batch",
                   retain_normalize="mean", forget_weight=1.0, retain_weight=1.0),
        # NPO (compute_dpo_loss): per forget sample, summed log-likelihood; beta 0.1, gamma 1, alpha 1
        "npo": dict(**NO_GUARD, beta=0.1, forget_pooling="sample", forget_normalize="sum", retain_pooling="batch",
                    retain_normalize="mean", forget_weight=1.0, retain_weight=1.0, retain_npo_weight=0.0),
        # SimNPO: per forget sample, length-normalised; beta 4.5, delta 0, gamma 0.125, alpha 1
        "simnpo": dict(**NO_GUARD, beta=4.5, delta=0.0, forget_pooling="sample", forget_normalize="mean",
                       retain_pooling="batch", retain_normalize="mean", forget_weight=0.125, retain_weight=1.0),
        # RMU (compute_activation_loss over labels != -100, per sample; EMBED_DIFF retain): steering_coeff 2,
        # gamma 1, alpha 1
        "rmu": dict(**NO_GUARD, rmu_tokens="labelled", forget_pooling="sample", retain_pooling="sample",
                    forget_weight=1.0, rmu_alpha=1.0, rmu_coeff=2.0),
    },
    "safety-mirage": {  # OPTML-Group/VLM-Safety-Unlearn, LLaVAUnlearnTrainer.training_step (llava/train/
        # llava_unlearn_full_trainer.py), defaults of llava/train/train_unlearn_full.py, scripts/v1_5/*.sh
        # NPO: one softplus of the batch-pooled token mean (model loss); npo_beta 0.9, npo_forget_alpha 1,
        # npo_llava_loss_weight 1 (retain NLL), npo_retain_alpha 1 (retain-side NPO), as finetune_unlearn_npo.sh
        "npo": dict(**NO_GUARD, beta=0.9, forget_pooling="batch", forget_normalize="mean", retain_pooling="batch",
                    retain_normalize="mean", forget_weight=1.0, retain_weight=1.0, retain_npo_weight=1.0),
        # RMU: mse_loss over every activation element of the batch + rmu_llava_loss_weight * the model loss of a
        # retain batch (pooled token mean). The trainer's own defaults (train_unlearn_full.py): rmu_steering_coeffs
        # "300", rmu_retain_alpha 0.0 (no retain activation term), rmu_llava_loss_weight 1.0; the 10 / 1 of
        # finetune_unlearn.sh belong to a script that runs --unlearn_type npo
        "rmu": dict(**NO_GUARD, rmu_tokens="attended", forget_pooling="batch", retain_pooling="batch",
                    retain_normalize="mean", forget_weight=1.0, rmu_alpha=0.0, rmu_coeff=300.0, rmu_nll_weight=1.0),
    },
}
PRESET_NAMES = ("none", *PRESETS)


def resolve_settings(method: str, preset: str | None, given: Dict[str, object]) -> Dict[str, object]:
    """Every loss setting of SETTING_DEFAULTS: the value the user gave (not None) wins over the preset's, which
    wins over the method's own default, which wins over SETTING_DEFAULTS. ValueError naming the preset and the
    method when the preset has no counterpart of the method."""
    preset = None if preset in (None, "none") else preset
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESET_NAMES}, got {preset!r}")
    table = {}
    if preset is not None:
        if method not in PRESETS[preset]:
            raise ValueError(f"preset {preset!r} has no counterpart of method {method!r}: it supports "
                             f"{', '.join(repr(m) for m in PRESETS[preset])}")
        table = PRESETS[preset][method]
    own = METHODS[method].defaults if method in METHODS else {}
    out = {}
    for name, default in SETTING_DEFAULTS.items():
        value = given.get(name)
        out[name] = value if value is not None else table.get(name, own.get(name, default))
    return out
