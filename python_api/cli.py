"""The `unlearn-engine` command line."""
import argparse
import json
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


def build_parser():
    parser = argparse.ArgumentParser(prog="unlearn-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how the native extension was built, and where it runs")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
