"""The simulated CUDA execution model (csrc/common/sim/, built as unlearn_engine._C_sim).

Every other CUDA-parametrised test also runs on it (the "sim" device, conftest.py). Here: the simulator reports each
rule a kernel can break, and one pass over odd shapes launches every __global__ kernel under csrc and matches the CPU
kernels (make sanitize-sim runs this file under ASan + UBSan).
"""
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from conftest import load_simulator

_C_sim = load_simulator()

ROOT = pathlib.Path(__file__).resolve().parents[1]
sim_ops, cpu_ops = torch.ops.unlearn_engine_sim, torch.ops.unlearn_engine


def kernels_in_sources():
    """The name of every __global__ function in the .cu files under csrc."""
    pattern = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")
    return {name for cu in (ROOT / "csrc").rglob("*.cu") for name in pattern.findall(cu.read_text())}


def launched_since(before):
    after = {}
    for key, count in _C_sim.launches().items():
        name = key.split("<")[0]
        after[name] = after.get(name, 0) + count - before.get(key, 0)
    return {name for name, count in after.items() if count > 0}


@pytest.mark.parametrize("check,message", [
    ("divergent_barrier", r"__syncthreads\(\) at .*bindings.cpp:\d+ .* is not reached by every thread.*exited"),
    ("two_barriers", r"__syncthreads\(\) at .* is not reached by every thread.*__syncthreads at .*bindings.cpp"),
    ("exited_lane", r"warp operation at .* waits for lane 5, but thread 5 \(exited\)"),
    ("divergent_ballot", r"warp operation at .* waits for lane \d+, but thread \d+ \(exited\)"),
    ("mask_without_self", r"called by lane \d+ .* with mask 0x1, which leaves that lane out"),
    ("cub_reuse", r"cub::BlockReduce::Sum: TempStorage used again with no __syncthreads\(\)"),
    ("cub_block_size", r"cub::BlockScan made for 128 threads runs in a block of 64x1x1"),
    ("too_many_threads", r"block of 2048x1x1 threads: a block holds 1 to 1024 threads"),
    ("grid_too_large", r"grid of 1x70000x1 blocks is outside the limits"),
    ("above_launch_bounds", r"bounded_kernel .*: block of 65 threads is wider than the kernel's __launch_bounds__\(64\) "
                            r"\(common/sim/bindings.cpp:\d+\)"),
    ("no_launch_bounds", r"unbounded_kernel .*: the kernel declares no __launch_bounds__"),
])
def test_the_simulator_reports_each_broken_rule(check, message):
    with pytest.raises(RuntimeError, match=message):
        _C_sim.run_check(check)


def test_a_kernel_that_keeps_the_rules_runs_the_same_from_any_seed():
    threads = 64
    warp_sums = sum(range(32)) + sum(range(32, 64))
    want = [warp_sums + t + threads for _ in range(3) for t in range(threads)]  # warp sums, exclusive scan, total
    for seed in (0, 1, 12345):
        _C_sim.configure(seed)
        assert _C_sim.run_check("good") == want


def test_fresh_shared_memory_holds_the_seed_s_pattern():
    """A read before any write gives 0x00 bytes from an even seed, 0xff from an odd one: the two runs of a sim test
    then differ, so the bit-identical check catches it."""
    _C_sim.configure(2)
    assert set(_C_sim.run_check("uninitialised_shared")[:64]) == {0}  # one block of 64 threads
    _C_sim.configure(3)
    assert set(_C_sim.run_check("uninitialised_shared")[:64]) == {-1}


@pytest.mark.parametrize("check,where,sanitizer_report", [
    ("shared_overflow", r"past its end: 4 of the 64 canary bytes after it changed", "use-after-poison"),
    ("shared_underflow", r"before its start: 4 of the 64 canary bytes before it changed",
     "index -1 out of bounds for type 'int [64]'"),
])
def test_a_write_past_either_end_of_a_shared_variable_is_reported(check, where, sanitizer_report):
    """One int written next to a shared array (on a GPU, into its neighbour): its canary shows it when the block
    ends. Under make sanitize-sim the sanitizers stop the process at the write itself (ASan: the canaries are
    poisoned; UBSan: an array index out of bounds), so there the kernel runs in a child process."""
    if _C_sim.sanitized:
        code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import conftest; " \
               f"conftest.load_simulator().run_check({check!r})"
        child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert child.returncode != 0 and sanitizer_report in child.stderr, child.stderr[-3000:]
        return
    with pytest.raises(RuntimeError, match=r"shared_\w+_kernel .*: shared variable `first` \(.*bindings.cpp:\d+, "
                                           r"256 bytes\) was written " + where):
        _C_sim.run_check(check)


