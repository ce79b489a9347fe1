"""The one source of the unlearning run's settings: the Python API takes UnlearnConfig, and the command
line's `unlearn` flags are generated from its fields (names, types, defaults, help), so they cannot drift.

A run can also come from a file: `unlearn-engine unlearn --config run.toml` (or .json) with the same keys;
flags given on the command line win over the file.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict

from unlearn_engine.api.backward_step import OPTIMIZER_STATES
from unlearn_engine.api.methods import METHODS, PRESET_NAMES, SETTING_DEFAULTS, get_method, resolve_settings
from unlearn_engine.unlearning_loss import NORMALIZES, POOLINGS

SCOPES = ("full", "lora", "mask")
PARALLEL = ("ddp", "fsdp")
# Settings that do not change the trajectory of the steps already taken: a resumed run may change them (and
# uses the new values). Every other field is part of the run's fingerprint: a resume with another value is
# refused (a new lr included: the moments in the checkpoint belong to the old one; start a new run instead).
RESUME_SAFE = ("steps", "checkpoint_every", "keep_checkpoints", "divergence_factor", "save",
               "gradient_checkpointing")
RMU_TOKENS = ("attended", "labelled")
REFERENCE_DEVICES = ("model", "cpu")
SAVES = ("merged", "adapter", "both")
GRADIENT_STEPS = ("in_backward", "after_backward")
ON_OFF = ("off", "on")


class ResolvedFloat(float):
    """A loss setting's value filled in from the preset or the defaults, not given by the user (equal to the float)."""


class ResolvedStr(str):
    """The same for a string setting."""


