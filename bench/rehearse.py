"""Scale rehearsal: unlearning a LLaVA with LLaVA-1.5-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 32064,
CLIP ViT-L/14-336 tower giving 576 image tokens) but only a few decoder and vision layers, random weights, bf16,
with fp32 master weights, 1,024 tokens a sample, gradient checkpointing on and the optimizer stepping inside
backward (the defaults), on this machine. Each (method, scope) runs in a fresh process so its peak RSS is its own.

    python -m bench.rehearse                         # `make rehearse`: NPO x {full, mask, lora}, KL x full, and
                                                     # NPO mask at 3 layers (the per-layer increment)
    python -m bench.rehearse --probes DIR            # keep each run's result in DIR; a rerun measures only the rest
    python -m bench.rehearse --probe npo mask 2 3    # one run (what the driver calls), prints one JSON line
    python -m bench.rehearse --table FILE            # the README's table from a rehearsal JSON

Writes bench/results/<date>-<device>-rehearse.json. Per run it measures: the bytes of what the run keeps (the
model's weights, fp32 masters, optimizer moments, the mask's packed positions, LoRA adapters, a frozen reference,
the saliency pass's running sum), the peak RSS of the saliency pass and of the training steps, and from them the
activation bytes (peak RSS minus the RSS before the phase minus what the phase allocated to keep). The projection to
32 decoder layers (and the full 24-layer vision tower) scales each kept part by its measured bytes per element
(weights and reference per parameter, masters / moments / positions per trained parameter, adapters per decoder
layer) and adds 30 times the activation increment of one more decoder + vision layer, measured by the 3-layer run.
Accelerator memory is what a GPU would hold: the running saliency sum and the mask's bits stay in CPU memory
(listed as host bytes). The projection is arithmetic from these measurements, not a GPU measurement; CPU RSS keeps
freed buffers, so the activation terms are upper bounds.
"""
import json
import os
import sys
import time

import torch

GB = 1e9
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
FULL_LAYERS, FULL_VISION_LAYERS = 32, 24
RUNS = [("npo", "mask"), ("npo", "lora"), ("npo", "full"), ("kl", "full")]  # the targets' scopes first
SLOPE_RUN = ("npo", "mask")  # also run at one more decoder + vision layer: the activations' per-layer increment
MASK_FRACTION, TOKENS = 0.05, 1024
# Issue 26's targets for LLaVA-1.5-7B (NPO, 1,024 tokens a sample, checkpointing on, saliency pass included)
TARGETS = dict(static_gb=20.0, total_gb=24.0)
WORDS = "how to make a bomb poison bread cake step one two three mix bake".split()


def build(layers: int, vision_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from unlearn_engine.api.demo.toy import word_tokenizer

    tok = word_tokenizer(WORDS)
    text = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TEXT)
    vision = CLIPVisionConfig(num_hidden_layers=vision_layers, projection_dim=768, **VISION)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16: no fp32 copy of the model
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval(), tok


