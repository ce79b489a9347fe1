"""Fused unlearning loss vs the eager composite (full logits + log_softmax), forward+backward.

Time from pytest-benchmark (min over rounds); peak extra memory from a fresh process per case.
Run: make bench   (or: .venv/bin/python -m pytest bench -k unlearning_loss -s)
"""
import pytest
import torch
from unlearning_loss_case import baseline_impls, eager_loss, flop_count, gradient_bytes, make_inputs, step

from common import probe_in_subprocess

if torch.cuda.is_available():
    DEVICE, DTYPE = "cuda", "bfloat16"
    SHAPES = [(8192, 4096, 32064), (8192, 4096, 151936)]
    ROUNDS = 5
else:
    DEVICE, DTYPE = "cpu", "float32"
    SHAPES = [(2048, 1024, 32064)]
    ROUNDS = 3

OBJECTIVES = [("ga", "nll"), ("npo", "nll"), ("npo", "kl")]
BASELINES = list(baseline_impls(DEVICE))  # compile / liger / cce on a GPU, where installed
CASES = [(impl, f, r) for f, r in OBJECTIVES for impl in ["eager", "fused"] + (
    BASELINES if (f, r) == ("ga", "nll") else ["compile"] if "compile" in BASELINES else [])]


@pytest.mark.parametrize("impl,forget,retain", CASES)
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_unlearning_loss_fwd_bwd(benchmark, results, impl, forget, retain, n, h, v):
    args, kwargs = make_inputs(forget, retain, n, h, v, getattr(torch, DTYPE), DEVICE)

    def run():
        step(impl, args, kwargs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    grads = gradient_bytes(args)
    if impl in ("eager", "fused"):
        peak = probe_in_subprocess("bench.unlearning_loss_case", [impl, forget, retain, n, h, v, DTYPE, DEVICE])[
            "peak_extra_bytes"]
    else:  # the baselines are measured in this process (their modules are imported here)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    flop = flop_count(impl, forget, retain, n, h, v)
    results("unlearning_loss").add(
        case=f"{forget}+{retain} N={n} H={h} V={v} {DTYPE}", impl=impl, shape=dict(N=n, H=h, V=v, dtype=DTYPE),
        device=DEVICE, time_s=benchmark.stats.stats.min, peak_extra_mb=peak / 2**20,
        workspace_mb=(peak - grads) / 2**20,
        flop=flop, tflops=flop / benchmark.stats.stats.min / 1e12,
        model_tflops=flop_count("eager", forget, retain, n, h, v) / benchmark.stats.stats.min / 1e12)


@pytest.mark.parametrize("forget,retain", OBJECTIVES + [("ga", "kl")])
def test_flop_count_matches_what_eager_does(forget, retain):
    """The eager path's GEMM flop, counted by torch's FlopCounterMode, equal flop_count's; the fused path's are
    6NHV (GA+NLL), 8NHV (GA+KL, NPO+NLL) and 12NHV (NPO+KL): the recompute in backward is counted."""
    from torch.utils.flop_counter import FlopCounterMode

    n, h, v = 24, 16, 40
    args, kwargs = make_inputs(forget, retain, n, h, v, torch.float32, "cpu")
    with FlopCounterMode(display=False) as counter:
        eager_loss(*args, **kwargs)[0].backward()
    assert counter.get_total_flops() == flop_count("eager", forget, retain, n, h, v)
    fused = {("ga", "nll"): 6, ("ga", "kl"): 8, ("npo", "nll"): 8, ("npo", "kl"): 12}[(forget, retain)]
    assert flop_count("fused", forget, retain, n, h, v) == fused * n * h * v
