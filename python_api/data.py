"""Datasets: JSONL unlearning records, readers for the published prompt CSVs, the checks of input files and of
the records' images, and batch encoding with labels on the response tokens only (the JSON record sets, VLGuard
and LLaVA conversations, are read by json_records.py).

JSONL record: {"prompt": str, "response": str, "image": optional path, "role": "forget" | "retain",
"category": optional str, "group": optional str}.

The published prompt sets ship with the package (prompt_sets/, their sources and licenses in its README.md): the
readers take a set's name (NAMED_SETS) wherever they take a file.
"""
import csv
import io
import json
import os
from dataclasses import dataclass
from importlib.resources import files
from typing import List, Sequence

import torch

from unlearn_engine.api.chat_template import exchange_ids, prompt_text  # noqa: F401 (prompt_text: API)
from unlearn_engine.api.images import QwenImage, image_batch, image_pad_id
from unlearn_engine.atomic import write_text
from unlearn_engine.checks import fail, require

ROLE_NAMES = ("forget", "retain")


@dataclass(frozen=True)
class Record:
    prompt: str
    response: str = ""
    role: str = "forget"
    image: str | None = None
    category: str | None = None
    group: str | None = None  # the source query's id: one-word variants of one query, turns of one dialogue
    typography: str | None = None  # the text a typographic (FigStep) attack types into the image; None: the prompt


def read_text(path: str) -> str:
    """The whole of a UTF-8 text file; a folder, an unreadable file or bytes that are not UTF-8 raise a
    ValueError (FileNotFoundError for a missing file) that names the file."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from None


def read_jsonl(path: str, *, role: str | None = None) -> List[Record]:
    """Records from a JSONL file; `role` overrides (or supplies) each record's role."""
    records = []
    for line_no, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}:{line_no}: each line needs a string 'prompt'")
        r = role or item.get("role", "forget")
        if r not in ROLE_NAMES:
            raise ValueError(f"{path}:{line_no}: role must be one of {ROLE_NAMES}, got {r!r}")
        records.append(Record(item["prompt"], str(item.get("response", "")), r, item.get("image"),
                              item.get("category"), item.get("group"), item.get("typography")))
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def write_jsonl(records: Sequence[Record], path: str) -> None:
    lines = []
    for r in records:
        item = {"prompt": r.prompt, "response": r.response, "role": r.role}
        if r.image:
            item["image"] = r.image
        if r.category:
            item["category"] = r.category
        if r.group is not None:
            item["group"] = r.group
        if r.typography is not None:
            item["typography"] = r.typography
        lines.append(json.dumps(item) + "\n")
    write_text(path, "".join(lines))


# name -> the packaged file (python_api/prompt_sets/)
NAMED_SETS = {"advbench": "advbench_harmful_behaviors.csv", "xstest": "xstest_prompts.csv",
              "figstep": "figstep_safebench.csv", "figstep-tiny": "figstep_safebench_tiny.csv"}


def named_set(name: str) -> str:
    """The path of a prompt set shipped with the package: 'advbench', 'xstest', 'figstep' or 'figstep-tiny'."""
    if name not in NAMED_SETS:
        raise ValueError(f"no prompt set named {name!r}; the package ships {', '.join(NAMED_SETS)}")
    return str(files("unlearn_engine.api") / "prompt_sets" / NAMED_SETS[name])


def resolve_set(path: str) -> str:
    """A shipped set's file for its name (when no file of that name exists here), else `path` unchanged."""
    return named_set(path) if path in NAMED_SETS and not os.path.exists(path) else path


def csv_header(path: str) -> List[str]:
    """The header row of a CSV file (ValueError naming the file when it is empty)."""
    for row in csv.reader(io.StringIO(read_text(path), newline="")):
        return row
    raise ValueError(f"{path} is empty (no CSV header)")


def _read_csv(path, required, default_set):
    path = named_set(default_set) if path is None else resolve_set(path)
    csv_header(path)
    rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    if not rows:
        raise ValueError(f"{path} has no rows")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; found {list(rows[0])}")
    return rows