def setting(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class UnlearnConfig:
    method: str = setting("npo", "unlearning method (registered in unlearn_engine.api.methods)", lambda: tuple(METHODS))
    steps: int = setting(100, "optimizer steps")
    lr: float = setting(1e-5, "learning rate")
    batch_size: int = setting(4, "forget samples per step (and as many retain samples)")
    preset: str = setting("none", "reproduce a peer codebase's loss: 'open-unlearning' (ga, gd, npo, simnpo, rmu) or "
                                  "'safety-mirage' (npo, rmu); settings given explicitly win over it",
                          lambda: PRESET_NAMES)
    beta: float = setting(None, "NPO / SimNPO temperature (unset: the preset's, else 0.1)")
    delta: float = setting(None, "SimNPO margin delta (unset: the preset's, else 0)")
    forget_weight: float = setting(None, "weight of the forget term (unset: the preset's, else 1)")
    retain_weight: float = setting(None, "weight of the retain term (unset: the preset's, else 1)")
    retain_npo_weight: float = setting(None, "weight w of the retain-side NPO term -w (2/beta) softplus(beta (m - "
                                             "m_ref)) (unset: the preset's, else 0)")
    forget_pooling: str = setting(None, "'sample': mean of per-sample forget terms; 'batch': the batch's forget tokens "
                                        "pooled as one sample (unset: the preset's, else 'sample'; RMU 'batch')",
                                  POOLINGS)
    retain_pooling: str = setting(None, "the same for the retain terms", POOLINGS)
    forget_normalize: str = setting(None, "forget log-likelihood: 'mean' over tokens or 'sum' (unset: the preset's, "
                                          "else 'mean')", NORMALIZES)
    retain_normalize: str = setting(None, "the same for the retain log-likelihood", NORMALIZES)
    scope: str = setting("full", "what is trained: 'full' (the weights the method trains), 'lora' (LoRA adapters "
                                 "on the language model, merged back at the end), 'mask' (saliency top fraction)",
                         SCOPES)
    mask_fraction: float = setting(0.05, "scope 'mask': fraction of the weights trained")
    lora_rank: int = setting(8, "scope 'lora': adapter rank")
    save: str = setting(None, "what the CLI writes in --out: 'merged' (OUT/model, the full model), 'adapter' "
                              "(OUT/adapter, a PEFT LoRA adapter; scope 'lora' only) or 'both' (unset: 'both' "
                              "under scope 'lora', else 'merged')", SAVES)
    rmu_layer: int = setting(1, "RMU: steer this decoder layer's output; train down_proj of the 3 layers up to it")
    rmu_coeff: float = setting(None, "RMU: norm of the control vector (unset: the preset's, else 20)")
    rmu_alpha: float = setting(None, "RMU: weight of the retain term (unset: the preset's, else 10)")
    rmu_nll_weight: float = setting(None, "RMU: weight of the NLL of the batch's retain samples, pooled as "
                                          "retain_pooling / retain_normalize say (Safety Mirage's "
                                          "rmu_llava_loss_weight; unset: the preset's, else 0)")
    rmu_tokens: str = setting(None, "RMU: rows compared, 'attended' (every non-padding position) or 'labelled' "
                                    "(answer positions) (unset: the preset's, else 'attended')", RMU_TOKENS)
    nll_bound: float = setting(None, "divergence guard: stop ascending a forget sample once its NLL passes this "
                                     "(unset: 15, or no guard (inf) under a preset: the peers have none)")
    divergence_factor: float = setting(10.0, "warn once (log and summary) when a step's retain NLL passes this "
                                             "factor times its step-1 value (counted from at least 1 nat per "
                                             "token) or is not finite (0: no warning)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    parallel: str = setting("ddp", "under torchrun: average gradients ('ddp') or shard with FSDP2 ('fsdp')", PARALLEL)
    reference_device: str = setting("model", "where the frozen reference (kl, textual, rmu; NPO under fsdp) is "
                                             "kept: 'model' (a copy on the model's device) or 'cpu' (host memory, each "
                                             "layer copied to the device only while it runs)", REFERENCE_DEVICES)
    seed: int = setting(0, "seed of batches, control vectors and mismatches")
    checkpoint_every: int = setting(0, "steps between checkpoints (0: none)")
    keep_checkpoints: int = setting(2, "keep the newest K checkpoints, deleting older ones once a newer one is "
                                       "complete (0: keep all)")
    max_length: int = setting(None, "tokens per sample (prompt + response, image tokens included), longer ones are "
                                    "cut (unset: 256 text tokens plus the sample's image tokens - 576 for a "
                                    "LLaVA-1.5 image, a Qwen-VL image's own count - within the model's "
                                    "max_position_embeddings)")
    gradient_step: str = setting("in_backward", "when the optimizer consumes the gradients: 'in_backward' steps each "
                                                "parameter as soon as autograd has accumulated its gradient and frees "
                                                "it (no full gradient is kept; scope 'mask' keeps fp32 masters and "
                                                "moments of the selected elements only, and its saliency pass holds "
                                                "the running gradient sum in CPU memory); 'after_backward' keeps the "
                                                "full gradient and steps after backward (scope 'mask' then keeps "
                                                "full fp32 masters). FSDP and fp16 full / LoRA scopes always step "
                                                "after backward", GRADIENT_STEPS)
    optimizer_state: str = setting("fp32", "AdamW moments: 'fp32' beside the masters (8 bytes per updated element), "
                                           "'bf16' (4 bytes; the update computed in fp32 and the moments rounded "
                                           "back, ~0.4% relative rounding of each step), 'cpu' (fp32 in CPU memory, "
                                           "none on the accelerator; each step copies one parameter's moments over "
                                           "and back). Other than 'fp32' needs gradient_step 'in_backward'",
                                   OPTIMIZER_STATES)
    gradient_checkpointing: str = setting("off", "'on': the model's decoder (and vision) layers keep only their "
                                                 "inputs and recompute their forward in backward (transformers' "
                                                 "gradient checkpointing): activation memory of one layer instead "
                                                 "of all, about a third more compute, the same gradients", ON_OFF)

    def __post_init__(self):
        self._resolve(strict=False)  # a bad method or preset is reported by validate()

    def _resolve(self, strict: bool) -> None:
        """Fills every unset (None) loss setting: the preset's value, else the method's default, else
        SETTING_DEFAULTS. Filled values are marked (Resolved*), so a copy with another preset or method
        (dataclasses.replace) resolves them again, while values the user gave stay as given."""
        given = {name: None if isinstance(getattr(self, name), (ResolvedFloat, ResolvedStr)) else getattr(self, name)
                 for name in SETTING_DEFAULTS}
        try:
            values = resolve_settings(self.method, self.preset, given)
        except ValueError:
            if strict:
                raise
            return
        for name, value in values.items():
            if given[name] is None:
                setattr(self, name, ResolvedStr(value) if isinstance(value, str) else ResolvedFloat(value))

    def filled_in(self) -> list:
        """The settings the preset / method defaults filled in (the user gave no value): saved with config.json so
        that `--config` reading it back leaves them unset, and a new --preset or --method fills them again."""
        return [name for name in SETTING_DEFAULTS if isinstance(getattr(self, name), (ResolvedFloat, ResolvedStr))]

    def validate(self) -> "UnlearnConfig":
        """Checks the settings (ValueError naming the setting) after resolving the unset ones; returns self."""
        method = get_method(self.method)
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"preset must be one of {PRESET_NAMES}, got {self.preset!r}")
        self._resolve(strict=True)
        for name, choices in (("forget_pooling", POOLINGS), ("retain_pooling", POOLINGS),
                              ("forget_normalize", NORMALIZES), ("retain_normalize", NORMALIZES),
                              ("rmu_tokens", RMU_TOKENS), ("reference_device", REFERENCE_DEVICES),
                              ("gradient_step", GRADIENT_STEPS), ("optimizer_state", OPTIMIZER_STATES),
                              ("gradient_checkpointing", ON_OFF)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.save is not None and self.save not in SAVES:
            raise ValueError(f"save must be one of {SAVES}, got {self.save!r}")
        if self.save in ("adapter", "both") and self.scope != "lora":
            raise ValueError(f"save={self.save!r} writes a LoRA adapter: it needs scope='lora', got "
                             f"scope={self.scope!r} (use save='merged')")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if f.type in (int, float) and not numeric and not (value is None and f.default is None):  # None: unset
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            no_guard = f.name == "nll_bound" and value == math.inf  # nll_bound inf: no divergence guard
            if isinstance(value, float) and not math.isfinite(value) and not no_guard:
                raise ValueError(f"{f.name} must be finite, got {value}")
        for name in ("steps", "batch_size", "lora_rank", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "beta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("forget_weight", "retain_weight", "retain_npo_weight", "rmu_alpha", "rmu_nll_weight",
                     "weight_decay", "nll_bound", "checkpoint_every", "rmu_layer", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.divergence_factor != 0 and self.divergence_factor <= 1:
            raise ValueError(f"divergence_factor must be 0 (no warning) or > 1, got {self.divergence_factor}")
        if not 0 < self.mask_fraction <= 1:
            raise ValueError(f"mask_fraction must be in (0, 1], got {self.mask_fraction}")
        if self.optimizer_state != "fp32" and self.gradient_step != "in_backward":
            raise ValueError(f"optimizer_state={self.optimizer_state!r} needs gradient_step='in_backward', got "
                             f"{self.gradient_step!r}")
        if self.optimizer_state != "fp32" and self.parallel == "fsdp":
            raise ValueError(f"optimizer_state={self.optimizer_state!r} is not supported with parallel='fsdp' (the "
                             "step there runs after backward on sharded fp32 state): use 'fp32'")
        method.check(self)
        return self


def choices_of(f: dataclasses.Field):
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def read_config_file(path: str) -> Dict[str, Any]:
    """Settings from a .json or .toml file (a flat table of keys)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            raise ValueError(f"--config {path}: expected a .json or .toml file")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path}: not valid JSON ({err})") from None
    except ValueError as err:  # tomllib.TOMLDecodeError is a ValueError
        raise ValueError(f"--config {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table of settings, got {type(data).__name__}")
    return data
