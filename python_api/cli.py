"""The `unlearn-engine` command line."""
import argparse
import json
import os
import sys

import torch


def _cmd_info(args):
    import unlearn_engine as ue

    info = ue.build_info()
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
    import unlearn_engine as ue

    model, processor = ue.load_vlm(args.model, dtype=args.dtype, device=args.device)
    if processor is None:
        raise ValueError(f"{args.model} has no tokenizer files: prompts cannot be encoded")
    return model, getattr(processor, "tokenizer", processor), getattr(processor, "image_processor", None)


def _cmd_unlearn(args):
    import dataclasses

    import unlearn_engine as ue
    from unlearn_engine.api.unlearner import UnlearnConfig, Unlearner, mean_nll

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: data parallel
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    forget = ue.read_jsonl(args.forget, role="forget")
    retain = ue.read_jsonl(args.retain, role="retain") if args.retain else []
    model, tokenizer, _ = _load_model(args)
    config = UnlearnConfig(method=args.method, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           beta=args.beta, scope=args.scope, mask_fraction=args.mask_fraction, seed=args.seed,
                           checkpoint_every=args.checkpoint_every, rmu_layer=args.rmu_layer, parallel=args.parallel)
    before = {"forget_nll": mean_nll(model, tokenizer, forget)}
    if retain:
        before["retain_nll"] = mean_nll(model, tokenizer, retain)
    unlearner = Unlearner(model, tokenizer, config, out_dir=args.out, progress=not args.no_progress)
    unlearner.fit(forget, retain, resume=args.resume)
    if unlearner.fsdp:  # gather the shards (every rank), then rank 0 rebuilds a plain model from them
        state = unlearner.full_state_dict()
        if unlearner.rank == 0:
            model, _ = ue.load_vlm(args.model, dtype=args.dtype, device=args.device, load_processor=False)
            model.load_state_dict(state)
    if unlearner.rank != 0:
        return 0
    after = {"forget_nll": mean_nll(model, tokenizer, forget)}
    if retain:
        after["retain_nll"] = mean_nll(model, tokenizer, retain)
    ue.save_vlm(model, os.path.join(args.out, "model"), processor=tokenizer)
    summary = {"config": dataclasses.asdict(config), "before": before, "after": after,
               "model": os.path.join(args.out, "model")}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'metric':<12}{'before':>10}{'after':>10}")
        for key in before:
            print(f"{key:<12}{before[key]:>10.4f}{after[key]:>10.4f}")
        print(f"model written to {summary['model']}")
    return 0


def _read_prompt_file(path, limit):
    import csv

    import unlearn_engine as ue

    if path.endswith(".jsonl"):
        records = ue.read_jsonl(path)
    else:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f))
        if "goal" in header:
            records = ue.read_advbench(path)
        elif "label" in header and "prompt" in header:
            records = ue.read_xstest(path)
        elif "question" in header:
            records = ue.read_figstep(path)
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
    with open(os.path.join(args.out, "asr.md"), "w") as f:
        f.write(table + "\n")
    bar_chart([row], "model", [k for k in row if k != "model"], os.path.join(args.out, "asr.png"), title="ASR")
    print(json.dumps(row, indent=2) if args.json else table)
    return 0


def _cmd_demo(args):
    from unlearn_engine.api.mirage import World, run_mirage

    report = run_mirage(args.out, World(seed=args.seed), progress=not args.no_progress,
                        log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(report["results"], indent=2))
    return 0


def _cmd_rai(args):
    import unlearn_engine as ue
    from unlearn_engine.api.evaluation import generate
    from unlearn_engine.api.toy import image_tokens

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
    rai = ue.RiskAwareness(model, keywords, tokenizer=tokenizer, rank=args.rank, top_fraction=args.top_fraction,
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


def build_parser():
    parser = argparse.ArgumentParser(prog="unlearn-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how the native extension was built, and where it runs")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_cmd_info)

    un = sub.add_parser("unlearn", help="unlearn a safetensors model on forget/retain JSONL sets")
    un.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    un.add_argument("--forget", required=True, help="JSONL of {prompt, response} to forget")
    un.add_argument("--retain", help="JSONL of {prompt, response} to keep")
    un.add_argument("--method", default="npo", choices=["ga", "gd", "npo", "kl", "rmu", "textual"])
    un.add_argument("--out", required=True, help="output folder: checkpoints/, metrics.jsonl, model/")
    un.add_argument("--steps", type=int, default=100)
    un.add_argument("--lr", type=float, default=1e-5)
    un.add_argument("--batch-size", type=int, default=4)
    un.add_argument("--beta", type=float, default=0.1, help="NPO temperature")
    un.add_argument("--scope", default="full", choices=["full", "lora", "mask"])
    un.add_argument("--mask-fraction", type=float, default=0.05)
    un.add_argument("--rmu-layer", type=int, default=1)
    un.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                    help="under torchrun: average gradients (ddp) or shard with FSDP2 (fsdp)")
    un.add_argument("--seed", type=int, default=0)
    un.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    un.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    un.add_argument("--dtype", default="bfloat16")
    un.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    un.add_argument("--no-progress", action="store_true")
    un.add_argument("--json", action="store_true", help="print JSON instead of a table")
    un.set_defaults(func=_cmd_unlearn)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    asr = sub.add_parser("asr", help="attack success rate and over-refusal of a model on prompt files")
    asr.add_argument("--model", required=True)
    asr.add_argument("--harmful", required=True, help="AdvBench / FigStep CSV or JSONL of harmful prompts")
    asr.add_argument("--safe", help="XSTest CSV (safe rows are used) or JSONL of benign prompts")
    asr.add_argument("--limit", type=int, default=0, help="use the first N prompts of each file (0: all)")
    asr.add_argument("--judge", default="vlguard", choices=["vlguard", "gcg"], help="refusal keyword list")
    asr.add_argument("--attacks", default="text,one_word",
                     help="comma-separated: text, one_word, figstep (figstep needs a saved image processor)")
    asr.add_argument("--max-new-tokens", type=int, default=64)
    asr.add_argument("--batch-size", type=int, default=16)
    asr.add_argument("--out", default="asr_out", help="folder for asr.json, asr.md, asr.png")
    asr.add_argument("--dtype", default="bfloat16")
    asr.add_argument("--device", default=device)
    asr.add_argument("--no-progress", action="store_true")
    asr.add_argument("--json", action="store_true")
    asr.set_defaults(func=_cmd_asr)

    rai = sub.add_parser("rai", help="answer a prompt (+ image) with and without Risk Awareness Injection")
    rai.add_argument("--model", required=True)
    rai.add_argument("--prompt", required=True)
    rai.add_argument("--image", help="image file shown with the prompt")
    rai.add_argument("--keywords", help="comma-separated unsafe keywords (default: the built-in list)")
    rai.add_argument("--rank", type=int, default=8)
    rai.add_argument("--top-fraction", type=float, default=0.1)
    rai.add_argument("--strength", type=float, default=2.0)
    rai.add_argument("--dtype", default="bfloat16")
    rai.add_argument("--device", default=device)
    rai.add_argument("--json", action="store_true")
    rai.set_defaults(func=_cmd_rai)

    demo = sub.add_parser("demo", help="the safety-mirage world, end to end (the embedded default job)")
    demo.add_argument("--out", default="demo_out", help="folder for mirage.json, mirage.md, mirage.png")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--json", action="store_true")
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