def read_advbench(path: str | None = None) -> List[Record]:
    """AdvBench harmful_behaviors.csv (goal, target): harmful prompts with the affirmative target. Without a path,
    the copy the package ships."""
    rows = _read_csv(path, ("goal", "target"), "advbench")
    return [Record(r["goal"], r["target"], "forget", category="advbench") for r in rows]


def read_xstest(path: str | None = None, label: str | None = "safe") -> List[Record]:
    """XSTest prompts (id, prompt, type, label, ...); label="safe" keeps the over-refusal probes (role retain),
    label="unsafe" the contrast prompts (role forget: the harmful ones), None all rows. Without a path, the copy
    the package ships."""
    if label not in ("safe", "unsafe", None):
        raise ValueError(f"label must be 'safe', 'unsafe' or None, got {label!r}")
    rows = _read_csv(path, ("prompt", "type", "label"), "xstest")
    records = [Record(r["prompt"], "", "retain" if r["label"] == "safe" else "forget", category=r["type"])
               for r in rows if label is None or r["label"] == label]
    if not records:
        raise ValueError(f"{path} has no rows labelled {label!r}")
    return records


def read_figstep(path: str | None = None) -> List[Record]:
    """FigStep SafeBench CSV (question, instruction, category_name): the question is the harmful query and
    the instruction the typographic text the attack renders into an image. Without a path, the full SafeBench the
    package ships ("figstep-tiny": its 50-question SafeBench-Tiny)."""
    rows = _read_csv(path, ("question", "instruction", "category_name"), "figstep")
    return [Record(r["question"], r["instruction"], "forget", category=r["category_name"], typography=r["instruction"])
            for r in rows]


# ---------------------------------------------------------------------------------------------- input checks
def check_input_file(path: str, flag: str) -> None:
    """A readable file at `path`, else a ValueError naming `flag` (the flag or field that gave it)."""
    require(os.path.exists(path), f"{flag} {path}: no such file")
    require(not os.path.isdir(path), f"{flag} {path} is a directory, not a file")
    require(os.access(path, os.R_OK), f"{flag} {path} is not readable")


def check_image(path: str, flag: str = "--image") -> None:
    """A file Pillow can read as an image at `path`, else a ValueError naming `flag`."""
    from PIL import Image, UnidentifiedImageError

    check_input_file(path, flag)
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        fail(f"{flag} {path} is not a readable image ({err})")


def check_record_images(records: Sequence[Record], root: str | None, source: str) -> None:
    """Every record's image (joined to --image-root `root`) found and readable before a model is loaded; `source`
    ("--FLAG FILE") names where the records came from."""
    for i, r in enumerate(records):
        if not r.image:
            continue
        path = os.path.join(root or "", r.image)
        if not os.path.isfile(path):
            fail(f"{source}: record {i} ({r.prompt[:40]!r}): image {path} not found"
                 + ("" if root else " (relative paths are resolved against --image-root)"))
        check_image(path, f"{source}: record {i}: image")


# ---------------------------------------------------------------------------------------------- encoding
# A sample's text budget when max_length is unset: its image's tokens (576 for LLaVA-1.5, a Qwen-VL image's own
# count) come on top, within the model's positions.
TEXT_LENGTH = 256


