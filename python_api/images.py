"""Images as the inputs a VLM takes: one image file (or PIL image) to what its forward needs.

- LLaVA: a (3, S, S) pixel tensor of the vision tower's fixed size, shown as `image_tokens(model)` <image> tokens.
- Qwen2-VL / Qwen2.5-VL: a QwenImage - the image resized to a multiple of patch_size * spatial_merge_size
  (within the processor's min/max pixels), normalised and cut into flattened patches (num_patches,
  C * temporal_patch_size * patch_size^2) in the order the vision tower reads them, and its (t, h, w) patch
  grid; shown as <|vision_start|>, num_patches / spatial_merge_size^2 <|image_pad|>, <|vision_end|>. A batch
  adds `image_grid_thw` (one row per image) and `mm_token_type_ids` (1 on the <|image_pad|> tokens), which
  this transformers version's Qwen forward needs for its multimodal RoPE.

The Qwen patches come from the checkpoint's own image processor when it ships one, else from transformers'
Qwen2VLImageProcessorPil (Pillow and NumPy only: no torchvision) set from the model's vision config, with
min / max pixels scaled as the released checkpoints set them (4 and 16384 merged units of
(patch_size * spatial_merge_size)^2 pixels: 3136 and 12845056 for patch 14, merge 2).
"""
import os
from typing import List, NamedTuple, Sequence

import torch

from unlearn_engine.checks import require

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
# the model inputs an encoded batch may hold besides input_ids (and labels)
MODEL_INPUTS = ("attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def model_inputs(batch: dict) -> dict:
    """The model's keyword inputs of an encoded batch: attention mask, and the image inputs when it has images
    (LLaVA pixel values; Qwen-VL flattened patches, image_grid_thw and mm_token_type_ids)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


class QwenImage(NamedTuple):
    """One image as a Qwen2-VL / Qwen2.5-VL forward takes it."""
    pixel_values: torch.Tensor  # (grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size^2)
    grid_thw: torch.Tensor      # (3,) long: the patch grid (t, h, w)
    merge_size: int             # spatial_merge_size: merge_size^2 patches become one token

    @property
    def tokens(self) -> int:
        return int(self.grid_thw.prod()) // self.merge_size ** 2

    def text(self) -> str:
        """The image's place in the prompt: vision start, one pad per merged token, vision end."""
        return VISION_START + IMAGE_PAD * self.tokens + VISION_END


def is_qwen_vl(model) -> bool:
    """A model whose vision tower merges patches (Qwen2-VL / Qwen2.5-VL): its token count depends on the image."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    return vision is not None and getattr(vision, "spatial_merge_size", None) is not None


def qwen_image_processor(model, image_processor=None):
    """The image processor that cuts images into `model`'s patches: `image_processor` when given (checked
    against the model's patch, temporal patch and merge sizes), else one built from its vision config."""
    vision = model.config.vision_config
    want = {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
            "merge_size": vision.spatial_merge_size}
    if image_processor is not None:
        got = {k: getattr(image_processor, k, None) for k in want}
        require(got == want, f"image processor {type(image_processor).__name__} does not fit {type(model).__name__}: "
                             f"expected {want}, got {got}")
        return image_processor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = (vision.patch_size * vision.spatial_merge_size) ** 2
    return Qwen2VLImageProcessorPil(min_pixels=4 * unit, max_pixels=16384 * unit, **want)


def _open(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # an RGB image as given (it is not changed)


def image_input(model, image, image_processor=None):
    """One image (a path or PIL image) as `model` takes it: a QwenImage for Qwen-VL; for LLaVA a (3, S, S)
    tensor through the checkpoint's image processor when it has one (its resize and normalisation), else
    resized to the vision tower's size and scaled to [-1, 1]."""
    import numpy as np

    image = _open(image)
    if is_qwen_vl(model):
        out = qwen_image_processor(model, image_processor)(images=[image], return_tensors="pt")
        return QwenImage(out["pixel_values"], out["image_grid_thw"][0].long(),
                         model.config.vision_config.spatial_merge_size)
    if image_processor is not None:
        return image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    size = model.config.vision_config.image_size
    image = image.resize((size, size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def image_loader(model, image_processor=None, root: str | None = None):
    """path -> image_input(model, root/path): the image_loader that encode() and the Unlearner take."""
    def load(path):
        return image_input(model, os.path.join(root or "", path), image_processor)
    return load


def image_batch(images: Sequence, input_ids: torch.Tensor, image_token_id: int | None) -> dict:
    """The image inputs of a batch from the encoded images of its samples that have one (in sample order):
    stacked LLaVA pixels, or Qwen patches concatenated with image_grid_thw and mm_token_type_ids."""
    images: List = [i for i in images if i is not None]
    if not images:
        return {}
    qwen = [isinstance(i, QwenImage) for i in images]
    require(all(qwen) or not any(qwen), "a batch mixes Qwen-VL images and fixed-size pixel tensors")
    if not qwen[0]:
        return {"pixel_values": torch.stack(images)}
    require(image_token_id is not None, f"the tokenizer has no {IMAGE_PAD} token: it cannot show Qwen-VL images")
    return {"pixel_values": torch.cat([i.pixel_values for i in images]),
            "image_grid_thw": torch.stack([i.grid_thw for i in images]),
            "mm_token_type_ids": (input_ids == image_token_id).int()}


def image_pad_id(tokenizer) -> int | None:
    """The id of <|image_pad|> in `tokenizer`, None when it has no such token."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id