def counts(model, trained_names) -> dict:
    """Parameter counts by part: per decoder layer, per vision layer, and the rest; trained ones separately."""
    lm = model.base_model.language_model
    tower = model.base_model.vision_tower
    layer = sum(p.numel() for p in lm.layers[0].parameters())
    encoder = getattr(tower, "vision_model", tower).encoder  # transformers 5 flattens CLIPVisionModel
    vision_layer = sum(p.numel() for p in encoder.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for n, p in model.named_parameters() if n in trained_names)
    return dict(total=total, decoder_layer=layer, vision_layer=vision_layer, trained=trained,
                decoder_layers=len(lm.layers), vision_layers=len(encoder.layers))


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def kept_bytes(run, model) -> dict:
    """What the run keeps, measured on its objects (bytes)."""
    params = [p for _, p in run.named_params]
    masters = [m for m, p in zip(run.masters, params) if m is not p]
    moments = [t for s in run.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    on_cpu = run.config.optimizer_state == "cpu"
    positions = run.stepper.positions if run.stepper is not None and run.stepper.positions is not None else []
    reference = [p for p in run.ref_model.parameters()] if run.ref_model is not None else []
    lora = run.config.scope == "lora"
    return dict(weights=_nbytes(p for p in model.parameters() if not lora or id(p) not in {id(q) for q in params}),
                adapters=_nbytes(params) if lora else 0,
                masters=_nbytes(masters), moments=0 if on_cpu else _nbytes(moments),
                host_moments=_nbytes(moments) if on_cpu else 0, positions=_nbytes(positions),
                mask_bits=_nbytes(run.mask.bits) if getattr(run, "mask", None) is not None else 0,
                reference=_nbytes(reference),
                saliency_sum=sum(p.numel() * p.element_size() for p in params) if run.config.scope == "mask" else 0)


def probe(method: str, scope: str, layers: int, steps: int) -> dict:
    """One run in this process: build, unlearn `steps` steps, report what it keeps, peak RSS per phase, times."""
    import warnings

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import unlearn_engine as ue
    import unlearn_engine.api.precision as precision_module  # where the optimizer side calls saliency_mask
    from unlearn_engine.api.data import encode, image_tokens

    from common import peak_rss_bytes, reset_peak_rss

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    baseline = reset_peak_rss()
    t0 = time.perf_counter()
    model, tok = build(layers, vision_layers=layers)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    images = {k: torch.randn(3, 336, 336, generator=g) for k in ("a", "b")}
    long = " ".join(WORDS[i % len(WORDS)] for i in range(TOKENS))  # cut to TOKENS tokens a sample
    forget = [ue.Record("how to make a bomb", "step one mix poison " + long, "forget", image="a")]
    retain = [ue.Record("how to make a bread", "step one mix bread " + long, "retain", image="b")]
    run = ue.Unlearner(model, tok, method=method, scope=scope, steps=steps, lr=1e-5, batch_size=1,
                       mask_fraction=MASK_FRACTION, lora_rank=16, max_length=TOKENS, progress=False,
                       gradient_checkpointing="on", image_loader=images.__getitem__)
    trained = {n for n, _ in run.named_params}
    phases = {}
    streamed = precision_module.saliency_mask

    def measured_saliency(*args, **kwargs):  # the saliency pass's own peak
        phases["saliency_start_rss_bytes"] = reset_peak_rss()
        t = time.perf_counter()
        mask = streamed(*args, **kwargs)
        phases["saliency_s"] = round(time.perf_counter() - t, 1)
        phases["saliency_peak_rss_bytes"] = peak_rss_bytes()
        phases["step_start_rss_bytes"] = reset_peak_rss()  # the steps' phase starts here
        return mask

    precision_module.saliency_mask = measured_saliency
    phases["step_start_rss_bytes"] = reset_peak_rss()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the records are cut to TOKENS on purpose
        history = run.fit(forget, retain)
    fit_s = time.perf_counter() - t0 - phases.get("saliency_s", 0.0)
    encoded = encode(forget, tok, max_length=TOKENS, image_loader=images.__getitem__, image_tokens=image_tokens(model))
    return dict(method=method, scope=scope, steps=steps, layers=layers, build_s=round(build_s, 1),
                step_s=round(fit_s / steps, 1), peak_rss_bytes=peak_rss_bytes(), baseline_rss_bytes=baseline,
                **phases, kept=kept_bytes(run, model), losses=[h["loss"] for h in history],
                counts=counts(model, trained),
                lora_trained=sum(p.numel() for _, p in run.named_params) if scope == "lora" else None,
                tokens=int(encoded["input_ids"].shape[1]))


def activations(result: dict) -> dict:
    """Activation bytes per phase: the phase's peak RSS minus its start minus what it allocated to keep."""
    k = result["kept"]
    during_steps = k["masters"] + k["moments"] + k["host_moments"] + k["positions"]  # (the mask: made before)
    out = dict(step=max(0.0, result["peak_rss_bytes"] - result["step_start_rss_bytes"] - during_steps))
    if "saliency_peak_rss_bytes" in result:
        out["saliency"] = max(0.0, result["saliency_peak_rss_bytes"] - result["saliency_start_rss_bytes"]
                              - k["saliency_sum"] - k["mask_bits"])
    return out


def counts_7b(c: dict) -> tuple:
    """(all, trained) parameter counts at 32 decoder / 24 vision layers, from a run's counts(): the extra decoder
    layers are trained, the extra vision layers frozen."""
    extra_decoder = (FULL_LAYERS - c["decoder_layers"]) * c["decoder_layer"]
    extra_vision = (FULL_VISION_LAYERS - c["vision_layers"]) * c["vision_layer"]
    return c["total"] + extra_decoder + extra_vision, c["trained"] + extra_decoder


def cached(cache, name: str, measure, what: str) -> dict:
    """measure()'s result; with --probes DIR (`cache`) kept as DIR/name.json and reused by a rerun."""
    path = os.path.join(cache, f"{name}.json") if cache else None
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    result = measure()
    if path:
        from unlearn_engine.atomic import write_text

        os.makedirs(cache, exist_ok=True)
        write_text(path, json.dumps(result))
    print(f"measured {what}", flush=True)
    return result


def project(result: dict, increment: dict) -> dict:
    """Bytes at 32 decoder / 24 vision layers, from the measured bytes per element and per layer."""
    c, k = result["counts"], result["kept"]
    total_7b, trained_7b = counts_7b(c)
    per_param = total_7b / c["total"]
    per_layer = FULL_LAYERS / c["decoder_layers"]  # LoRA adapters sit in the decoder layers
    per_trained = per_layer if result["scope"] == "lora" else trained_7b / c["trained"]
    device = dict(weights=k["weights"] * per_param, reference=k["reference"] * per_param,
                  masters=k["masters"] * per_trained, moments=k["moments"] * per_trained,
                  positions=k["positions"] * per_trained, adapters=k["adapters"] * per_layer)
    host = dict(moments=k["host_moments"] * per_trained, mask_bits=k["mask_bits"] * per_trained,
                saliency_sum=k["saliency_sum"] * per_trained)
    measured = activations(result)
    extra_layers = FULL_LAYERS - c["decoder_layers"]  # one increment covers a decoder and a vision layer
    acts = {phase: v + extra_layers * increment.get(phase, increment["step"]) for phase, v in measured.items()}
    static = sum(device.values())
    step_total = static + acts["step"]
    saliency_total = device["weights"] + acts["saliency"] if "saliency" in acts else None
    peak = max(step_total, saliency_total or 0.0)
    gb = lambda v: round(v / GB, 2)  # noqa: E731
    return dict(device_static_gb={n: gb(v) for n, v in device.items()}, device_static_7b_gb=gb(static),
                host_7b_gb={n: gb(v) for n, v in host.items()},
                activations_here_gb={n: gb(v) for n, v in measured.items()},
                activations_7b_gb={n: gb(v) for n, v in acts.items()},
                step_total_7b_gb=gb(step_total),
                saliency_total_7b_gb=gb(saliency_total) if saliency_total is not None else None,
                peak_7b_gb=gb(peak), static_target_met=static <= TARGETS["static_gb"] * GB,
                total_target_met=peak <= TARGETS["total_gb"] * GB)


def measure_fsdp(cache, layers: int, steps: int, world: int = 2):
    """The 2-process FSDP2 run of bench/rehearse_fsdp.py (full-scope NPO), kept in `cache` like a probe.
    UE_REHEARSE_FSDP=0 skips it (None)."""
    if os.environ.get("UE_REHEARSE_FSDP") == "0":
        return None
    from bench.rehearse_fsdp import fsdp_memory

    return cached(cache, f"fsdp-npo-full-{layers}", lambda: fsdp_memory(layers=layers, steps=steps, world=world),
                  f"npo full under FSDP2 on {world} processes")


def project_fsdp(fsdp: dict, one_process: dict) -> dict:
    """Bytes per GPU at 32 decoder / 24 vision layers under FSDP2, from one rank's measured shards: its trained
    weights, fp32 masters and moments per trained parameter (global count) and its frozen weights per frozen
    parameter, scaled to the 7B counts; plus the activations of one process's batch (the same records and
    checkpointing, from the 1-process full-scope projection) and the layers FSDP2 gathers unsharded while one
    runs (this one and the prefetched next: two decoder layers in bf16, arithmetic)."""
    rank = max(fsdp["ranks"], key=lambda r: sum(r["held_bytes"].values()))
    c, held = one_process["counts"], rank["held_bytes"]
    total_7b, trained_7b = counts_7b(c)
    per_trained = trained_7b / rank["trained_params"]
    frozen_here = rank["total_params"] - rank["trained_params"]
    device = dict(weights=held["trained_weights"] * per_trained, masters=held["masters"] * per_trained,
                  moments=held["moments"] * per_trained,
                  frozen_weights=held["frozen_weights"] * (total_7b - trained_7b) / max(frozen_here, 1),
                  gathered_layers=2 * c["decoder_layer"] * 2)
    static = sum(device.values())
    acts = one_process["projection"]["activations_7b_gb"]["step"] * GB
    gb = lambda v: round(v / GB, 2)  # noqa: E731
    return dict(rank=rank["rank"], device_static_gb={n: gb(v) for n, v in device.items()},
                device_static_7b_gb=gb(static), activations_7b_gb=gb(acts), step_total_7b_gb=gb(static + acts),
                target_gb=80.0, target_met=static + acts <= 80.0 * GB)


def markdown_table(report: dict) -> str:
    """The README's table from a rehearsal JSON: per run the measured step time and peak RSS at 2 layers, and
    the 7B projection (accelerator static, activations, peak; host memory), then the FSDP2 row per GPU."""
    gb = lambda v: f"{v / GB:.2f}"  # noqa: E731
    lines = ["| run | step, 2 layers (CPU) | peak RSS, 2 layers: saliency / steps | 7B static | 7B activations "
             "(upper bound) | 7B accelerator peak | 7B host memory | target met |", "|" + "---|" * 8]
    for r in report["results"]:
        p = r["projection"]
        host = sum(p["host_7b_gb"].values())
        saliency = gb(r["saliency_peak_rss_bytes"]) + " / " if "saliency_peak_rss_bytes" in r else ""
        small = (r["method"], r["scope"]) in (("npo", "mask"), ("npo", "lora"))
        target = (("yes" if p["static_target_met"] and p["total_target_met"] else
                   "static yes, total no" if p["static_target_met"] else "no") if small else "(one GPU: none)")
        lines.append(f"| {r['method'].upper()} {r['scope']} | {r['step_s']} s | {saliency}{gb(r['peak_rss_bytes'])} GB "
                     f"| {p['device_static_7b_gb']} GB | {p['activations_7b_gb']['step']} GB | {p['peak_7b_gb']} GB | "
                     f"{host:.2f} GB | {target} |")
    f = report.get("fsdp")
    if f:
        p = f["projection"]
        peak = max(r["peak_rss_bytes"] for r in f["ranks"])
        lines.append(f"| NPO full, FSDP2 x{f['world']}, per GPU | {max(r['step_s'] for r in f['ranks'])} s | "
                     f"{gb(peak)} GB per rank | {p['device_static_7b_gb']} GB | {p['activations_7b_gb']} GB | "
                     f"{p['step_total_7b_gb']} GB | | {'yes' if p['target_met'] else 'no'} (80 GB) |")
    return "\n".join(lines)


def main(argv):
    if argv and argv[0] == "--table":
        with open(argv[1]) as f:
            print(markdown_table(json.load(f)))
        return 0
    if argv and argv[0] == "--probe":
        method, scope, layers, steps = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(probe(method, scope, layers, steps)))
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from unlearn_engine.atomic import write_text

    from common import RESULTS_DIR, device_tag, machine, probe_in_subprocess

    layers, steps = 2, 3
    cache = argv[argv.index("--probes") + 1] if "--probes" in argv else None

    def measure(method, scope, n_layers):
        """One probe in a fresh process (kept in --probes DIR)."""
        return cached(cache, f"{method}-{scope}-{n_layers}",
                      lambda: probe_in_subprocess("bench.rehearse", ["--probe", method, scope, n_layers, steps]),
                      f"{method} {scope} at {n_layers} layers")

    rows = [measure(m, s, layers) for m, s in RUNS[:1]]
    deeper = measure(*SLOPE_RUN, layers + 1)
    rows += [measure(m, s, layers) for m, s in RUNS[1:]]
    shallow = next(r for r in rows if (r["method"], r["scope"]) == SLOPE_RUN)
    here, there = activations(shallow), activations(deeper)
    # the activations of one more decoder + vision layer (RSS noise can make it negative: then 0)
    increment = {phase: max(0.0, there[phase] - here[phase]) for phase in here}
    for result in rows:
        result["projection"] = p = project(result, increment)
        print(f"{result['method']:>4} {result['scope']:<5} step {result['step_s']:6.1f} s  peak RSS "
              f"{result['peak_rss_bytes'] / GB:5.2f} GB -> 7B: static {p['device_static_7b_gb']:6.2f} GB, step "
              f"{p['step_total_7b_gb']:6.2f} GB, saliency {p['saliency_total_7b_gb']} GB", flush=True)
    fsdp = measure_fsdp(cache, layers, steps)
    if fsdp is not None:
        fsdp["projection"] = project_fsdp(fsdp, next(r for r in rows if (r["method"], r["scope"]) == ("npo", "full")))
        p = fsdp["projection"]
        print(f"npo full, FSDP2 x{fsdp['world']}: peak RSS per rank "
              f"{max(r['peak_rss_bytes'] for r in fsdp['ranks']) / GB:5.2f} GB -> 7B per GPU: static "
              f"{p['device_static_7b_gb']:6.2f} GB, step {p['step_total_7b_gb']:6.2f} GB", flush=True)
    info = machine()
    path = os.path.join(RESULTS_DIR, f"{info['date']}-{device_tag()}-rehearse.json")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    write_text(path, json.dumps(dict(
        family="rehearse", machine=info,
        shapes=dict(text=TEXT, vision=VISION, decoder_layers=layers, vision_layers=layers, steps=steps, tokens=TOKENS,
                    mask_fraction=MASK_FRACTION, gradient_checkpointing="on", gradient_step="in_backward"),
        projection_to=dict(decoder_layers=FULL_LAYERS, vision_layers=FULL_VISION_LAYERS, targets_gb=TARGETS),
        layer_increment_bytes=increment, deeper_run=deeper, results=rows,
        fsdp=fsdp,
    ), indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