def fused_case(n, h, v, generator):
    hidden = torch.randn(n, h, generator=generator)
    weight = torch.randn(v, h, generator=generator) * 0.3
    labels = torch.randint(0, v, (n,), generator=generator)
    labels[1] = -100  # an unlabelled row
    ref_hidden = hidden + 0.1 * torch.randn(n, h, generator=generator)
    return hidden, weight, torch.randn(v, generator=generator), labels, ref_hidden, weight.clone(), None


def test_every_cuda_kernel_runs_on_the_simulator_and_matches_the_cpu_kernels():
    g = torch.Generator().manual_seed(7)
    before = _C_sim.launches()
    _C_sim.configure(11)

    # row pass at each of its block widths (V < 1024: 64 threads, < 8192: 256, else 512), forward and backward
    for v in (29, 1031, 8209):
        args = fused_case(5, 7, v, g)
        got, want = sim_ops.fused_logprob(*args, 3), cpu_ops.fused_logprob(*args, 3)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
        grad_logp, grad_kl = torch.randn(5, generator=g), torch.randn(5, generator=g)
        got = sim_ops.fused_logprob_backward(*args, grad_logp, grad_kl, 3)
        want = cpu_ops.fused_logprob_backward(*args, grad_logp, grad_kl, 3)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # top-k: the two-pass scheme (odd sizes), then heavy ties past its budget (over 2^20 candidates): the radix passes
    tensors = [torch.randn(1001, generator=g), torch.randn(333, generator=g), torch.randn(7, generator=g)]
    assert all(torch.equal(a, b) for a, b in zip(sim_ops.topk_mask(tensors, [100, 5, 3], True),
                                                 cpu_ops.topk_mask(tensors, [100, 5, 3], True)))
    ties = [torch.full((1_100_003,), 0.5, dtype=torch.bfloat16), torch.randn(77, generator=g).bfloat16()]
    assert all(torch.equal(a, b) for a, b in zip(sim_ops.topk_mask(ties, [600_001], False),
                                                 cpu_ops.topk_mask(ties, [600_001], False)))

    # masked AdamW and SGD (with momentum) on the selected indices of two odd-sized tensors
    params = [torch.randn(37, generator=g), torch.randn(5, 3, generator=g)]
    grads = [torch.randn_like(p) for p in params]
    indices = [torch.tensor([0, 3, 36], dtype=torch.int32), torch.tensor([1, 14], dtype=torch.int32)]
    results = []
    for ops in (sim_ops, cpu_ops):
        p, m, s = [x.clone() for x in params], [torch.zeros_like(x) for x in params], [torch.ones_like(x) for x in params]
        ops.masked_adamw_(p, grads, m, s, indices, False, 0.1, 0.9, 0.999, 1e-8, 0.01, 2)
        b = [torch.full_like(x, 0.5) for x in params]
        ops.masked_sgd_(p, grads, b, indices, False, 0.1, 0.9, 0.0, 0.01, True, False)
        results.append(p + m + s + b)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # risk projection: J in each register bucket (16, 32, 64), both modes, out-of-place and in place
    x = torch.randn(9, 45, generator=g)
    for j in (5, 20, 40):
        basis = torch.linalg.qr(torch.randn(45, j, generator=g))[0].contiguous()
        for mode in (0, 1):
            got, want = sim_ops.risk_project_rows(x, basis, None, mode, 0.1, 0.8), \
                cpu_ops.risk_project_rows(x, basis, None, mode, 0.1, 0.8)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        inplace = x.clone()
        want_rows, want_scores = cpu_ops.risk_project_rows(x, basis, None, 0, 0.2, 1.0)
        torch.testing.assert_close(sim_ops.risk_project_rows_(inplace, basis, None, 0, 0.2, 1.0), want_scores,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(inplace, want_rows, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sim_ops.risk_scores(x, basis, 0), cpu_ops.risk_scores(x, basis, 0),
                                   rtol=1e-4, atol=1e-5)

    # RMU: the loss's squared-difference sums and the backward's scaled differences, an odd width
    f, r, rr = torch.randn(11, 13, generator=g), torch.randn(6, 13, generator=g), torch.randn(6, 13, generator=g)
    control = torch.randn(13, generator=g)
    torch.testing.assert_close(sim_ops.rmu_loss(f, control, r, rr, 1.5), cpu_ops.rmu_loss(f, control, r, rr, 1.5))
    grad = torch.tensor(0.7)
    for a, b in zip(sim_ops.rmu_loss_backward(grad, f, control, r, rr, 1.5),
                    cpu_ops.rmu_loss_backward(grad, f, control, r, rr, 1.5)):
        torch.testing.assert_close(a, b)

    launched = launched_since(before)
    assert kernels_in_sources() <= launched, f"never launched: {sorted(kernels_in_sources() - launched)}"
    assert len(kernels_in_sources()) >= 12
