"""Fused unlearning loss vs eager and the peers a user would pick (torch.compile of the eager loss, cut-cross-entropy;
on a GPU also its kernels and liger-kernel), forward+backward, each peer given the same objective.

Every implementation of one case is timed in the same run, taking turns round by round (interleaved), min over the
rounds, so their ratios are comparable on a shared machine; the load average is recorded beside them. Peak extra
memory comes from a fresh process per implementation, the same probe for all (a warm-up step, then one measured).
Run: make bench-loss   (or: .venv/bin/python -m pytest bench/test_bench_unlearning_loss.py -q -s -p no:cacheprovider)
"""
import os

import pytest
import torch
from unlearning_loss_case import (
    IMPLS,
    eager_loss,
    flop_count,
    fused_loss,
    gradient_bytes,
    lm_head_gemms,
    make_inputs,
    measured_gemm_flop,
    peer_impls,
    step,
    supports,
)

from unlearn_engine.fused_logprob import default_chunk_size

from common import FRESH_MAPPINGS, interleaved_min_times, load_average, probe_in_subprocess

if torch.cuda.is_available():
    DEVICE, DTYPE = "cuda", "bfloat16"
    SHAPES = [(8192, 4096, 32064), (8192, 4096, 151936)]
    ROUNDS = 5
else:
    DEVICE, DTYPE = "cpu", "float32"
    SHAPES = [(2048, 1024, 32064)]
    ROUNDS = 4
ROUNDS = int(os.environ.get("UE_BENCH_ROUNDS", ROUNDS))

OBJECTIVES = [("ga", "nll"), ("npo", "nll"), ("ga", "kl"), ("npo", "kl")]
OURS = ["eager", "fused", "capturable"]
PEERS = list(peer_impls(DEVICE))  # compile, cce_compile; on a GPU cce and liger, where installed
COMPILED = ["compile", "cce_compile"]  # the compiled peers of the targets (both run on a CPU)
# Targets (issue 28), each a ratio within one run: fused time <= 0.9x the fastest compiled peer (every objective) and
# <= 0.8x eager (the NLL objectives); workspace <= 10% of eager's. NPO's fused step costs what GA's does (same GEMMs,
# one walk): within NPO_OVER_GA_MAX of GA with the same retain term.
OVER_COMPILED_MAX, OVER_EAGER_MAX, WORKSPACE_OVER_EAGER_MAX = 0.9, 0.8, 0.10
NPO_OVER_GA_MAX = 1.05


@pytest.mark.parametrize("forget,retain", OBJECTIVES)
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_unlearning_loss_fwd_bwd(results, forget, retain, n, h, v):
    args, kwargs = make_inputs(forget, retain, n, h, v, getattr(torch, DTYPE), DEVICE)
    impls = [impl for impl in OURS + PEERS if supports(impl, forget, retain)]
    # The floors, timed in the same rounds: eager's LM-head GEMMs alone and (CPU) the fused walk's chunked ones.
    floors = {"gemms_eager": lambda: lm_head_gemms(args, kwargs)}
    if DEVICE == "cpu":
        chunk = default_chunk_size(n, v, torch.device(DEVICE), element_size=getattr(torch, DTYPE).itemsize,
                                   with_ref=retain == "kl")
        floors["gemms_walk"] = lambda: lm_head_gemms(args, kwargs, chunk)
    load_before = load_average()
    times = interleaved_min_times({**{impl: (lambda impl=impl: step(impl, args, kwargs)) for impl in impls},
                                   **floors},
                                  rounds=ROUNDS, warmup=1, sync=torch.cuda.synchronize if DEVICE == "cuda" else None)
    load_after = load_average()
    grads = gradient_bytes(args)
    case = f"{forget}+{retain} N={n} H={h} V={v} {DTYPE}"
    fastest_compiled = min((times[p]["min_s"] for p in COMPILED if p in times), default=None)
    for impl in impls:
        peak = probe_in_subprocess("bench.unlearning_loss_case", [impl, forget, retain, n, h, v, DTYPE, DEVICE],
                                   env=FRESH_MAPPINGS)["peak_extra_bytes"]
        time_s = times[impl]["min_s"]
        flop = flop_count(impl, forget, retain, n, h, v, device=DEVICE, element_size=getattr(torch, DTYPE).itemsize)
        results("unlearning_loss").add(
            case=case, impl=impl, shape=dict(N=n, H=h, V=v, dtype=DTYPE), device=DEVICE, time_s=time_s,
            times_s=times[impl]["times_s"], rounds=ROUNDS, peak_extra_mb=peak / 2**20,
            workspace_mb=(peak - grads) / 2**20,
            **{f"over_{p}": time_s / times[p]["min_s"] for p in PEERS if p in times and p != impl},
            over_fastest_compiled=time_s / fastest_compiled if fastest_compiled else None,
            flop=flop, tflops=flop / time_s / 1e12,
            model_tflops=flop_count("eager", forget, retain, n, h, v) / time_s / 1e12,
            load_average_before=load_before, load_average_after=load_after)
    for name in floors:
        flop = flop_count("eager", forget, retain, n, h, v)
        results("unlearning_loss").add(
            case=case, impl=name, shape=dict(N=n, H=h, V=v, dtype=DTYPE), device=DEVICE,
            time_s=times[name]["min_s"], times_s=times[name]["times_s"], rounds=ROUNDS, flop=flop,
            tflops=flop / times[name]["min_s"] / 1e12, load_average_before=load_before, load_average_after=load_after)
    results("unlearning_loss").write()  # after every case: a long run cut short keeps what it measured


