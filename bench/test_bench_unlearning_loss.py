"""Fused unlearning loss vs the eager composite (full logits + log_softmax), forward+backward.

Time from pytest-benchmark (min over rounds); peak extra memory from a fresh process per case.
Run: make bench   (or: .venv/bin/python -m pytest bench -k unlearning_loss -s)
"""
import pytest
import torch
from unlearning_loss_case import (
    baseline_impls,
    eager_loss,
    flop_count,
    fused_loss,
    gradient_bytes,
    make_inputs,
    measured_gemm_flop,
    step,
)

from common import probe_in_subprocess

if torch.cuda.is_available():
    DEVICE, DTYPE = "cuda", "bfloat16"
    SHAPES = [(8192, 4096, 32064), (8192, 4096, 151936)]
    ROUNDS = 5
else:
    DEVICE, DTYPE = "cpu", "float32"
    SHAPES = [(2048, 1024, 32064)]
    ROUNDS = 3

OBJECTIVES = [("ga", "nll"), ("npo", "nll"), ("ga", "kl"), ("npo", "kl")]
# NPO's fused step should cost what GA's does (same GEMMs, one walk): within this factor of GA with the same retain
# term, and no slower than eager on a CPU.
NPO_OVER_GA_MAX = 1.05
BASELINES = list(baseline_impls(DEVICE))  # compile / liger / cce on a GPU, where installed
CASES = [(impl, f, r) for f, r in OBJECTIVES for impl in ["eager", "fused", "capturable"] + (
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
    if impl in ("eager", "fused", "capturable"):
        peak = probe_in_subprocess("bench.unlearning_loss_case", [impl, forget, retain, n, h, v, DTYPE, DEVICE])[
            "peak_extra_bytes"]
    else:  # the baselines are measured in this process (their modules are imported here)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    flop = flop_count(impl, forget, retain, n, h, v, device=DEVICE, element_size=getattr(torch, DTYPE).itemsize)
    results("unlearning_loss").add(
        case=f"{forget}+{retain} N={n} H={h} V={v} {DTYPE}", impl=impl, shape=dict(N=n, H=h, V=v, dtype=DTYPE),
        device=DEVICE, time_s=benchmark.stats.stats.min, peak_extra_mb=peak / 2**20,
        workspace_mb=(peak - grads) / 2**20,
        flop=flop, tflops=flop / benchmark.stats.stats.min / 1e12,
        model_tflops=flop_count("eager", forget, retain, n, h, v) / benchmark.stats.stats.min / 1e12)


def test_npo_costs_what_ga_costs(results):
    """Runs after the timings above (same module, file order): NPO+NLL / GA+NLL and NPO+KL / GA+KL of the fused
    path, and fused / eager per objective, written as their own rows (family unlearning_loss_objectives). Recorded,
    not asserted: timings never fail a run (a loaded machine would); read `within_target`."""
    rows = {(r["case"].split(" ")[0], r["impl"], r["case"].split(" ", 1)[1]): r["time_s"]
            for r in results("unlearning_loss").rows}
    summary = results("unlearning_loss_objectives", baseline="none")
    for (objective, impl, shape), time_s in sorted(rows.items()):
        forget, retain = objective.split("+")
        if impl != "fused" or forget != "npo" or ("ga+" + retain, "fused", shape) not in rows:
            continue
        over_ga = time_s / rows[("ga+" + retain, "fused", shape)]
        over_eager = time_s / rows[(objective, "eager", shape)] if (objective, "eager", shape) in rows else None
        within = over_ga <= NPO_OVER_GA_MAX and (DEVICE != "cpu" or (over_eager is not None and over_eager <= 1.0))
        summary.add(case=f"{objective} {shape}", impl="fused", device=DEVICE, time_s=time_s,
                    over_fused_ga=over_ga, over_eager=over_eager, target=f"<= {NPO_OVER_GA_MAX}x GA"
                    + (", <= 1.0x eager" if DEVICE == "cpu" else ""), within_target=within)
    for (objective, impl, shape), time_s in sorted(rows.items()):
        if impl == "capturable" and (objective, "fused", shape) in rows:  # the price of no host sync
            summary.add(case=f"{objective} {shape}", impl="capturable", device=DEVICE, time_s=time_s,
                        over_fused=time_s / rows[(objective, "fused", shape)])
        if impl == "fused" and objective.startswith("ga+") and (objective, "eager", shape) in rows:
            summary.add(case=f"{objective} {shape}", impl="fused", device=DEVICE, time_s=time_s,
                        over_eager=time_s / rows[(objective, "eager", shape)])


@pytest.mark.parametrize("forget,retain", OBJECTIVES)
def test_flop_count_matches_what_each_path_does(forget, retain):
    """flop_count equals the GEMM flop each path really runs: eager's counted by torch's FlopCounterMode, the fused
    op's from the profiled aten mm / addmm calls of its C++ walk. Both are 6NHV (NLL) or 8NHV (KL): the fused NPO
    recomputes nothing; with samples longer than the chunk it adds the forget samples' forward pre-pass."""
    from torch.utils.flop_counter import FlopCounterMode

    n, h, v = 24, 16, 40
    args, kwargs = make_inputs(forget, retain, n, h, v, torch.float32, "cpu")
    with FlopCounterMode(display=False) as counter:
        eager_loss(*args, **kwargs)[0].backward()
    assert counter.get_total_flops() == flop_count("eager", forget, retain, n, h, v)
    expected = {"nll": 6, "kl": 8}[retain] * n * h * v
    assert flop_count("fused", forget, retain, n, h, v) == expected
    assert measured_gemm_flop(lambda: step("fused", args, kwargs)) == expected
    # samples of 3 rows, chunks of 2: NPO's 4 forget samples get a forward pre-pass (12 rows x 2HV)
    chunked = dict(kwargs, chunk_size=2)
    measured = measured_gemm_flop(lambda: fused_loss(*args, **chunked)[0].backward())
    assert measured == flop_count("fused", forget, retain, n, h, v, chunk_size=2)
    assert measured == expected + (2 * 12 * h * v if forget == "npo" else 0)
    # capturable: every row, and NPO's pre-pass over all of them
    measured = measured_gemm_flop(lambda: step("capturable", args, kwargs))
    assert measured == flop_count("capturable", forget, retain, n, h, v)
    assert measured == expected + (2 * n * h * v if forget == "npo" else 0)