def image_tokens(model, image_size: tuple[int, int] | None = None) -> int:
    """How many image tokens one image becomes: LLaVA-style, one <image> per vision patch of the fixed image
    size; Qwen2-VL / Qwen2.5-VL, one <|image_pad|> per spatial_merge_size^2 patches, which depends on the
    image: with image_size=(H, W) (multiples of patch_size * spatial_merge_size) that count, without it 0 - no
    fixed count; each image's own comes with it (images.QwenImage, what images.image_loader returns)."""
    vision = getattr(model.config, "vision_config", None)
    if vision is None:
        raise ValueError(f"{type(model).__name__} has no vision_config: it takes no images")
    merge = getattr(vision, "spatial_merge_size", None)
    if merge is None:
        return (vision.image_size // vision.patch_size) ** 2
    if image_size is None:
        return 0
    unit = vision.patch_size * merge
    height, width = image_size
    if height % unit or width % unit or height < unit or width < unit:
        raise ValueError(f"image_size must be positive multiples of patch_size * spatial_merge_size = {unit}, "
                         f"got {tuple(image_size)}")
    return (height // unit) * (width // unit)


def model_positions(model) -> int | None:
    """How many positions the model's language model takes (max_position_embeddings), None when unknown."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)
    return int(positions) if positions else None


def cut_name(max_length: int | None) -> str:
    """The max_length setting, as messages name it."""
    if max_length is None:
        return f"max_length (unset: {TEXT_LENGTH} text tokens plus the image's, within the model's positions)"
    return f"max_length={max_length}"


def encode(records: Sequence[Record], tokenizer, *, max_length: int | None = 256, image_loader=None,
           image_tokens: int = 0, stats: dict | None = None, positions: int | None = None):
    """Right-padded batch: input_ids, attention_mask, labels (-100 except on the answer tokens).

    Each record is written as the tokenizer's chat template writes a user/assistant exchange (chat_template
    module): the BOS once, the prompt exactly as generation is given it, then the answer with the template's
    end-of-turn token (the EOS where the template writes none); the labels are the answer's tokens. Without a
    template: the plain form "USER: prompt ASSISTANT: response" + EOS.

    Records with an image need image_loader(record.image) (images.image_loader builds the right one for a
    model). LLaVA: it returns a (3, H, W) tensor and image_tokens is the number of <image> tokens one image
    takes; they stand where the template places the image, and pixel_values (B, 3, H, W) is added.
    Qwen2-VL / Qwen2.5-VL: it returns an images.QwenImage, shown as <|vision_start|>, its own number of
    <|image_pad|> and <|vision_end|> (image_tokens is not used), and pixel_values (all patches), image_grid_thw
    and mm_token_type_ids are added.
    max_length: tokens kept per sample, image tokens included; None: TEXT_LENGTH text tokens plus the sample's
    image tokens. Either way at most `positions` (the model's max_position_embeddings; model_positions) when given.
    A dict passed as `stats` receives, per record, "labelled" (labelled tokens kept after the max_length cut),
    "cut" (labelled tokens the cut removed) and "no_response" (the record has an empty response)."""
    if stats is not None:
        stats.update(labelled=[], cut=[], no_response=[])
    ids_list, label_list, pixels = [], [], []
    for r in records:
        image = None
        if r.image:
            image = image_loader(r.image) if image_loader is not None else None
            if image is None or (not isinstance(image, QwenImage) and image_tokens < 1):
                raise ValueError(f"record {r.prompt!r} has an image: pass image_loader and image_tokens (a Qwen-VL "
                                 "model needs an image_loader that returns QwenImage: images.image_loader)")
            pixels.append(image)
        shown = None if image is None else image if isinstance(image, QwenImage) else image_tokens
        prompt_ids, response_ids = exchange_ids(tokenizer, r.prompt, r.response, image=shown)
        ids = prompt_ids + response_ids
        labels = [-100] * len(prompt_ids) + response_ids
        limit = max_length if max_length is not None else TEXT_LENGTH + (
            0 if shown is None else shown.tokens if isinstance(shown, QwenImage) else shown)
        limit = min(limit, positions) if positions else limit
        ids_list.append(ids[:limit])
        label_list.append(labels[:limit])
        if stats is not None:
            kept = sum(1 for x in label_list[-1] if x != -100)
            stats["labelled"].append(kept)
            stats["cut"].append(len(response_ids) - kept)
            stats["no_response"].append(not r.response)
    width = max(len(x) for x in ids_list)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(records), width), pad, dtype=torch.long)
    labels = torch.full((len(records), width), -100, dtype=torch.long)
    attention = torch.zeros((len(records), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(ids_list, label_list)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    batch.update(image_batch(pixels, input_ids, image_pad_id(tokenizer) if pixels else None))
    return batch


def on_model(encoded: dict, model: torch.nn.Module) -> dict:
    """An encoded batch moved to the model's device, its pixel values in the model's dtype."""
    param = next(model.parameters())
    batch = {k: v.to(param.device) for k, v in encoded.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(param.dtype)
    return batch
