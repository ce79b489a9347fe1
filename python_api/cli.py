"""The `unlearn-engine` command line: unlearn, asr, rai, demo, bench, info.

The `unlearn` flags are generated from UnlearnConfig (config.py); --config FILE runs from a JSON/TOML file.
"""
import argparse
import dataclasses
import json
import os
import sys

import torch

from unlearn_engine._library import build_info
from unlearn_engine.api.config import UnlearnConfig, choices_of, read_config_file
from unlearn_engine.api.data import image_tokens, read_advbench, read_figstep, read_jsonl, read_xstest
from unlearn_engine.api.loading import load_vlm, save_vlm
from unlearn_engine.api.methods import get_method
from unlearn_engine.atomic import write_text

# Settings of an unlearn run that are not UnlearnConfig fields (they may come from --config too).
RUN_KEYS = {"model": None, "forget": None, "retain": None, "out": None, "dtype": "bfloat16", "device": None,
            "resume": False, "image_root": None}


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
    model, processor = load_vlm(args.model, dtype=args.dtype, device=args.device)
    if processor is None:
        raise ValueError(f"{args.model} has no tokenizer files: prompts cannot be encoded")
    return model, getattr(processor, "tokenizer", processor), getattr(processor, "image_processor", None)


def _unlearn_settings(args):
    """(run settings, UnlearnConfig): defaults, then --config FILE, then the flags given on the command line."""
    fields = {f.name for f in dataclasses.fields(UnlearnConfig)}
    merged = dict(RUN_KEYS, device=_default_device())
    if args.config:
        data = read_config_file(args.config)
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
    run, config = _unlearn_settings(args)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return _unlearn(args, run, config)
    import torch.distributed as dist  # launched by torchrun: data parallel

    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        run["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        return _unlearn(args, run, config)
    finally:
        if started_here:
            # every rank waits for rank 0's writes, then leaves together: a rank that exits while the others
            # still hold the group can abort in the backend's threads
            dist.barrier()
            dist.destroy_process_group()


def _unlearn(args, run, config):
    from unlearn_engine.api.checkpoint import list_checkpoints
    from unlearn_engine.api.unlearner import Unlearner, check_resume_settings, mean_nll
    from unlearn_engine.checks import fail, require

    # Everything that can be checked without the model is checked before it is loaded (minutes for a 7B).
    forget = read_jsonl(run["forget"], role="forget")
    retain = read_jsonl(run["retain"], role="retain") if run["retain"] else []
    require(not get_method(config.method).needs_retain or bool(retain),
            f"method {config.method!r} needs retain records (--retain)")
    model_path = run["model"]
    require(os.path.isdir(model_path), f"--model {model_path} is not a directory")
    require(os.path.isfile(os.path.join(model_path, "config.json")), f"--model {model_path} has no config.json")
    root = run["image_root"]
    require(root is None or os.path.isdir(root), f"--image-root {root} is not a directory")
    for r in forget + list(retain):
        if r.image and not os.path.isfile(os.path.join(root or "", r.image)):
            fail(f"record {r.prompt[:40]!r}: image {os.path.join(root or '', r.image)} not found"
                 + ("" if root else " (relative paths are resolved against --image-root)"))
    out = run["out"]
    require(not os.path.exists(out) or os.path.isdir(out), f"--out {out} exists and is not a directory")
    parent = out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    require(os.access(parent, os.W_OK), f"--out {out}: {parent} is not writable")
    fingerprint = {"model_path": os.path.abspath(model_path)}
    checkpoints = list_checkpoints(os.path.join(out, "checkpoints"))
    if checkpoints and not run["resume"]:
        fail(f"--out {out} already holds checkpoints of a run (newest step {checkpoints[0][0]}): "
             "pass --resume to continue it, or choose another --out")
    if run["resume"]:  # another run's checkpoints are refused now, not after the model load
        check_resume_settings(os.path.join(out, "checkpoints"), config, forget, retain, fingerprint)

    model, processor = load_vlm(model_path, dtype=run["dtype"], device=run["device"])
    if processor is None:
        raise ValueError(f"{model_path} has no tokenizer files: prompts cannot be encoded")
    tokenizer = getattr(processor, "tokenizer", processor)
    image_loader = None
    if any(r.image for r in forget + list(retain)):
        image_tokens(model)  # a model without a vision tower cannot take image records: say so now
        image_processor = getattr(processor, "image_processor", None)
        size = model.config.vision_config.image_size

        def image_loader(path):
            import numpy as np
            from PIL import Image

            image = Image.open(os.path.join(root or "", path)).convert("RGB")
            if image_processor is not None:
                return image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
            pixels = np.asarray(image.resize((size, size)), dtype=np.float32)
            return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1
    if int(os.environ.get("RANK", 0)) == 0:
        # the resolved settings beside the outputs: `--config OUT/config.json --resume` continues the run
        write_text(os.path.join(out, "config.json"), json.dumps({**run, **dataclasses.asdict(config)}, indent=2))
    nll = {"max_length": config.max_length, "image_loader": image_loader}
    before = {"forget_nll": mean_nll(model, tokenizer, forget, **nll)}
    if retain:
        before["retain_nll"] = mean_nll(model, tokenizer, retain, **nll)
    unlearner = Unlearner(model, tokenizer, config, out_dir=out, progress=not args.no_progress,
                          fingerprint=fingerprint, image_loader=image_loader)
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
    save_vlm(model, os.path.join(out, "model"), processor=tokenizer)
    summary = {"config": dataclasses.asdict(config), "before": before, "after": after, "data": unlearner.data_report,
               "model": os.path.join(out, "model")}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'metric':<12}{'before':>10}{'after':>10}")
        for key in before:
            print(f"{key:<12}{before[key]:>10.4f}{after[key]:>10.4f}")
        for kind, report in unlearner.data_report.items():
            if report["skipped"]:
                print(f"{kind}: {len(report['skipped'])} record(s) with no labelled token skipped "
                      f"(indices {report['skipped'][:20]})")
        print(f"model written to {summary['model']}")
    return 0


