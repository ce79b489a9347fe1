"""Peak RSS and wall time of ue.load_vlm against transformers' from_pretrained on the same checkpoint (and
against the loader load_vlm had before issue 12: build the model in fp32 with random weights, cast, copy).

    python bench/loading_rss.py                      # builds a ~200M-parameter bf16 LLaVA in a temp folder
    python bench/loading_rss.py --model PATH         # any safetensors LLaVA / Qwen2-VL checkpoint
    python bench/loading_rss.py --json bench/results/loading.json

Each measurement runs in a fresh Python process (Linux): after the imports the peak is reset
(/proc/self/clear_refs), so peak_rss_mb is the process's RSS peak during loading, import_rss_mb the RSS before it
and load_peak_mb their difference (what loading itself costs). Not a test: timings never go in tests.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import gc, json, sys, time
import torch, transformers
import unlearn_engine as ue
from unlearn_engine.api import loading
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
path, how, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS: the imports' transient peak is not counted
base = status("VmRSS")
t0 = time.perf_counter()
if how == "load_vlm":
    model, _ = ue.load_vlm(path, dtype=dtype, load_processor=False)
elif how == "load_vlm_no_scan":
    model, _ = ue.load_vlm(path, dtype=dtype, load_processor=False, check_finite=False)
elif how == "from_pretrained_touched":  # from_pretrained, then every weight read once (as the NaN scan does)
    config = transformers.AutoConfig.from_pretrained(path)
    model = loading._model_class(config).from_pretrained(path, dtype=dtype)
    [float(p.float().sum()) for p in model.parameters()]
elif how == "from_pretrained":
    config = transformers.AutoConfig.from_pretrained(path)
    model = loading._model_class(config).from_pretrained(path, dtype=dtype)
else:  # the pre-issue-12 loader: a full model with random fp32 weights, cast, then copied into
    from safetensors.torch import load_file
    config = transformers.AutoConfig.from_pretrained(path)
    model = loading._model_class(config)(config).to(dtype)
    state = model.state_dict()
    for name, tensor in load_file(path + "/model.safetensors").items():
        state[loading._canonical_name(name, set(state))].copy_(tensor)
seconds = time.perf_counter() - t0
n = sum(p.numel() for p in model.parameters())
peak = status("VmHWM")
print(json.dumps({"how": how, "seconds": seconds, "peak_rss_mb": peak, "import_rss_mb": base,
                  "load_peak_mb": peak - base, "parameters": n}))
"""


def build(path, hidden, layers, vocab):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    import unlearn_engine as ue

    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
                              image_size=224, patch_size=14)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1)
    torch.set_default_dtype(torch.bfloat16)
    model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    ue.save_vlm(model, path)


def measure(path, how, dtype):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", CHILD, path, how, dtype], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: build one)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each loader (the best time is kept)")
    parser.add_argument("--old", action="store_true", help="also measure the pre-issue-12 loader (single file)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or os.path.join(tmp, "llava")
        if not args.model:
            build(path, args.hidden, args.layers, args.vocab)
        hows = ["from_pretrained", "from_pretrained_touched", "load_vlm", "load_vlm_no_scan"]
        hows += ["old"] if args.old else []
        results = {}
        for how in hows:
            runs = [measure(path, how, args.dtype) for _ in range(args.repeat)]
            results[how] = min(runs, key=lambda r: r["seconds"]) | {"peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                                                                  "load_peak_mb": max(r["load_peak_mb"] for r in runs)}
    ref = results["from_pretrained"]
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "dtype": args.dtype, "results": results,
              "rss_ratio_vs_from_pretrained": {h: r["peak_rss_mb"] / ref["peak_rss_mb"] for h, r in results.items()},
              "load_peak_ratio_vs_from_pretrained": {h: r["load_peak_mb"] / ref["load_peak_mb"]
                                                     for h, r in results.items()},
              "time_ratio_vs_from_pretrained": {h: r["seconds"] / ref["seconds"] for h, r in results.items()}}
    import torch
    import transformers

    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(report, indent=2))
    if args.json:
        from unlearn_engine.atomic import write_text

        write_text(args.json, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
