"""Fused risk projection vs the eager composite (matmul, norms, mask, index_add) on LLaVA-shaped visual
tokens: batch 32 x 576 tokens x H=4096, rank 16. Both are out of place (a new x_out and the scores). Time,
peak extra memory, achieved bandwidth, and the machine's copy bandwidth measured right after each case (the
ceiling for a pass that reads x once and writes x_out once)."""
import pytest
import torch
from risk_projection_case import CASES, DEVICE, SHAPE, make_inputs

from common import copy_bandwidth, probe_in_subprocess

ROUNDS = 3 if DEVICE == "cpu" else 20


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_risk_projection(benchmark, results, impl, case):
    x, U = make_inputs()

    def run():
        CASES[case][impl](x, U)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    moved = 2 * x.numel() * x.element_size()  # one read and one write of every token: the minimum traffic
    gb_per_s = moved / benchmark.stats.stats.min / 1e9
    copy = copy_bandwidth(x)
    peak = probe_in_subprocess("bench.risk_projection_case", [case, impl])["peak_extra_bytes"]
    results("risk_projection").add(case=f"{case} B={SHAPE[0]} T={SHAPE[1]} H={SHAPE[2]} k={SHAPE[3]}", impl=impl,
                                   shape=dict(zip("BTHk", SHAPE)), device=DEVICE, time_s=benchmark.stats.stats.min,
                                   peak_extra_mb=peak / 2**20, gb_per_s=gb_per_s, **copy,
                                   of_clone_bw=gb_per_s / copy["clone_gb_per_s"],
                                   of_copy_bw=gb_per_s / copy["copy_gb_per_s"])
