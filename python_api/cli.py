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
    model, tokenizer = ue.load_vlm(args.model, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files: the data cannot be encoded")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor carries its tokenizer
    config = UnlearnConfig(method=args.method, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           beta=args.beta, scope=args.scope, mask_fraction=args.mask_fraction, seed=args.seed,
                           checkpoint_every=args.checkpoint_every, rmu_layer=args.rmu_layer)
    before = {"forget_nll": mean_nll(model, tokenizer, forget)}
    if retain:
        before["retain_nll"] = mean_nll(model, tokenizer, retain)
    Unlearner(model, tokenizer, config, out_dir=args.out, progress=not args.no_progress).fit(
        forget, retain, resume=args.resume)
    after = {"forget_nll": mean_nll(model, tokenizer, forget)}
    if retain:
        after["retain_nll"] = mean_nll(model, tokenizer, retain)
    if int(os.environ.get("RANK", 0)) == 0:
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
    un.add_argument("--seed", type=int, default=0)
    un.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    un.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    un.add_argument("--dtype", default="bfloat16")
    un.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    un.add_argument("--no-progress", action="store_true")
    un.add_argument("--json", action="store_true", help="print JSON instead of a table")
    un.set_defaults(func=_cmd_unlearn)
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
