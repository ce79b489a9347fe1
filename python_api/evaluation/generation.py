"""Batched greedy generation: each prompt written with the chat template, images where the template places them."""
from typing import List, Sequence

import torch

from unlearn_engine.api.chat_template import prompt_ids, prompt_text
from unlearn_engine.api.data import image_tokens
from unlearn_engine.api.images import QwenImage, image_batch, image_pad_id
from unlearn_engine.checks import require


def image_slot(model, image):
    """How prompt_text shows an encoded image (images.image_input): a QwenImage as itself, a LLaVA pixel tensor as
    image_tokens(model) <image> tokens; None for no image."""
    if image is None or isinstance(image, QwenImage):
        return image
    return image_tokens(model)


def _stop_ids(model, tokenizer) -> set:
    """The tokens generation stops at: the model's generation config's eos_token_id (an instruct model's extra
    end-of-turn tokens, from the checkpoint's generation_config.json), else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _until_stop(ids: List[int], stops: set) -> List[int]:
    """The generated ids before the first stop token: a stop token that is no special token (skip_special_tokens
    keeps it) is not part of the answer either."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, pixel_values: torch.Tensor | None = None,
             images: Sequence | None = None, max_new_tokens: int = 32, batch_size: int = 16,
             progress: bool = True, system: str | None = None) -> List[str]:
    """Greedy decoding of the prompts, each written with the tokenizer's chat template (prompt_text, with `system`
    as the system message when given; the BOS token once), left-padded batches. pixel_values (one image per
    prompt) go with prompts that already hold the image tokens. images: one encoded image per prompt
    (images.image_input: a QwenImage or a LLaVA pixel tensor) or None; its tokens stand where the template
    places an image and its inputs (pixel_values, and for Qwen-VL image_grid_thw, mm_token_type_ids) go with it."""
    from tqdm.auto import tqdm

    require(pixel_values is None or images is None, "pass pixel_values or images, not both")
    require(images is None or len(images) == len(prompts),
            f"images must hold one entry (or None) per prompt: {len(prompts)} prompts, {len(images or ())} images")
    param = next(model.parameters())
    device = param.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = _stop_ids(model, tokenizer)
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = prompts[start:start + batch_size]
        chunk_images = images[start:start + batch_size] if images is not None else [None] * len(chunk)
        encoded = [prompt_ids(tokenizer, prompt_text(tokenizer, p, system, image=image_slot(model, img)))
                   for p, img in zip(chunk, chunk_images)]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        extra = {}
        if pixel_values is not None:
            extra["pixel_values"] = pixel_values[start:start + batch_size]
        elif any(img is not None for img in chunk_images):
            extra = image_batch(chunk_images, ids, image_pad_id(tokenizer))
        extra = {k: v.to(device, param.dtype) if k == "pixel_values" else v.to(device) for k, v in extra.items()}
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, **extra)
        outputs += tokenizer.batch_decode([_until_stop(row, stops) for row in out[:, width:].tolist()],
                                          skip_special_tokens=True)
    return [o.strip() for o in outputs]
