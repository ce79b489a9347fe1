"""The `unlearn-engine` command line: unlearn, asr, rai, vlguard-split, demo, bench, info.

The `unlearn` flags are generated from UnlearnConfig (config.py); --config FILE runs from a JSON/TOML file.
"""
import argparse
import dataclasses
import json
import os
import sys
import warnings

import torch

from unlearn_engine._library import build_info
from unlearn_engine.api.config import UnlearnConfig, choices_of
from unlearn_engine.api.evaluation.asr_command import JUDGE_HELP, check_asr_args, run_asr
from unlearn_engine.api.json_records import VLGUARD_SUBSETS
from unlearn_engine.api.loading import default_device
from unlearn_engine.api.rai import check_rai_args, run_rai
from unlearn_engine.api.unlearn_command import prepare_unlearn, run_unlearn
from unlearn_engine.api.vlguard_split import prepare_vlguard_split, run_vlguard_split
from unlearn_engine.checks import fail


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


def _check_demo(args):
    from unlearn_engine.api.demo.command import check_demo_args  # the demo package: imported only to run it

    check_demo_args(args)


def _cmd_demo(args):
    from unlearn_engine.api.demo.command import run_demo

    return run_demo(args)


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


def _check_bench(args):
    """-k parsed as pytest itself parses it, before pytest is started."""
    if args.k is None:
        return
    try:
        from _pytest.mark.expression import Expression  # what pytest itself parses -k with
    except ImportError:  # no pytest: the bench run below says so itself
        return
    try:
        Expression.compile(args.k)
    except (SyntaxError, ValueError) as err:  # ParseError in pytest < 8.4, SyntaxError since
        fail(f"-k {args.k!r} is not a valid pytest -k expression ({getattr(err, 'msg', err)})")


# Each command's checks, made before any heavy work (a model load, a file written); the unlearn and vlguard-split
# checks return what they read, which the command then uses (args.prepared).
CHECKS = {"unlearn": prepare_unlearn, "asr": check_asr_args, "rai": check_rai_args,
          "vlguard-split": prepare_vlguard_split, "demo": _check_demo, "bench": _check_bench}


def _check_args(args):
    """Checks a command's flags, files and output folder before any heavy work; returns what it read that the
    command uses (unlearn, vlguard-split), else None."""
    check = CHECKS.get(args.command)
    return check(args) if check else None


def _config_flags(parser):
    """One flag per UnlearnConfig field, with the dataclass's type, default and help. Defaults are shown in the
    help but not set on the namespace (SUPPRESS), so --config values are overridden only by flags given."""
    group = parser.add_argument_group("unlearning settings (UnlearnConfig; also as keys in --config)")
    for f in dataclasses.fields(UnlearnConfig):
        choices = choices_of(f)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=f.type, choices=choices,
                           default=argparse.SUPPRESS, metavar=f.type.__name__.upper() if not choices else None,
                           help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"))  # not a format


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
        parent.add_argument("--device", default=default_device() if required else argparse.SUPPRESS,
                            help=f"torch device (default: {default_device()})")
        if required:  # asr, rai (unlearn loads in unlearn_command)
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
    un.set_defaults(func=run_unlearn)

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
    asr.set_defaults(func=run_asr)

    rai = sub.add_parser("rai", parents=[model_flags(True), output],
                         help="answer a prompt (+ image) with and without Risk Awareness Injection")
    rai.add_argument("--prompt", required=True)
    rai.add_argument("--image", help="image file shown with the prompt")
    rai.add_argument("--keywords", help="comma-separated unsafe keywords (default: the built-in list)")
    rai.add_argument("--rank", type=int, default=8)
    rai.add_argument("--top-fraction", type=float, default=0.1)
    rai.add_argument("--strength", type=float, default=2.0)
    rai.set_defaults(func=run_rai)

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
    split.set_defaults(func=run_vlguard_split)

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