def _read_prompt_file(path, limit):
    import csv

    if path.endswith(".jsonl"):
        records = read_jsonl(path)
    else:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f))
        if "goal" in header:
            records = read_advbench(path)
        elif "label" in header and "prompt" in header:
            records = read_xstest(path)
        elif "question" in header:
            records = read_figstep(path)
        else:
            raise ValueError(f"{path}: unknown CSV columns {header} (expected AdvBench, XSTest or FigStep)")
    return records[:limit] if limit else records


def _cmd_asr(args):
    from unlearn_engine.api.evaluation import RefusalJudge, bar_chart, evaluate, markdown_table, write_json

    harmful = _read_prompt_file(args.harmful, args.limit)
    safe = _read_prompt_file(args.safe, args.limit) if args.safe else []
    model, tokenizer, image_processor = _load_model(args)
    result = evaluate(model, tokenizer, harmful, safe, judge=RefusalJudge(args.judge), attacks=args.attacks.split(","),
                      image_processor=image_processor, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, progress=not args.no_progress)
    row = {"model": os.path.basename(os.path.normpath(args.model))}
    row.update({f"asr_{a}": r["rate"] for a, r in result["asr"].items()})
    if "over_refusal" in result:
        row["over_refusal"] = result["over_refusal"]["rate"]
    os.makedirs(args.out, exist_ok=True)
    write_json(result, os.path.join(args.out, "asr.json"))
    table = markdown_table([row], list(row))
    write_text(os.path.join(args.out, "asr.md"), table + "\n")
    bar_chart([row], "model", [k for k in row if k != "model"], os.path.join(args.out, "asr.png"), title="ASR")
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
    report = run_mirage(args.out, World(seed=args.seed), progress=not args.no_progress,
                        log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(report["results"], indent=2))
    return 0


def _cmd_rai(args):
    from unlearn_engine.api.evaluation import generate
    from unlearn_engine.api.rai import RiskAwareness

    model, tokenizer, _ = _load_model(args)
    if args.image:
        from PIL import Image

        size = model.config.vision_config.image_size
        image = Image.open(args.image).convert("RGB").resize((size, size))
        import numpy as np

        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1
    else:
        pixels = None
    prompt = ("<image> " * image_tokens(model) if pixels is not None else "") + args.prompt
    keywords = args.keywords.split(",") if args.keywords else None
    rai = RiskAwareness(model, keywords, tokenizer=tokenizer, rank=args.rank, top_fraction=args.top_fraction,
                           strength=args.strength)
    plain = generate(model, tokenizer, [prompt], pixel_values=pixels, progress=False)[0]
    with rai:
        guarded = generate(model, tokenizer, [prompt], pixel_values=pixels, progress=False)[0]
    out = {"without_rai": plain, "with_rai": guarded,
           "visual_token_scores": [r.tolist() for r in rai.records]}
    print(json.dumps(out, indent=2) if args.json else f"without RAI: {plain}\nwith RAI:    {guarded}")
    return 0


def _cmd_bench(args):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
        return parent

    parser = argparse.ArgumentParser(prog="unlearn-engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    un.add_argument("--image-root", default=argparse.SUPPRESS,
                    help="folder the records' relative 'image' paths are read from")
    _config_flags(un)
    un.set_defaults(func=_cmd_unlearn)

    asr = sub.add_parser("asr", parents=[model_flags(True), output],
                         help="attack success rate and over-refusal of a model on prompt files")
    asr.add_argument("--harmful", required=True, help="AdvBench / FigStep CSV or JSONL of harmful prompts")
    asr.add_argument("--safe", help="XSTest CSV (safe rows are used) or JSONL of benign prompts")
    asr.add_argument("--limit", type=int, default=0, help="use the first N prompts of each file (0: all)")
    asr.add_argument("--judge", default="vlguard", choices=["vlguard", "gcg"], help="refusal keyword list")
    asr.add_argument("--attacks", default="text,one_word",
                     help="comma-separated: text, one_word, figstep (figstep needs a saved image processor)")
    asr.add_argument("--max-new-tokens", type=int, default=64)
    asr.add_argument("--batch-size", type=int, default=16)
    asr.add_argument("--out", default="asr_out", help="folder for asr.json, asr.md, asr.png")
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

    demo = sub.add_parser("demo", parents=[output],
                          help="the safety-mirage world, end to end (the embedded default job)")
    demo.add_argument("--out", default="demo_out", help="folder for mirage.json, mirage.md, mirage.png")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--save-model", metavar="DIR",
                      help="only save the world's small trained model + tokenizer (and forget/retain JSONL) to DIR, "
                           "to try every command on")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="run the kernel benchmarks (bench/, writes bench/results/)")
    bench.add_argument("-k", help="pytest -k expression selecting benchmarks")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: say what, exit 2 like argparse
        print(f"unlearn-engine {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
