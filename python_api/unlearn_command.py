"""The `unlearn` command: its settings (defaults, then --config, then the flags given), every input checked
before a model is loaded, then the run (data parallel under torchrun) and what it writes in --out."""
import argparse
import dataclasses
import json
import os
import shutil

import torch

from unlearn_engine.api.adapter import save_lora_adapter
from unlearn_engine.api.chat_template import chat_template_info
from unlearn_engine.api.config import UnlearnConfig, read_config_file
from unlearn_engine.api.data import check_input_file, check_record_images, image_tokens, read_jsonl
from unlearn_engine.api.images import image_loader
from unlearn_engine.api.loading import check_model, default_device, empty_model, load_promptable, load_vlm, save_vlm
from unlearn_engine.api.methods import SETTING_DEFAULTS, get_method
from unlearn_engine.atomic import check_writable, write_text
from unlearn_engine.checks import fail, require

# Settings of an unlearn run that are not UnlearnConfig fields (they may come from --config too).
RUN_KEYS = {"model": None, "forget": None, "retain": None, "out": None, "dtype": "bfloat16", "device": None,
            "resume": False, "overwrite": False, "image_root": None}
# What an unlearn run writes in --out: --overwrite removes these (and nothing else) before the new run writes.
RUN_OUTPUTS = ("config.json", "data.json", "metrics.jsonl", "model", "adapter", "checkpoints")


def unlearn_settings(args):
    """(run settings, UnlearnConfig): defaults, then --config FILE, then the flags given on the command line."""
    fields = {f.name for f in dataclasses.fields(UnlearnConfig)}
    merged = dict(RUN_KEYS, device=default_device())
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


def prepare_unlearn(args) -> argparse.Namespace:
    """Everything an unlearn run can be refused for, checked before any model is loaded or file written (loading
    a 7B takes minutes); returns what was read (run settings, config, records, fingerprint) for the run itself."""
    from unlearn_engine.api.checkpoint import list_checkpoints
    from unlearn_engine.api.fingerprint import check_resume_settings

    run, config = unlearn_settings(args)
    records = {}
    for key in ("forget", "retain"):
        if run[key]:
            check_input_file(run[key], f"--{key}")
        records[key] = read_jsonl(run[key], role=key) if run[key] else []
    check_model(run["model"], run["dtype"], run["device"])
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
        check_record_images(records[key], root, f"--{key} {run[key]}")
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


def run_unlearn(args):
    prep = args.prepared  # checked and read by prepare_unlearn, before any model is loaded
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
