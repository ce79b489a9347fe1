"""Top-k selection and masked AdamW vs the PyTorch ways people do it today, on 24 x (1024 x 4096) fp32.

Selection: ours (radix select over the list) vs torch.kthvalue / torch.topk on the concatenated |x|.
Step (fraction 0.05): MaskedOptimizer (dense / compact state) vs torch foreach AdamW on the full model, and
AdamW + gradient masking + restore. Peak extra memory from a fresh process per case.
"""
import pytest
from weight_masking_case import FRACTION, SELECT, SHAPES, StepCase, make_tensors

from common import probe_in_subprocess

ROUNDS = 3
SHAPE = dict(tensors=len(SHAPES), shape=list(SHAPES[0]), fraction=FRACTION, dtype="float32")


@pytest.fixture(scope="module")
def tensors():
    return make_tensors()


@pytest.mark.parametrize("impl", list(SELECT))
def test_select(benchmark, results, tensors, impl):
    benchmark.pedantic(SELECT[impl], args=(tensors,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    peak = probe_in_subprocess("bench.weight_masking_case", ["select", impl])["peak_extra_bytes"]
    results("masking_select", baseline="kthvalue").add(
        case="top 5% of 24x1024x4096", impl=impl, shape=SHAPE, time_s=benchmark.stats.stats.min,
        peak_extra_mb=peak / 2**20)


@pytest.mark.parametrize("impl", ["torch_adamw", "grad_mask_restore", "ours", "ours_compact"])
def test_step(benchmark, results, tensors, impl):
    case = StepCase(impl, tensors)
    case.step()  # optimizer state exists from here on, as in training
    benchmark.pedantic(case.step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    state = case.state_bytes()
    del case
    peak = probe_in_subprocess("bench.weight_masking_case", ["step", impl])["peak_extra_bytes"]
    results("masking_step", baseline="torch_adamw").add(
        case="AdamW step, 5% selected", impl=impl, shape=SHAPE, time_s=benchmark.stats.stats.min,
        peak_extra_mb=peak / 2**20, state_mb=state / 2**20)
