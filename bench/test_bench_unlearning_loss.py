"""Fused unlearning loss vs the eager composite (full logits + log_softmax), forward+backward.

Time from pytest-benchmark (min over rounds); peak extra memory from a fresh process per case.
Run: make bench   (or: .venv/bin/python -m pytest bench -k unlearning_loss -s)
"""
import pytest
import torch
from unlearning_loss_case import gradient_bytes, make_inputs, step

from common import probe_in_subprocess

if torch.cuda.is_available():
    DEVICE, DTYPE = "cuda", "bfloat16"
    SHAPES = [(8192, 4096, 32064), (8192, 4096, 151936)]
    ROUNDS = 10
else:
    DEVICE, DTYPE = "cpu", "float32"
    SHAPES = [(2048, 1024, 32064)]
    ROUNDS = 3

OBJECTIVES = [("ga", "nll"), ("npo", "nll"), ("npo", "kl")]


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("forget,retain", OBJECTIVES)
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_unlearning_loss_fwd_bwd(benchmark, results, impl, forget, retain, n, h, v):
    args, kwargs = make_inputs(forget, retain, n, h, v, getattr(torch, DTYPE), DEVICE)

    def run():
        step(impl, args, kwargs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    grads = gradient_bytes(args)
    probe = probe_in_subprocess("bench.unlearning_loss_case", [impl, forget, retain, n, h, v, DTYPE, DEVICE])
    peak = probe["peak_extra_bytes"]
    results("unlearning_loss").add(
        case=f"{forget}+{retain} N={n} H={h} V={v} {DTYPE}", impl=impl, shape=dict(N=n, H=h, V=v, dtype=DTYPE),
        device=DEVICE, time_s=benchmark.stats.stats.min, peak_extra_mb=peak / 2**20,
        workspace_mb=(peak - grads) / 2**20,
        tflops=(6 * n * h * v) / benchmark.stats.stats.min / 1e12)
