"""The `demo` command: the safety-mirage world run end to end over seeds, or its small trained model saved to try
every other command on."""
import json

from unlearn_engine.api.demo import mirage  # mirage.World etc.: looked up when the command runs
from unlearn_engine.atomic import check_writable
from unlearn_engine.checks import require


def check_demo_args(args) -> None:
    """The flags of the `demo` command, checked before the world is built."""
    require(1 <= args.seeds <= 50, f"--seeds must be in [1, 50], got {args.seeds}")
    if args.save_model:
        check_writable(args.save_model, "--save-model")
    else:
        check_writable(args.out, "--out")


def run_demo(args):
    """The `demo` command: the world end to end, or (--save-model) its trained model and data only."""
    if args.save_model:
        files = mirage.save_demo_model(args.save_model, mirage.World(seed=args.seed), progress=not args.no_progress)
        print(json.dumps(files, indent=2) if args.json else
              f"model and tokenizer in {files['model']}; try:\n  unlearn-engine unlearn --model {files['model']} "
              f"--forget {files['forget']} --retain {files['retain']} --out runs/demo --steps 20 --lr 1e-3 "
              f"--dtype float32\n  unlearn-engine asr --model runs/demo/model --harmful {files['forget']} "
              "--out asr_demo --dtype float32")
        return 0
    report = mirage.run_mirage(args.out, mirage.World(seed=args.seed), seeds=args.seeds, progress=not args.no_progress,
                        log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(report["results"], indent=2))
    return 0
