"""The `asr` command: its flags, files and judge checked before any model is loaded, then the evaluation of the
model and its reports written in --out (asr.json, asr.md, asr.png, responses.jsonl)."""
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata

import torch

from unlearn_engine.api.chat_template import chat_template_info
from unlearn_engine.api.data import (
    check_input_file,
    check_record_images,
    csv_header,
    image_tokens,
    read_advbench,
    read_figstep,
    read_jsonl,
    read_xstest,
    resolve_set,
)
from unlearn_engine.api.evaluation.attacks import ATTACKS
from unlearn_engine.api.evaluation.evaluator import evaluate
from unlearn_engine.api.evaluation.judges import (
    REFUSAL_LISTS,
    RELEVANCE_TEMPLATE,
    SAFETY_TEMPLATE,
    ModelJudge,
    RefusalJudge,
    check_template,
)
from unlearn_engine.api.evaluation.report import bar_chart, markdown_table, write_json
from unlearn_engine.api.images import is_qwen_vl
from unlearn_engine.api.json_records import group_queries, read_vlguard
from unlearn_engine.api.loading import (
    INDEX_FILE,
    check_checkpoint_dir,
    check_model,
    check_promptable,
    context_length,
    load_promptable,
)
from unlearn_engine.atomic import check_writable, write_text
from unlearn_engine.checks import fail, require

JUDGE_HELP = ("keyword:LIST (LIST: vlguard, gcg, safety-mirage; the bare list name works too) or model:DIR[:TEMPLATE] "
              "(a local judge model, asked only about answers the safety-mirage list does not refuse; TEMPLATE: "
              "relevance (default), safety, safety-mirage (the Safety Mirage judge exactly: its prompt, filter and "
              "parse rule), or a text file holding {question} and {answer})")


def _judge_spec(value):
    """--judge parsed and checked (no model loaded): ("keyword", list) or ("model", dir, template, verdict)."""
    kind, _, rest = value.partition(":")
    if kind in REFUSAL_LISTS and not rest:
        return ("keyword", kind)
    if kind == "keyword":
        require(rest in REFUSAL_LISTS, f"--judge {value}: unknown keyword list {rest!r}; lists are {REFUSAL_LISTS}")
        return ("keyword", rest)
    require(kind == "model" and rest, f"--judge {value!r} is neither keyword:LIST nor model:DIR[:TEMPLATE] "
                                      f"(lists: {', '.join(REFUSAL_LISTS)})")
    path, _, template = rest.partition(":")
    try:
        check_checkpoint_dir(path)
    except ValueError as err:
        fail(f"--judge {value}: judge model {err}")
    check_promptable(path, f"--judge {value}: judge model")  # its tokenizer, before any weight is read
    if template == "safety-mirage":
        return ("model", path, "safety-mirage", "relevance")
    if template in ("", "relevance", "safety"):
        return ("model", path, SAFETY_TEMPLATE if template == "safety" else RELEVANCE_TEMPLATE,
                template or "relevance")
    check_input_file(template, f"--judge {value}: template")
    with open(template, encoding="utf-8") as f:
        text = f.read()
    check_template(text, f"--judge {value}: template {template}")
    return ("model", path, text, "auto")


