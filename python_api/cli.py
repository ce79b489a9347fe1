"""The `unlearn-engine` command line: unlearn, asr, rai, vlguard-split, demo, bench, info.

The `unlearn` flags are generated from UnlearnConfig (config.py); --config FILE runs from a JSON/TOML file.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import torch

from unlearn_engine._library import build_info
from unlearn_engine.api.adapter import save_lora_adapter
from unlearn_engine.api.chat_template import chat_template_info
from unlearn_engine.api.config import UnlearnConfig, choices_of, read_config_file
from unlearn_engine.api.data import (
    VLGUARD_SUBSETS,
    csv_header,
    group_queries,
    image_tokens,
    read_advbench,
    read_figstep,
    read_jsonl,
    read_text,
    read_vlguard,
    read_xstest,
    resolve_set,
    write_jsonl,
)
from unlearn_engine.api.images import image_input, image_loader, is_qwen_vl
from unlearn_engine.api.loading import (
    DTYPES,
    check_checkpoint_dir,
    check_promptable,
    context_length,
    empty_model,
    load_promptable,
    load_vlm,
    save_vlm,
)
from unlearn_engine.api.methods import SETTING_DEFAULTS, get_method
from unlearn_engine.atomic import atomic_path, check_writable, write_text
from unlearn_engine.checks import fail, require

# Settings of an unlearn run that are not UnlearnConfig fields (they may come from --config too).
RUN_KEYS = {"model": None, "forget": None, "retain": None, "out": None, "dtype": "bfloat16", "device": None,
            "resume": False, "overwrite": False, "image_root": None}
# What an unlearn run writes in --out: --overwrite removes these (and nothing else) before the new run writes.
RUN_OUTPUTS = ("config.json", "data.json", "metrics.jsonl", "model", "adapter", "checkpoints")


def _cmd_info(args):
    info = build_info()
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                ops=sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                           if name.startswith("unlearn_engine::")))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            value = ", ".join(value) if isinstance(value, list) else value
            print(f"{key:<{width}}  {value}")
    return 0


def _load_model(args):
    """(model, tokenizer, image processor or None) from --model; a saved processor carries both."""
    loaded = load_promptable(args.model, dtype=args.dtype, device=args.device,
                             check_finite=not getattr(args, "skip_finite_check", False))
    return loaded.model, loaded.tokenizer, loaded.image_processor


# ---------------------------------------------------------------- checks made before any heavy work
def _check_device(device):
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        fail(f"--device {device!r} is not a torch device ({str(err).splitlines()[0]})")
    if dev.type == "cuda":
        require(torch.cuda.is_available(), f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        require(dev.index is None or dev.index < torch.cuda.device_count(),
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        require(torch.backends.mps.is_available(), f"--device {device}: MPS is not available here")
    else:
        require(dev.type == "cpu", f"--device {device}: only cpu and cuda devices are supported")


def _check_model(model, dtype, device):
    require(dtype in DTYPES, f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_device(device)
    check_promptable(model, "--model")  # its tokenizer too: a 7B's weights take minutes to load


def _check_model_flags(args):
    _check_model(args.model, args.dtype, args.device)


def _check_input_file(path, flag):
    require(os.path.exists(path), f"{flag} {path}: no such file")
    require(not os.path.isdir(path), f"{flag} {path} is a directory, not a file")
    require(os.access(path, os.R_OK), f"{flag} {path} is not readable")


def _check_image(path, flag="--image"):
    from PIL import Image, UnidentifiedImageError

    _check_input_file(path, flag)
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        fail(f"{flag} {path} is not a readable image ({err})")


def _check_record_images(records, root, source):
    """Every record's image (joined to --image-root `root`) found and readable before a model is loaded; `source`
    ("--FLAG FILE") names where the records came from."""
    for i, r in enumerate(records):
        if not r.image:
            continue
        path = os.path.join(root or "", r.image)
        if not os.path.isfile(path):
            fail(f"{source}: record {i} ({r.prompt[:40]!r}): image {path} not found"
                 + ("" if root else " (relative paths are resolved against --image-root)"))
        _check_image(path, f"{source}: record {i}: image")


def _prepare_unlearn(args) -> argparse.Namespace:
    """Everything an unlearn run can be refused for, checked before any model is loaded or file written (loading
    a 7B takes minutes); returns what was read (run settings, config, records, fingerprint) for the run itself."""
    from unlearn_engine.api.checkpoint import list_checkpoints
    from unlearn_engine.api.fingerprint import check_resume_settings

    run, config = _unlearn_settings(args)
    records = {}
    for key in ("forget", "retain"):
        if run[key]:
            _check_input_file(run[key], f"--{key}")
        records[key] = read_jsonl(run[key], role=key) if run[key] else []
    _check_model(run["model"], run["dtype"], run["device"])
    out = run["out"]
    check_writable(out, "--out")
    # settings only the model can judge (e.g. --rmu-layer against its layer count): on an empty (meta) model
    skeleton = empty_model(run["model"])
    get_method(config.method).trainable_modules(skeleton, config)
    forget, retain = records["forget"], records["retain"]
    require(not get_method(config.method).needs_retain or bool(retain),
            f"method {config.method!r} needs retain records (--retain)")
    root = run["image_root"]
    require(root is None or os.path.isdir(root), f"--image-root {root} is not a directory")
    for key in ("forget", "retain"):
        _check_record_images(records[key], root, f"--{key} {run[key]}")
    fingerprint = {"model_path": os.path.abspath(run["model"])}
    checkpoints = list_checkpoints(os.path.join(out, "checkpoints"))
    require(not (run["resume"] and run["overwrite"]), "--resume and --overwrite exclude each other: --resume "
                                                      "continues the run in --out, --overwrite replaces it")
    if checkpoints and not run["resume"] and not run["overwrite"]:
        fail(f"--out {out} already holds checkpoints of a run (newest step {checkpoints[0][0]}): "
             "pass --resume to continue it, --overwrite to replace it, or choose another --out")
    # rank 0 alone judges --out under torchrun: a slower rank could see the config.json rank 0 has just written
    held = sorted(os.listdir(out)) if os.path.isdir(out) and int(os.environ.get("RANK", 0)) == 0 else []
    if held and not run["resume"] and not run["overwrite"]:  # a finished run is never replaced silently
        fail(f"--out {out} is not empty (it holds {', '.join(held[:6])}{', ...' if len(held) > 6 else ''}): pass "
             "--overwrite to replace the run there, --resume to continue it, or choose another --out")
    if run["resume"]:  # another run's checkpoints are refused now, not after the model load
        check_resume_settings(os.path.join(out, "checkpoints"), config, forget, retain, fingerprint)
    return argparse.Namespace(run=run, config=config, forget=forget, retain=retain, fingerprint=fingerprint)


JUDGE_HELP = ("keyword:LIST (LIST: vlguard, gcg, safety-mirage; the bare list name works too) or model:DIR[:TEMPLATE] "
              "(a local judge model, asked only about answers the safety-mirage list does not refuse; TEMPLATE: "
              "relevance (default), safety, safety-mirage (the Safety Mirage judge exactly: its prompt, filter and "
              "parse rule), or a text file holding {question} and {answer})")


def _judge_spec(value):
    """--judge parsed and checked (no model loaded): ("keyword", list) or ("model", dir, template, verdict)."""
    from unlearn_engine.api.evaluation import REFUSAL_LISTS, RELEVANCE_TEMPLATE, SAFETY_TEMPLATE, check_template

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
    _check_input_file(template, f"--judge {value}: template")
    with open(template, encoding="utf-8") as f:
        text = f.read()
    check_template(text, f"--judge {value}: template {template}")
    return ("model", path, text, "auto")


def _read_json_flag(path, flag):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        fail(f"{flag} {path}: not valid JSON ({err})")


def _vlguard_split(args):
    """(forget, retain, unused response keys) for `vlguard-split`, every input checked; nothing is written.

    Forget: the unsafe queries of --train (subsets "unsafes" and "safe_unsafes"), each with the harmful
    response --responses maps its image path (as written in --train) or, failing that, its id to. Retain: the
    safe queries ("safe_safes") with their own VLGuard responses. With --image-root each image must exist under
    it and is written joined to it."""
    _check_input_file(args.train, "--train")
    _check_input_file(args.responses, "--responses")
    items = _read_json_flag(args.train, "--train")
    require(isinstance(items, list), f"--train {args.train}: expected a JSON list of VLGuard records, got "
                                     f"{type(items).__name__}")
    responses = _read_json_flag(args.responses, "--responses")
    require(isinstance(responses, dict), f"--responses {args.responses}: expected a JSON object mapping image path "
                                         f"or id to harmful response, got {type(responses).__name__}")
    for key, value in responses.items():
        require(isinstance(value, str) and value.strip() != "",
                f"--responses {args.responses}: key {key!r}: expected a non-empty string response, got {value!r}")
    if args.image_root is not None:
        require(os.path.isdir(args.image_root), f"--image-root {args.image_root}: no such folder")
    flags = {item.get("safe") for item in items if isinstance(item, dict)}
    subsets = ([("unsafes", False)] if False in flags or True not in flags else []) + (  # read: checked
        [("safe_unsafes", False), ("safe_safes", True)] if True in flags else [])
    forget, retain, used = [], [], set()
    for subset, safe in subsets:
        written = read_vlguard(args.train, subset)  # images as written: the keys of --responses
        resolved = read_vlguard(args.train, subset, image_root=args.image_root) if args.image_root else written
        for r, out in zip(written, resolved):
            if safe:
                retain.append(out)
                continue
            key = r.image if r.image in responses else r.group
            require(key in responses, f"--responses {args.responses}: no harmful response for the unsafe query of "
                                      f"--train record id {r.group!r} (subset {subset}): neither its image "
                                      f"{r.image!r} nor its id {r.group!r} is a key")
            used.add(key)
            forget.append(dataclasses.replace(out, response=responses[key], role="forget"))
    require(forget, f"--train {args.train} holds no unsafe query (subsets unsafes, safe_unsafes)")
    return forget, retain, sorted(set(responses) - used)


def _cmd_vlguard_split(args):
    from unlearn_engine.api.evaluation import markdown_table

    forget, retain, unused = args.prepared  # checked and read by _check_args
    paths = {name: os.path.join(args.out, f"{name}.jsonl") for name in ("forget", "retain")}
    os.makedirs(args.out, exist_ok=True)
    with atomic_path(paths["forget"]) as forget_tmp, atomic_path(paths["retain"]) as retain_tmp:
        write_jsonl(forget, forget_tmp)  # both renamed into place only once both are written
        write_jsonl(retain, retain_tmp)
    row = {"forget": len(forget), "retain": len(retain), "unused_responses": len(unused)}
    print(json.dumps({**row, "files": paths}, indent=2) if args.json else markdown_table([row], list(row)))
    return 0


def _check_args(args):
    """Checks a command's flags, files and output folder before any heavy work; returns what it read that the
    command uses (unlearn, vlguard-split), else None."""
    if args.command == "vlguard-split":
        split = _vlguard_split(args)
        check_writable(args.out, "--out")
        return split
    if args.command == "unlearn":
        return _prepare_unlearn(args)
    if args.command == "asr":
        _check_model_flags(args)
        args.harmful, args.safe = resolve_set(args.harmful), args.safe and resolve_set(args.safe)  # a set's name
        _check_input_file(args.harmful, "--harmful")
        if args.safe:
            _check_input_file(args.safe, "--safe")
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
        from unlearn_engine.api.evaluation import ATTACKS

        attacks = args.attacks.split(",")
        unknown = sorted(set(attacks) - set(ATTACKS))
        require(not unknown, f"--attacks: unknown attack(s) {unknown}; attacks are {ATTACKS}")
        check_writable(args.out, "--out")
    elif args.command == "rai":
        _check_model_flags(args)
        require(args.prompt.strip() != "", "--prompt is empty")
        require(args.rank >= 1, f"--rank must be >= 1, got {args.rank}")
        require(math.isfinite(args.strength), f"--strength must be finite, got {args.strength}")
        require(0 < args.top_fraction <= 1, f"--top-fraction must be in (0, 1], got {args.top_fraction}")
        if args.keywords is not None:
            require(any(k.strip() for k in args.keywords.split(",")), "--keywords holds no keyword")
        if args.image:
            _check_image(args.image)
    elif args.command == "demo":
        require(1 <= args.seeds <= 50, f"--seeds must be in [1, 50], got {args.seeds}")
        if args.save_model:
            check_writable(args.save_model, "--save-model")
        else:
            check_writable(args.out, "--out")
    elif args.command == "bench" and args.k is not None:
        try:
            from _pytest.mark.expression import Expression  # what pytest itself parses -k with
        except ImportError:  # no pytest: the bench run below says so itself
            return
        try:
            Expression.compile(args.k)
        except (SyntaxError, ValueError) as err:  # ParseError in pytest < 8.4, SyntaxError since
            fail(f"-k {args.k!r} is not a valid pytest -k expression ({getattr(err, 'msg', err)})")


def _unlearn_settings(args):
    """(run settings, UnlearnConfig): defaults, then --config FILE, then the flags given on the command line."""
    fields = {f.name for f in dataclasses.fields(UnlearnConfig)}
    merged = dict(RUN_KEYS, device=_default_device())
    if args.config:
        data = read_config_file(args.config)
        # a saved config.json names the settings its preset / method filled in: they stay unset here, so that
        # another --preset or --method fills them again (the values the user gave are kept)
        filled = data.pop("filled_in", [])
        if not (isinstance(filled, list) and set(filled) <= set(SETTING_DEFAULTS)):
            raise ValueError(f"--config {args.config}: filled_in must list loss settings among "
                             f"{sorted(SETTING_DEFAULTS)}, got {filled!r}")
        for name in filled:
            data.pop(name, None)
        unknown = sorted(set(data) - fields - set(RUN_KEYS))
        if unknown:
            raise ValueError(f"--config {args.config}: unknown setting(s) {unknown}; known: "
                             f"{sorted(fields | set(RUN_KEYS))}")
        merged.update(data)
    merged.update({k: v for k, v in vars(args).items() if k in fields or k in RUN_KEYS})  # flags given (SUPPRESS)
    for key in ("model", "forget", "out"):
        if not merged.get(key):
            raise ValueError(f"--{key} is required (on the command line or as '{key}' in --config)")
    config = UnlearnConfig(**{k: v for k, v in merged.items() if k in fields}).validate()
    return {k: merged[k] for k in RUN_KEYS}, config


def _cmd_unlearn(args):
    prep = args.prepared  # checked and read by _check_args, before any model is loaded
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return _unlearn(args, prep)
    import torch.distributed as dist  # launched by torchrun: data parallel

    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        prep.run["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        return _unlearn(args, prep)
    finally:
        if started_here:
            # every rank waits for rank 0's writes, then leaves together: a rank that exits while the others
            # still hold the group can abort in the backend's threads
            dist.barrier()
            dist.destroy_process_group()


def _unlearn(args, prep):
    from unlearn_engine.api.nll import mean_nll
    from unlearn_engine.api.unlearner import Unlearner

    run, config, forget, retain = prep.run, prep.config, prep.forget, prep.retain
    model_path, out, root = run["model"], run["out"], run["image_root"]
    model, processor, tokenizer, image_processor = load_promptable(model_path, dtype=run["dtype"],
                                                                   device=run["device"])
    load = None
    if any(r.image for r in forget + retain):
        image_tokens(model)  # a model without a vision tower cannot take image records: say so now
        load = image_loader(model, image_processor, root)
    nll = {"max_length": config.max_length, "image_loader": load}
    # computed before anything is written: a record set the max_length cut empties is refused with --out untouched
    before = {"forget_nll": mean_nll(model, tokenizer, forget, **nll)}
    if retain:
        before["retain_nll"] = mean_nll(model, tokenizer, retain, **nll)
    if int(os.environ.get("RANK", 0)) == 0:
        if run["overwrite"]:  # every check passed: the previous run's outputs go now, not before
            _remove_run_outputs(out)
        # the resolved settings beside the outputs: `--config OUT/config.json --resume` continues the run
        saved = {k: v for k, v in run.items() if k != "overwrite"}  # a resume from it must not replace the run
        write_text(os.path.join(out, "config.json"), json.dumps({**saved, **dataclasses.asdict(config),
                                                                 "filled_in": config.filled_in()}, indent=2))
    import torch.distributed as dist

    if run["overwrite"] and dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank reads --out before rank 0 has cleared it
    unlearner = Unlearner(model, tokenizer, config, out_dir=out, progress=not args.no_progress,
                          fingerprint=prep.fingerprint, image_loader=load)
    unlearner.fit(forget, retain, resume=run["resume"])
    if unlearner.fsdp:  # gather the shards (every rank), then rank 0 rebuilds a plain model from them
        state = unlearner.full_state_dict()
        if unlearner.rank == 0:
            model, _ = load_vlm(model_path, dtype=run["dtype"], device=run["device"], load_processor=False)
            model.load_state_dict(state)
    if unlearner.rank != 0:
        return 0
    after = {"forget_nll": mean_nll(model, tokenizer, forget, **nll)}
    if retain:
        after["retain_nll"] = mean_nll(model, tokenizer, retain, **nll)
    save = config.save or ("both" if config.scope == "lora" else "merged")
    written = {}
    if save in ("merged", "both"):
        written["model"] = os.path.join(out, "model")
        save_vlm(model, written["model"], processor=processor)  # the whole processor: image attacks need it
    if save in ("adapter", "both"):  # PEFT's format, onto the original checkpoint
        written["adapter"] = os.path.join(out, "adapter")
        save_lora_adapter(written["adapter"], unlearner.adapter_state, config.lora_rank,
                          base_model=os.path.abspath(model_path))
    summary = {"config": dataclasses.asdict(config), "before": before, "after": after, "data": unlearner.data_report,
               "chat_template": chat_template_info(tokenizer), "model": written.get("model"),
               "adapter": written.get("adapter"), "divergence": unlearner.divergence}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_metric_table(before, after))
        if unlearner.divergence:
            d = unlearner.divergence
            print(f"warning: diverging: retain NLL {d['retain_nll']:.6g} at step {d['step']}, over "
                  f"{d['factor']:g} x its step-1 value {d['first_retain_nll']:.6g}")
        for kind, report in unlearner.data_report.items():
            if report["skipped"]:
                print(f"{kind}: {len(report['skipped'])} record(s) with no labelled token skipped "
                      f"(indices {report['skipped'][:20]})")
        for what, path in written.items():
            print(f"{what} written to {path}")
    return 0


def _metric_table(before, after):
    """metric / before / after, columns two spaces apart and as wide as their widest cell: any float fits."""
    rows = [("metric", "before", "after")] + [(k, f"{before[k]:.6g}", f"{after[k]:.6g}") for k in before]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)


def _remove_run_outputs(out):
    """Removes what a previous unlearn run wrote in `out` (RUN_OUTPUTS); other files stay."""
    for name in RUN_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


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
    import datetime
    from importlib import metadata

    from unlearn_engine.api.loading import INDEX_FILE

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


def _cmd_asr(args):
    from unlearn_engine.api.evaluation import (
        ModelJudge,
        RefusalJudge,
        bar_chart,
        evaluate,
        markdown_table,
        write_json,
    )

    harmful = _read_prompt_file(args.harmful, args.limit, harmful=True, subset=args.subset, variants=args.variants)
    safe = _read_prompt_file(args.safe, args.limit, harmful=False, subset=args.safe_subset,
                             variants=args.variants) if args.safe else []
    for flag, path, records in (("--harmful", args.harmful, harmful), ("--safe", args.safe, safe)):
        _check_record_images(records, args.image_root, f"{flag} {path}")
    spec = _judge_spec(args.judge)
    if spec[0] == "keyword":
        judge = RefusalJudge(spec[1])
    else:
        judge = ModelJudge.from_pretrained(spec[1], spec[2], verdict=spec[3], dtype=args.dtype, device=args.device,
                                           batch_size=args.batch_size)
    provenance = _provenance(args, judge)
    model, tokenizer, image_processor = _load_model(args)
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


def _cmd_demo(args):
    from unlearn_engine.api.demo.mirage import World, run_mirage, save_demo_model

    if args.save_model:
        files = save_demo_model(args.save_model, World(seed=args.seed), progress=not args.no_progress)
        print(json.dumps(files, indent=2) if args.json else
              f"model and tokenizer in {files['model']}; try:\n  unlearn-engine unlearn --model {files['model']} "
              f"--forget {files['forget']} --retain {files['retain']} --out runs/demo --steps 20 --lr 1e-3 "
              f"--dtype float32\n  unlearn-engine asr --model runs/demo/model --harmful {files['forget']} "
              "--out asr_demo --dtype float32")
        return 0
    report = run_mirage(args.out, World(seed=args.seed), seeds=args.seeds, progress=not args.no_progress,
                        log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(report["results"], indent=2))
    return 0


def _cmd_rai(args):
    from unlearn_engine.api.evaluation.generation import generate
    from unlearn_engine.api.rai import RiskAwareness

    model, tokenizer, image_processor = _load_model(args)
    images = [image_input(model, args.image, image_processor)] if args.image else None
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()] if args.keywords else None
    rai = RiskAwareness(model, keywords, tokenizer=tokenizer, rank=args.rank, top_fraction=args.top_fraction,
                        strength=args.strength)
    plain = generate(model, tokenizer, [args.prompt], images=images, progress=False)[0]
    with rai:
        guarded = generate(model, tokenizer, [args.prompt], images=images, progress=False)[0]
    out = {"without_rai": plain, "with_rai": guarded,
           "visual_token_scores": [r.tolist() for r in rai.records]}
    print(json.dumps(out, indent=2) if args.json else f"without RAI: {plain}\nwith RAI:    {guarded}")
    return 0


def _cmd_bench(args):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # unlearn_engine/api may be a link
    bench = os.path.join(root, "bench")
    if not os.path.isdir(bench):
        raise ValueError("bench/ is not next to the package (run from a source checkout)")
    cmd = [sys.executable, "-m", "pytest", bench, "-q", "-s", "--benchmark-columns=min,mean,rounds"]
    if args.k:
        cmd += ["-k", args.k]
    return subprocess.call(cmd, cwd=root)


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _config_flags(parser):
    """One flag per UnlearnConfig field, with the dataclass's type, default and help. Defaults are shown in the
    help but not set on the namespace (SUPPRESS), so --config values are overridden only by flags given."""
    group = parser.add_argument_group("unlearning settings (UnlearnConfig; also as keys in --config)")
    for f in dataclasses.fields(UnlearnConfig):
        choices = choices_of(f)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=f.type, choices=choices,
                           default=argparse.SUPPRESS, metavar=f.type.__name__.upper() if not choices else None,
                           help=f"{f.metadata['help']} (default: {f.default})")


def build_parser():
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--no-progress", action="store_true", help="no progress bars")

    def model_flags(required):
        parent = argparse.ArgumentParser(add_help=False)
        default = None if required else argparse.SUPPRESS
        parent.add_argument("--model", required=required, default=default,
                            help="checkpoint folder (config.json + safetensors + tokenizer files)")
        parent.add_argument("--dtype", default="bfloat16" if required else argparse.SUPPRESS,
                            help="weights dtype: bfloat16, float16 or float32 (default: bfloat16)")
        parent.add_argument("--device", default=_default_device() if required else argparse.SUPPRESS,
                            help=f"torch device (default: {_default_device()})")
        if required:  # asr, rai (unlearn loads in _unlearn)
            parent.add_argument("--skip-finite-check", action="store_true",
                                help="load without scanning the weights for NaN/inf (a model with them is refused)")
        return parent

    parser = argparse.ArgumentParser(prog="unlearn-engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", parents=[output], help="how the native extension was built, and where it runs")
    info.set_defaults(func=_cmd_info)

    un = sub.add_parser("unlearn", parents=[model_flags(False), output],
                        help="unlearn a safetensors model on forget/retain JSONL sets")
    un.add_argument("--config", help="JSON or TOML file of settings (any flag below, and model/forget/retain/out); "
                                     "flags given here win")
    un.add_argument("--forget", default=argparse.SUPPRESS, help="JSONL of {prompt, response} to forget")
    un.add_argument("--retain", default=argparse.SUPPRESS, help="JSONL of {prompt, response} to keep")
    un.add_argument("--out", default=argparse.SUPPRESS,
                    help="output folder: config.json, checkpoints/, metrics.jsonl, model/")
    un.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                    help="continue from the newest intact checkpoint in --out (refused, exit 2, when its run "
                         "fingerprint differs: every setting but --steps, --checkpoint-every, --keep-checkpoints, "
                         "the data, the model)")
    un.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                    help="replace the run in a non-empty --out (its config.json, data.json, metrics.jsonl, model/, "
                         "adapter/, checkpoints/; other files stay), removed once every check has passed; without "
                         "it a non-empty --out is refused (exit 2)")
    un.add_argument("--image-root", default=argparse.SUPPRESS,
                    help="folder the records' relative 'image' paths are read from")
    _config_flags(un)
    un.set_defaults(func=_cmd_unlearn)

    asr = sub.add_parser("asr", parents=[model_flags(True), output],
                         help="attack success rate and over-refusal of a model on prompt files")
    asr.add_argument("--harmful", required=True,
                     help="a shipped set (advbench, figstep, figstep-tiny, xstest: its unsafe rows) or a file: "
                          "AdvBench / FigStep CSV, XSTest CSV (its unsafe rows), JSONL of harmful prompts, or VLGuard "
                          "JSON (.json: a list of {id, image, safe, instr-resp}; its --subset)")
    asr.add_argument("--safe", help="a shipped set (xstest: its safe rows) or a file: XSTest CSV (its safe rows), "
                                    "JSONL of benign prompts, or VLGuard JSON (its --safe-subset)")
    asr.add_argument("--subset", choices=VLGUARD_SUBSETS, default="unsafes",
                     help="the VLGuard subset of a .json --harmful (default: unsafes)")
    asr.add_argument("--safe-subset", choices=VLGUARD_SUBSETS, default="safe_safes",
                     help="the VLGuard subset of a .json --safe (default: safe_safes)")
    asr.add_argument("--variants", action="store_true",
                     help="the .json files are Safety Mirage one-word sets: K consecutive records per id, reported "
                          "per variant and per query (--limit then counts queries)")
    asr.add_argument("--image-root", help="folder the records' relative image paths are read from (records with "
                                          "an image are shown it with their prompt)")
    asr.add_argument("--limit", type=int, default=0, help="use the first N prompts of each file (0: all)")
    asr.add_argument("--judge", default="vlguard", help=JUDGE_HELP + " (default: vlguard)")
    asr.add_argument("--attacks", default="text,one_word",
                     help="comma-separated: text, one_word, figstep (figstep needs a saved image processor)")
    asr.add_argument("--max-new-tokens", type=int, default=64,
                     help="greedy tokens per answer, at most the model's context (max_position_embeddings; more is "
                          "refused) (default: 64)")
    asr.add_argument("--batch-size", type=int, default=16)
    asr.add_argument("--out", default="asr_out",
                     help="folder for asr.json, asr.md, asr.png, responses.jsonl (responses.partial.jsonl while "
                          "generating)")
    asr.set_defaults(func=_cmd_asr)

    rai = sub.add_parser("rai", parents=[model_flags(True), output],
                         help="answer a prompt (+ image) with and without Risk Awareness Injection")
    rai.add_argument("--prompt", required=True)
    rai.add_argument("--image", help="image file shown with the prompt")
    rai.add_argument("--keywords", help="comma-separated unsafe keywords (default: the built-in list)")
    rai.add_argument("--rank", type=int, default=8)
    rai.add_argument("--top-fraction", type=float, default=0.1)
    rai.add_argument("--strength", type=float, default=2.0)
    rai.set_defaults(func=_cmd_rai)

    split = sub.add_parser("vlguard-split", parents=[output],
                           help="VLGuard train.json to forget / retain JSONL, as the Safety Mirage pipeline does")
    split.add_argument("--train", required=True, help="VLGuard train.json")
    split.add_argument("--responses", required=True,
                       help="JSON object: image path (as written in --train) or id -> the harmful response paired "
                            "with that record's unsafe query (the forget target)")
    split.add_argument("--out", required=True, help="folder for forget.jsonl (unsafes + safe_unsafes, with the "
                                                    "given responses) and retain.jsonl (safe_safes)")
    split.add_argument("--image-root", help="folder the images of --train are read from (each must exist; "
                                            "written joined to it)")
    split.set_defaults(func=_cmd_vlguard_split)

    demo = sub.add_parser("demo", parents=[output],
                          help="the safety-mirage world, end to end (the embedded default job)")
    demo.add_argument("--out", default="demo_out", help="folder for mirage.json, mirage.md, mirage.png")
    demo.add_argument("--seed", type=int, default=0, help="first seed")
    demo.add_argument("--seeds", type=int, default=5, help="how many seeds (each cell: mean and 95%% interval)")
    demo.add_argument("--save-model", metavar="DIR",
                      help="only save the world's small trained model + tokenizer (and forget/retain JSONL) to DIR, "
                           "to try every command on")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="run the kernel benchmarks (bench/, writes bench/results/)")
    bench.add_argument("-k", help="pytest -k expression selecting benchmarks")
    bench.set_defaults(func=_cmd_bench)
    return parser


# Errors a user causes (a bad flag, file or folder, a broken checkpoint, a full disk): exit 2 with one line.
USER_ERRORS = (ValueError, OSError)


def _one_line_warnings(command):
    """warnings.showwarning for the command line: one line on stderr, "unlearn-engine CMD: warning: ...";
    no source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"unlearn-engine {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)
    return show


def main(argv=None):
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(args.command)
        return _run(args)


def _run(args):
    try:
        args.prepared = _check_args(args)  # arguments, files and the output folder, before any model is loaded
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"unlearn-engine {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 -- one line for everything, a traceback only under --debug
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, USER_ERRORS):
            print(f"unlearn-engine {args.command}: error: {message}", file=sys.stderr)
            return 2
        print(f"unlearn-engine {args.command}: internal error: {type(err).__name__}: {message} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
