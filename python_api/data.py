"""Datasets: JSONL unlearning records, readers for the published prompt CSVs, and batch encoding with
labels on the response tokens only.

JSONL record: {"prompt": str, "response": str, "image": optional path, "role": "forget" | "retain"}.
"""
import csv
import io
import json
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch

from unlearn_engine.atomic import write_text

ROLE_NAMES = ("forget", "retain")


@dataclass(frozen=True)
class Record:
    prompt: str
    response: str = ""
    role: str = "forget"
    image: str | None = None
    category: str | None = None


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
                              item.get("category")))
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
        lines.append(json.dumps(item) + "\n")
    write_text(path, "".join(lines))


def csv_header(path: str) -> List[str]:
    """The header row of a CSV file (ValueError naming the file when it is empty)."""
    for row in csv.reader(io.StringIO(read_text(path), newline="")):
        return row
    raise ValueError(f"{path} is empty (no CSV header)")


def _read_csv(path, required):
    csv_header(path)
    rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    if not rows:
        raise ValueError(f"{path} has no rows")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; found {list(rows[0])}")
    return rows


def read_advbench(path: str) -> List[Record]:
    """AdvBench harmful_behaviors.csv (goal, target): harmful prompts with the affirmative target."""
    return [Record(r["goal"], r["target"], "forget", category="advbench") for r in _read_csv(path, ("goal", "target"))]


def read_xstest(path: str, label: str | None = "safe") -> List[Record]:
    """XSTest prompts (id, prompt, type, label, ...); label="safe" keeps the over-refusal probes (role retain),
    label="unsafe" the contrast prompts (role forget: the harmful ones), None all rows."""
    if label not in ("safe", "unsafe", None):
        raise ValueError(f"label must be 'safe', 'unsafe' or None, got {label!r}")
    rows = _read_csv(path, ("prompt", "type", "label"))
    records = [Record(r["prompt"], "", "retain" if r["label"] == "safe" else "forget", category=r["type"])
               for r in rows if label is None or r["label"] == label]
    if not records:
        raise ValueError(f"{path} has no rows labelled {label!r}")
    return records


def read_figstep(path: str) -> List[Record]:
    """FigStep SafeBench CSV (question, instruction, category_name): the question is the harmful query and
    the instruction the typographic text the attack renders into an image."""
    rows = _read_csv(path, ("question", "instruction", "category_name"))
    return [Record(r["question"], r["instruction"], "forget", category=r["category_name"]) for r in rows]


def image_tokens(model, image_size: tuple[int, int] | None = None) -> int:
    """How many image tokens one image becomes: LLaVA-style, one <image> per vision patch of the fixed image
    size; Qwen2-VL / Qwen2.5-VL, one <|image_pad|> per spatial_merge_size^2 patches, which depends on the
    image, so it needs image_size=(H, W) (multiples of patch_size * spatial_merge_size)."""
    vision = getattr(model.config, "vision_config", None)
    if vision is None:
        raise ValueError(f"{type(model).__name__} has no vision_config: it takes no images")
    merge = getattr(vision, "spatial_merge_size", None)
    if merge is None:
        return (vision.image_size // vision.patch_size) ** 2
    if image_size is None:
        raise ValueError(f"image_size: {type(model).__name__} turns each image into a number of tokens that "
                         "depends on its (H, W); expected image_size=(H, W), got None (image records are not "
                         "yet encoded for Qwen-VL models: they need pixel patches, image_grid_thw and "
                         "mm_token_type_ids)")
    unit = vision.patch_size * merge
    height, width = image_size
    if height % unit or width % unit or height < unit or width < unit:
        raise ValueError(f"image_size must be positive multiples of patch_size * spatial_merge_size = {unit}, "
                         f"got {tuple(image_size)}")
    return (height // unit) * (width // unit)


def prompt_text(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: its chat template when it has one, else a plain USER/ASSISTANT form."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"USER: {prompt} ASSISTANT:"


def encode(records: Sequence[Record], tokenizer, *, max_length: int = 256, image_loader=None,
           image_tokens: int = 0, stats: dict | None = None):
    """Right-padded batch: input_ids, attention_mask, labels (-100 except on the response tokens + EOS).

    Records with an image need image_loader(record.image) -> (3, H, W) tensor and image_tokens (the number
    of <image> tokens one image takes); the prompt is prefixed with them and pixel_values is added.
    A dict passed as `stats` receives, per record, "labelled" (labelled tokens kept after the max_length cut),
    "cut" (labelled tokens the cut removed) and "no_response" (the record has an empty response)."""
    if stats is not None:
        stats.update(labelled=[], cut=[], no_response=[])
    ids_list, label_list, pixels = [], [], []
    for r in records:
        prompt = r.prompt
        if r.image:
            if image_loader is None or image_tokens < 1:
                raise ValueError(f"record {r.prompt!r} has an image: pass image_loader and image_tokens")
            pixels.append(image_loader(r.image))
            prompt = "<image> " * image_tokens + prompt
        prompt_ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(" " + r.response if r.response else "", add_special_tokens=False)["input_ids"]
        response_ids = response_ids + [tokenizer.eos_token_id]
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + prompt_ids + response_ids
        labels = [-100] * (len(ids) - len(response_ids)) + response_ids
        ids_list.append(ids[:max_length])
        label_list.append(labels[:max_length])
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
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch
