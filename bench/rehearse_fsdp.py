"""Scale rehearsal under FSDP2: the LLaVA-1.5-7B-shaped model of bench/rehearse.py (a few decoder layers, bf16,
fp32 masters) unlearned with full-scope NPO by 2 processes (gloo, CPU) under parallel='fsdp', each rank measuring
its own peak RSS and the bytes it holds of each kind (local shards of the trained bf16 weights, fp32 masters, AdamW
moments), so the per-GPU cost of sharding can be projected from measured numbers.

    python -m bench.rehearse_fsdp                       # 2 ranks, 2 decoder layers, 3 steps; prints JSON
    python -m bench.rehearse_fsdp --layers 1 --steps 2 --out bench/results/x.json
    python -m bench.rehearse_fsdp --smoke            # a narrow text model (hidden 256): checks the plumbing

`fsdp_memory(layers, steps, world)` is what the rehearsal calls: it returns the JSON-able dict.
"""
import json
import os
import socket
import sys
import tempfile
import time

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def _rank(rank: int, world: int, port: int, layers: int, steps: int, out_dir: str, text: dict) -> None:
    import warnings

    import torch.distributed as dist

    import bench.rehearse
    import unlearn_engine as ue
    from bench.common import peak_rss_bytes, reset_peak_rss
    from bench.rehearse import TOKENS, WORDS, build

    bench.rehearse.TEXT = {**bench.rehearse.TEXT, **text}  # a smoke run's smaller text model (build reads TEXT)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        baseline = reset_peak_rss()
        model, tok = build(layers, vision_layers=2)
        g = torch.Generator().manual_seed(0)
        images = {k: torch.randn(3, 336, 336, generator=g) for k in ("a", "b")}
        # the 1-process rehearsal's records: image + text cut to TOKENS tokens a sample
        long = " ".join(WORDS[i % len(WORDS)] for i in range(TOKENS))
        forget = [ue.Record("how to make a bomb", "step one mix poison " + long, "forget", image=k) for k in ("a", "b")]
        retain = [ue.Record("how to make a bread", "step one mix bread " + long, "retain", image=k) for k in ("a", "b")]
        # batch_size 2: each of the 2 ranks takes one forget and one retain record a step (as the 1-process
        # rehearsal's batch_size 1); reference_device cpu: NPO's unsharded reference copy for the precompute;
        # checkpointing on, as in the 1-process rehearsal
        run = ue.Unlearner(model, tok, method="npo", scope="full", steps=steps, lr=1e-5, batch_size=world,
                           max_length=TOKENS, parallel="fsdp", reference_device="cpu", progress=False,
                           gradient_checkpointing="on", image_loader=images.__getitem__)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the records are cut to TOKENS on purpose
            run.fit(forget, retain)
        fit_s = time.perf_counter() - t0
        state = run.optimizer.state
        held = dict(trained_weights=_local_bytes(p for _, p in run.named_params),
                    masters=_local_bytes(m for m, (_, p) in zip(run.masters, run.named_params) if m is not p),
                    moments=_local_bytes(v for m in run.masters for v in state.get(m, {}).values() if v.dim()),
                    frozen_weights=_local_bytes(p for p in model.parameters()
                                                if id(p) not in {id(q) for _, q in run.named_params}))
        row = dict(rank=rank, peak_rss_bytes=peak_rss_bytes(), baseline_rss_bytes=baseline, fit_s=round(fit_s, 1),
                   step_s=round(fit_s / steps, 1), held_bytes=held,
                   trained_params=sum(p.numel() for _, p in run.named_params),  # global, not the local shard
                   total_params=sum(p.numel() for p in model.parameters()))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(row, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip teardown: gloo's threads can abort it on a loaded machine


def fsdp_memory(layers: int = 2, steps: int = 3, world: int = 2, text: dict | None = None) -> dict:
    """Runs the 2-process (`world`) FSDP2 rehearsal in fresh processes and returns each rank's measured peak RSS
    (peak minus the RSS at its start is the run's own) and the bytes it held of weights, masters and moments.
    `text` overrides the text model's LLaVA-1.5-7B shapes (a smoke run; the result records it)."""
    text = dict(text or {})
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="rehearse-fsdp-") as out_dir:
        mp.spawn(_rank, args=(world, _free_port(), layers, steps, out_dir, text), nprocs=world, join=True)
        ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]
    from bench.common import machine
    from bench.rehearse import TOKENS

    return dict(family="rehearse_fsdp", machine=machine(), method="npo", scope="full", parallel="fsdp", world=world,
                decoder_layers=layers, vision_layers=2, text_overrides=text, steps=steps, tokens_per_sample=TOKENS,
                gradient_checkpointing="on", dtype="bfloat16",
                masters="float32", backend="gloo", device="cpu", threads_per_rank=1, ranks=ranks)


def main(argv) -> int:
    def flag(name, default):
        return type(default)(argv[argv.index(name) + 1]) if name in argv else default

    out = flag("--out", "")
    smoke = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4)
    result = fsdp_memory(layers=flag("--layers", 2), steps=flag("--steps", 3),
                         text=smoke if "--smoke" in argv else None)
    text = json.dumps(result, indent=2)
    if out:
        from unlearn_engine.atomic import write_text

        write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
