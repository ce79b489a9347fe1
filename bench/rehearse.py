"""Scale rehearsal: unlearning a LLaVA with LLaVA-1.5-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 32064,
CLIP ViT-L/14-336 tower giving 576 image tokens) but only a few decoder and vision layers, random weights, bf16,
with fp32 master weights, on this machine. Each (method, scope) runs in a fresh process so its peak RSS is its own.

    python -m bench.rehearse                       # `make rehearse`: NPO x {full, mask, lora} and KL x full
    python -m bench.rehearse --probe npo full 2 3  # one run (what the driver calls), prints one JSON line

Writes bench/results/<date>-<device>-rehearse.json: measured peak RSS and step time per run, the parameter
counts, and a projection to 32 decoder layers (and the full 24-layer vision tower) on one 80 GB GPU: static
bytes from the counts (bf16 weights, bf16 gradients of what is trained, fp32 masters, fp32 AdamW moments of what
is updated, a frozen bf16 copy for KL), plus the activations measured here scaled by the layer ratio. The
projection is arithmetic, not a GPU measurement.
"""
import json
import os
import sys
import time

import torch

GB = 1e9
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
FULL_LAYERS, FULL_VISION_LAYERS, GPU_BYTES = 32, 24, 80 * GB
RUNS = [("npo", "full"), ("npo", "mask"), ("npo", "lora"), ("kl", "full")]
MASK_FRACTION = 0.05


def build(layers: int, vision_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from unlearn_engine.api.demo.toy import word_tokenizer

    tok = word_tokenizer("how to make a bomb poison bread cake step one two three mix bake".split())
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


def probe(method: str, scope: str, layers: int, steps: int) -> dict:
    """One run in this process: build, unlearn `steps` steps, report peak RSS and times."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import unlearn_engine as ue

    from common import peak_rss_bytes, reset_peak_rss

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    baseline = reset_peak_rss()
    t0 = time.perf_counter()
    model, tok = build(layers, vision_layers=2)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    images = {k: torch.randn(3, 336, 336, generator=g) for k in ("a", "b")}
    forget = [ue.Record("how to make a bomb", "step one mix poison step two bake", "forget", image="a")]
    retain = [ue.Record("how to make a bread", "step one mix bread step two bake", "retain", image="b")]
    run = ue.Unlearner(model, tok, method=method, scope=scope, steps=steps, lr=1e-5, batch_size=1,
                       mask_fraction=MASK_FRACTION, lora_rank=16, max_length=1024, progress=False,
                       image_loader=images.__getitem__)
    trained = {n for n, _ in run.named_params}
    t0 = time.perf_counter()
    history = run.fit(forget, retain)
    fit_s = time.perf_counter() - t0
    return dict(method=method, scope=scope, steps=steps, build_s=round(build_s, 1), fit_s=round(fit_s, 1),
                step_s=round(fit_s / steps, 1), peak_rss_bytes=peak_rss_bytes(), baseline_rss_bytes=baseline,
                losses=[h["loss"] for h in history], counts=counts(model, trained),
                lora_trained=sum(p.numel() for _, p in run.named_params) if scope == "lora" else None,
                tokens=576 + 20)


def static_bytes(c: dict, method: str, scope: str, layers: int, vision_layers: int, lora_trained=None) -> float:
    """Bytes that do not depend on the batch, at `layers` decoder layers."""
    rest = c["total"] - c["decoder_layers"] * c["decoder_layer"] - c["vision_layers"] * c["vision_layer"]
    total = rest + layers * c["decoder_layer"] + vision_layers * c["vision_layer"]
    trained_rest = c["trained"] - c["decoder_layers"] * c["decoder_layer"] if scope != "lora" else 0
    trained = trained_rest + layers * c["decoder_layer"] if scope != "lora" else 0
    if scope == "lora":  # adapters scale with the layers too
        adapters = lora_trained * layers / c["decoder_layers"]
        extra = adapters * (2 + 2 + 4 + 8)  # weights, grads, masters, moments
    elif scope == "mask":
        extra = trained * (2 + 4) + trained * MASK_FRACTION * 8  # grads, masters; compact moments of 5%
    else:
        extra = trained * (2 + 4 + 8)
    reference = 2 * total if method == "kl" else 0  # KL keeps a frozen bf16 copy
    return 2 * total + extra + reference


def project(result: dict) -> dict:
    c, m, s = result["counts"], result["method"], result["scope"]
    here = static_bytes(c, m, s, c["decoder_layers"], c["vision_layers"], result["lora_trained"])
    activations = max(0.0, result["peak_rss_bytes"] - result["baseline_rss_bytes"] - here)
    full = static_bytes(c, m, s, FULL_LAYERS, FULL_VISION_LAYERS, result["lora_trained"])
    full_activations = activations * (FULL_LAYERS + FULL_VISION_LAYERS) / (c["decoder_layers"] + c["vision_layers"])
    need = full + full_activations
    return dict(static_here_gb=round(here / GB, 2), activations_here_gb=round(activations / GB, 2),
                static_7b_gb=round(full / GB, 1), activations_7b_gb=round(full_activations / GB, 1),
                need_7b_gb=round(need / GB, 1), fits_80gb=bool(need <= GPU_BYTES))


def main(argv):
    if argv and argv[0] == "--probe":
        method, scope, layers, steps = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(probe(method, scope, layers, steps)))
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from unlearn_engine.atomic import write_text

    from common import RESULTS_DIR, device_tag, machine, probe_in_subprocess

    layers, steps = 2, 3
    rows = []
    for method, scope in RUNS:
        result = probe_in_subprocess("bench.rehearse", ["--probe", method, scope, layers, steps])
        result["projection"] = project(result)
        rows.append(result)
        p = result["projection"]
        print(f"{method:>4} {scope:<5} step {result['step_s']:7.1f} s  peak RSS {result['peak_rss_bytes'] / GB:6.2f} GB"
              f"  -> 7B: static {p['static_7b_gb']:6.1f} GB + activations {p['activations_7b_gb']:5.1f} GB"
              f" = {p['need_7b_gb']:6.1f} GB  fits 80 GB: {p['fits_80gb']}", flush=True)
    info = machine()
    path = os.path.join(RESULTS_DIR, f"{info['date']}-{device_tag()}-rehearse.json")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    write_text(path, json.dumps(dict(family="rehearse", machine=info, shapes=dict(text=TEXT, vision=VISION,
                                                                                   decoder_layers=layers,
                                                                                   vision_layers=2, steps=steps),
                                     projection_to=dict(decoder_layers=FULL_LAYERS, vision_layers=FULL_VISION_LAYERS,
                                                        gpu_bytes=GPU_BYTES),
                                     results=rows), indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