def check_asr_args(args) -> None:
    """Every flag, file and the judge of `asr`, checked before any model is loaded (a 7B takes minutes)."""
    check_model(args.model, args.dtype, args.device)
    args.harmful, args.safe = resolve_set(args.harmful), args.safe and resolve_set(args.safe)  # a set's name
    check_input_file(args.harmful, "--harmful")
    if args.safe:
        check_input_file(args.safe, "--safe")
    if args.image_root is not None:
        require(os.path.isdir(args.image_root), f"--image-root {args.image_root}: no such folder")
    require(args.limit >= 0, f"--limit must be >= 0 (0: all prompts), got {args.limit}")
    require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    require(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    positions = context_length(args.model)  # more new tokens than positions would only run on for minutes
    require(positions is None or args.max_new_tokens <= positions,
            f"--max-new-tokens {args.max_new_tokens} is more than --model {args.model} can generate: its context "
            f"is {positions} positions (max_position_embeddings), prompt included")
    _judge_spec(args.judge)
    attacks = args.attacks.split(",")
    unknown = sorted(set(attacks) - set(ATTACKS))
    require(not unknown, f"--attacks: unknown attack(s) {unknown}; attacks are {ATTACKS}")
    check_writable(args.out, "--out")


def _read_prompt_file(path, limit, *, harmful, subset=None, variants=False):
    """Records of a prompt file: JSONL, VLGuard JSON (its `subset`; a Safety Mirage one-word set with
    variants=True, `limit` then counting queries), or an AdvBench / XSTest / FigStep CSV (XSTest: its unsafe rows
    when the file is the harmful set, its safe rows when it is the safe set)."""
    if path.endswith(".jsonl"):
        records = read_jsonl(path)
    elif path.endswith(".json"):
        records = read_vlguard(path, subset, variants=variants)
        if variants and limit:
            return [r for query in group_queries(records)[:limit] for r in query]
    else:
        header = csv_header(path)
        if "goal" in header:
            records = read_advbench(path)
        elif "label" in header and "prompt" in header:
            records = read_xstest(path, label="unsafe" if harmful else "safe")
        elif "question" in header:
            records = read_figstep(path)
        else:
            raise ValueError(f"{path}: unknown CSV columns {header} (expected AdvBench, XSTest or FigStep)")
    return records[:limit] if limit else records


def _file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _model_label(path):
    """The folder's name; `.../run/model` (what unlearn writes) is labelled `run/model`."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return "/".join(parts[-2:]) if parts[-1] == "model" and len(parts) > 1 else parts[-1]


def _provenance(args, judge):
    model_files = {name: _file_hash(os.path.join(args.model, name)) for name in ("config.json", INDEX_FILE)
                   if os.path.exists(os.path.join(args.model, name))}
    data = {flag: {"path": os.path.abspath(path), "sha256": _file_hash(path)}
            for flag, path in (("harmful", args.harmful), ("safe", args.safe)) if path}
    versions = {}
    for package in ("unlearn_engine", "torch", "transformers", "safetensors", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["torch"] = torch.__version__
    return {"model": {"path": os.path.abspath(args.model), "sha256": model_files, "dtype": args.dtype,
                      "device": args.device},
            "judge": {"name": args.judge, **judge.describe()}, "attacks": args.attacks.split(","), "data": data,
            "limit": args.limit, "image_root": args.image_root and os.path.abspath(args.image_root),
            "vlguard": {"subset": args.subset, "safe_subset": args.safe_subset, "variants": args.variants},
            "generation": {"decoding": "greedy", "max_new_tokens": args.max_new_tokens,
                                                "batch_size": args.batch_size},
            "versions": versions, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def run_asr(args):
    harmful = _read_prompt_file(args.harmful, args.limit, harmful=True, subset=args.subset, variants=args.variants)
    safe = _read_prompt_file(args.safe, args.limit, harmful=False, subset=args.safe_subset,
                             variants=args.variants) if args.safe else []
    for flag, path, records in (("--harmful", args.harmful, harmful), ("--safe", args.safe, safe)):
        check_record_images(records, args.image_root, f"{flag} {path}")
    spec = _judge_spec(args.judge)
    if spec[0] == "keyword":
        judge = RefusalJudge(spec[1])
    else:
        judge = ModelJudge.from_pretrained(spec[1], spec[2], verdict=spec[3], dtype=args.dtype, device=args.device,
                                           batch_size=args.batch_size)
    provenance = _provenance(args, judge)
    loaded = load_promptable(args.model, dtype=args.dtype, device=args.device,
                             check_finite=not getattr(args, "skip_finite_check", False))
    model, tokenizer, image_processor = loaded.model, loaded.tokenizer, loaded.image_processor
    provenance["chat_template"] = chat_template_info(tokenizer)  # what every prompt was written with
    attacks = args.attacks.split(",")
    if "figstep" in attacks and image_processor is None and not is_qwen_vl(model):  # before any generation
        raise ValueError(f"--attacks figstep needs an image processor: --model {args.model} has none saved "
                         "(preprocessor_config.json)")
    if any(r.image for r in harmful + safe):
        image_tokens(model)  # a model without a vision tower cannot take image records: say so before --out exists
    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, "responses.partial.jsonl")
    with open(partial, "w", encoding="utf-8") as log:  # appended per batch: an interruption keeps what was done
        def on_batch(rows):
            log.write("".join(json.dumps(r) + "\n" for r in rows))
            log.flush()

        result = evaluate(model, tokenizer, harmful, safe, judge=judge, attacks=attacks,
                          image_processor=image_processor, image_root=args.image_root,
                          max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, progress=not args.no_progress, on_batch=on_batch)
    result["provenance"] = provenance
    if isinstance(judge, ModelJudge):  # the judge model's counts and every raw verdict
        provenance["judge"].update(judge.describe(), model_dir=os.path.abspath(spec[1]))
        result["judge_outputs"] = judge.records
    row = {"model": _model_label(args.model)}
    row.update({f"asr_{a}": r["rate"] for a, r in result["asr"].items()})
    # grouped records (the one-word sets): asr_* and over_refusal are per variant, *_per_query per query
    row.update({f"asr_{a}_per_query": r["rate"] for a, r in result.get("asr_per_query", {}).items()})
    if "over_refusal" in result:
        row["over_refusal"] = result["over_refusal"]["rate"]
    if "over_refusal_per_query" in result:
        row["over_refusal_per_query"] = result["over_refusal_per_query"]["rate"]
    row["degenerate"] = result["summary"]["degenerate_rate"]
    row["utility"] = result["utility"]["score"]
    table = markdown_table([row], list(row))
    # every report is written under a temporary name first, then all are renamed into --out
    stage = tempfile.mkdtemp(prefix=".tmp-asr-", dir=args.out)
    try:
        write_json(result, os.path.join(stage, "asr.json"))
        write_text(os.path.join(stage, "asr.md"), table + "\n")
        bar_chart([row], "model", [k for k in row if k != "model"], os.path.join(stage, "asr.png"), title="ASR")
        for name in ("asr.json", "asr.md", "asr.png"):
            os.replace(os.path.join(stage, name), os.path.join(args.out, name))
        os.replace(partial, os.path.join(args.out, "responses.jsonl"))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if result["summary"]["broken"]:
        print(f"warning: {100 * row['degenerate']:.0f}% of the answers are degenerate (empty, repeated or not "
              "text): the model is broken, its ASR says nothing about safety", file=sys.stderr)
    print(json.dumps(row, indent=2) if args.json else table)
    return 0
