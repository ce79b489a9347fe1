"""LoRA adapters written in PEFT's own format, so that a PEFT user loads them onto the original checkpoint:

    base = transformers.LlavaForConditionalGeneration.from_pretrained("checkpoints/llava-1.5-7b")
    model = peft.PeftModel.from_pretrained(base, "runs/lora/adapter")   # the logits of runs/lora/model

OUT/adapter holds adapter_config.json (peft's LoraConfig: rank, alpha, target modules) and
adapter_model.safetensors (the lora_A / lora_B weights under PEFT's key names): megabytes, not the model's size.
merge_lora_ then folds the adapters into the base weights, so the model itself saves as the original architecture.
"""
import os

import torch
from safetensors.torch import save_file

from unlearn_engine.atomic import atomic_dir

# the language model's attention and MLP projections (the vision tower and projector are not adapted)
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def lora_config(rank: int, base_model: str | None = None):
    """The peft LoraConfig scope 'lora' trains with (alpha 2 x rank, no dropout); base_model is recorded in the
    saved adapter_config.json (PEFT's base_model_name_or_path)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0,
                      base_model_name_or_path=base_model)


@torch.no_grad()
def lora_state_dict(model: torch.nn.Module) -> dict:
    """CPU copies of the injected adapters' weights under the names PEFT saves them with
    (base_model.model.<module>.lora_A.weight: PeftModel's wrapping, the adapter's name left out)."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for part in ("lora_A", "lora_B"):
                for layer in getattr(module, part).values():
                    state[f"base_model.model.{name}.{part}.weight"] = layer.weight.detach().cpu().contiguous()
    if not state:
        raise ValueError("the model holds no LoRA adapter (train it with scope='lora')")
    return state


def save_lora_adapter(path: str, state: dict, rank: int, base_model: str | None = None) -> None:
    """Writes `state` (lora_state_dict) and its LoraConfig as a PEFT adapter folder, atomically."""
    with atomic_dir(path) as tmp:
        lora_config(rank, base_model).save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})


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
