"""Scale-out: 2 processes on the gloo backend (gradient-averaging data parallel, and FSDP2 fully_shard) compute
the gradients of 1 process; torchrun + the CLI under FSDP2 saves the trained model."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import unlearn_engine as ue

from test_unlearner import FORGET, RETAIN


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model_dir, method, parallel, out_file):
    """One unlearning step; saves every trainable parameter's gradient (the global-batch mean), gathered. Parallel
    'ddp-in-backward': the step is taken inside backward (gradients averaged in the hooks and freed): the gradient
    is read back from AdamW's first moment after step 1, (1 - beta1) * gradient."""
    from torch.distributed.tensor import DTensor

    in_backward = parallel == "ddp-in-backward"
    model, tok = ue.load_vlm(model_dir, dtype="float32")
    unlearner = ue.Unlearner(model, tok, method=method, steps=1, lr=3e-3, batch_size=4,
                             parallel=parallel.split("-")[0], progress=False,
                             gradient_step="in_backward" if in_backward else "after_backward")
    unlearner.fit(FORGET, RETAIN)
    grads = {}
    for name, p in unlearner.named_params:  # the same order on every rank: gathering is a collective
        state = unlearner.optimizer.state.get(p, {}) if in_backward else {}  # (fp32: the masters are the params)
        g = (state["exp_avg"] / (1 - 0.9) if "exp_avg" in state else None) if in_backward else p.grad
        grads[name] = None if g is None else (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(grads, out_file)


def _worker(rank, world, port, model_dir, method, parallel, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _run(model_dir, method, parallel, out_file)
        dist.barrier()  # leave together: a rank exiting while the other still uses the group can abort in gloo
    finally:
        dist.destroy_process_group()
    # Done and saved: skip interpreter teardown, where gloo's background threads have aborted the process
    # ("terminate called without an active exception") on a loaded 2-core machine.
    sys.stdout.flush()
    os._exit(0)


def _grad_mismatches(single, multi, rel_tol=1e-5):
    """One readable line per parameter whose gradients differ: name, max abs diff, relative norm of the diff."""
    lines = [f"{k}: only in one run" for k in sorted(set(single) ^ set(multi))]
    for k in sorted(single.keys() & multi.keys()):
        a, b = single[k], multi[k]
        if a is None or b is None:
            if (a is None) != (b is None):
                lines.append(f"{k}: gradient is None in {'1 process' if a is None else '2 processes'} only")
            continue
        if a.shape != b.shape:
            lines.append(f"{k}: shape {tuple(a.shape)} (1 process) vs {tuple(b.shape)} (2 processes)")
            continue
        diff = (b.double() - a.double())
        rel = float(diff.norm() / a.double().norm().clamp(min=1e-30))
        if rel > rel_tol or not torch.isfinite(b).all():
            lines.append(f"{k}: max |diff| {float(diff.abs().max()):.3g}, |diff|/|g| {rel:.3g} "
                         f"(|g| = {float(a.norm()):.3g})")
    return lines


@pytest.mark.parametrize("method,parallel", [("gd", "ddp"), ("npo", "ddp"), ("gd", "fsdp"), ("npo", "fsdp"),
                                             ("npo", "ddp-in-backward")])
def test_two_processes_match_one(tiny_llava_dir, tmp_path, method, parallel):
    """Catches wrong data-parallel gradients (unaveraged, double-counted, wrong batch slices): after one step
    the gradient of every trainable parameter over 2 gloo processes equals the 1-process one."""
    torch.set_num_threads(1)
    _run(str(tiny_llava_dir), method, parallel, str(tmp_path / "single.pt"))
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_llava_dir), method, parallel, str(tmp_path / "multi.pt")),
             nprocs=2, join=True)
    single, multi = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "multi.pt")
    assert any(g is not None and bool(g.abs().sum() > 0) for g in single.values()), "no gradient at all"
    mismatches = _grad_mismatches(single, multi)
    assert not mismatches, f"{parallel}/{method}: 2-process gradients differ from 1 process:\n" + "\n".join(mismatches)


def test_torchrun_cli_fsdp(tiny_llava_dir, tmp_path):
    """Catches the FSDP CLI saving the untrained model: `torchrun --nproc_per_node 2 unlearn-engine unlearn
    --parallel fsdp` writes one plain model that is the trained one (close to a 1-process run with the same
    settings), and its JSON summary's NLLs are those of that model."""
    ue.write_jsonl(FORGET, str(tmp_path / "f.jsonl"))
    ue.write_jsonl(RETAIN, str(tmp_path / "r.jsonl"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "unlearn_engine.api.cli", "unlearn", "--model", str(tiny_llava_dir),
           "--forget", str(tmp_path / "f.jsonl"), "--retain", str(tmp_path / "r.jsonl"), "--method", "gd",
           "--steps", "3", "--lr", "3e-3", "--dtype", "float32", "--device", "cpu", "--parallel", "fsdp",
           "--out", str(tmp_path / "out"), "--no-progress", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    saved, tok = ue.load_vlm(str(tmp_path / "out" / "model"), dtype="float32")
    assert not any(type(p).__name__ == "DTensor" for p in saved.parameters())

    initial, _ = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    single, _ = ue.load_vlm(str(tiny_llava_dir), dtype="float32")
    ue.Unlearner(single, tok, method="gd", steps=3, lr=3e-3, batch_size=4, progress=False).fit(FORGET, RETAIN)
    init, want, got = initial.state_dict(), single.state_dict(), saved.state_dict()
    assert want.keys() == got.keys()
    moved = sum(float((want[k] - init[k]).double().pow(2).sum()) for k in init) ** 0.5
    off = sum(float((got[k] - want[k]).double().pow(2).sum()) for k in init) ** 0.5
    unchanged = [k for k in init if not torch.equal(want[k], init[k]) and torch.equal(got[k], init[k])]
    assert not unchanged, f"the saved model did not train these tensors: {unchanged[:5]}"
    # Adam turns round-off in near-zero gradients into lr-sized steps, so "close", not bit-equal:
    assert off < 1e-3 * moved, f"|saved - 1-process| = {off:.3g} vs |1-process - initial| = {moved:.3g}"

    after = ue.mean_nll(saved, tok, FORGET)
    assert summary["after"]["forget_nll"] == pytest.approx(after, rel=1e-4)
    assert summary["before"]["forget_nll"] == pytest.approx(ue.mean_nll(initial, tok, FORGET), rel=1e-4)
    assert summary["after"]["forget_nll"] == pytest.approx(ue.mean_nll(single, tok, FORGET), rel=1e-3)
    assert summary["after"]["forget_nll"] > summary["before"]["forget_nll"] + 0.05, summary