def test_targets_and_npo_costs_what_ga_costs(results):
    """Runs after the timings above (same module, file order): the issue's targets per objective (fused against the
    fastest compiled peer and eager of the same interleaved run, workspace against eager's), NPO / GA of the fused
    path, and the price of capturable, as rows of family unlearning_loss_objectives. Recorded, not asserted: timings
    never fail a run (a loaded machine would); read `within_target`."""
    rows = {(r["case"].split(" ")[0], r["impl"], r["case"].split(" ", 1)[1]): r
            for r in results("unlearning_loss").rows}
    summary = results("unlearning_loss_objectives", baseline="none")
    for (objective, impl, shape), row in sorted(rows.items()):
        if impl != "fused":
            continue
        forget, retain = objective.split("+")
        eager = rows.get((objective, "eager", shape))
        over_eager = row["time_s"] / eager["time_s"] if eager else None
        workspace_over_eager = row["workspace_mb"] / eager["workspace_mb"] if eager else None
        over_compiled = row.get("over_fastest_compiled")
        checks = {f"<= {OVER_COMPILED_MAX}x fastest compiled peer": over_compiled is not None
                  and over_compiled <= OVER_COMPILED_MAX,
                  f"workspace <= {WORKSPACE_OVER_EAGER_MAX:.0%} of eager": workspace_over_eager is not None
                  and workspace_over_eager <= WORKSPACE_OVER_EAGER_MAX}
        if retain == "nll":
            checks[f"<= {OVER_EAGER_MAX}x eager"] = over_eager is not None and over_eager <= OVER_EAGER_MAX
        ga = rows.get(("ga+" + retain, "fused", shape))
        over_ga = row["time_s"] / ga["time_s"] if ga and forget == "npo" else None
        if over_ga is not None:
            checks[f"<= {NPO_OVER_GA_MAX}x fused GA"] = over_ga <= NPO_OVER_GA_MAX
        # The floor: eager's GEMMs alone, over eager's whole step. A time target below it asks for less than eager's
        # own GEMMs take (reachable only by GEMMs faster than the vendor BLAS at full size).
        floor = rows.get((objective, "gemms_eager", shape))
        walk = rows.get((objective, "gemms_walk", shape))
        compiled = [rows[(objective, p, shape)]["time_s"] for p in COMPILED if (objective, p, shape) in rows]
        summary.add(case=f"{objective} {shape}", impl="fused", device=DEVICE, time_s=row["time_s"],
                    gemms_eager_over_eager=floor["time_s"] / eager["time_s"] if floor and eager else None,
                    gemms_eager_over_fastest_compiled=floor["time_s"] / min(compiled) if floor and compiled else None,
                    over_gemms_eager=row["time_s"] / floor["time_s"] if floor else None,
                    over_gemms_walk=row["time_s"] / walk["time_s"] if walk else None,
                    over_eager=over_eager, over_compile=row.get("over_compile"),
                    over_cce_compile=row.get("over_cce_compile"), over_fastest_compiled=over_compiled,
                    workspace_over_eager=workspace_over_eager, over_fused_ga=over_ga,
                    targets={name: bool(ok) for name, ok in checks.items()}, within_target=all(checks.values()),
                    load_average=row["load_average_before"])
    for (objective, impl, shape), row in sorted(rows.items()):
        if impl == "capturable" and (objective, "fused", shape) in rows:  # the price of no host sync
            summary.add(case=f"{objective} {shape}", impl="capturable", device=DEVICE, time_s=row["time_s"],
                        over_fused=row["time_s"] / rows[(objective, "fused", shape)]["time_s"])


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
    # the floors do eager's GEMMs, whole or in chunks
    assert measured_gemm_flop(lambda: lm_head_gemms(args, kwargs)) == expected
    assert measured_gemm_flop(lambda: lm_head_gemms(args, kwargs, chunk_size=5)) == expected


@pytest.mark.parametrize("forget,retain", OBJECTIVES)
def test_peers_compute_the_same_objective(forget, retain):
    """Each peer that times an objective computes that objective: its loss and gradients equal eager's on a small
    case (fp32), so a peer's speed is the speed of the same work."""
    n, h, v = 24, 16, 40
    args, kwargs = make_inputs(forget, retain, n, h, v, torch.float32, "cpu")
    step("eager", args, kwargs)
    want = [args[0].grad.clone(), args[1].grad.clone()]
    want_loss = eager_loss(*args, **kwargs)[0].detach()
    for impl in IMPLS:
        if impl in ("eager", "liger") or not supports(impl, forget, retain):  # liger: token-mean CE only
            continue
        loss = step(impl, args, kwargs)
        torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-5, atol=1e-6, msg=impl)
        torch.testing.assert_close(args[0].grad, want[0], rtol=1e-4, atol=1e-6, msg=impl)
        torch.testing.assert_close(args[1].grad, want[1], rtol=1e-4, atol=1e-6, msg=impl)
