"""Sharded checkpoints under parallel='fsdp' (2 gloo processes on the CPU, bf16 compute with fp32 sharded masters):
a run killed with SIGKILL while writing a checkpoint resumes from the last complete one and ends with the weights
of an uninterrupted run; a resume with other settings is refused by the fingerprint check."""
import os
import signal
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import unlearn_engine as ue

from test_unlearner import FORGET, RETAIN

SETTINGS = dict(method="npo", steps=5, lr=1e-2, batch_size=4, parallel="fsdp", checkpoint_every=1,
                keep_checkpoints=2, progress=False)
KILLED_WHILE_SAVING = 3  # the step whose checkpoint is being written when both ranks are killed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unlearner(model_dir, out, **overrides):
    model, tok = ue.load_vlm(model_dir, dtype="bfloat16")
    return ue.Unlearner(model, tok, **{**SETTINGS, **overrides}, out_dir=out)


def _killed(model_dir, out):
    """Trains; once every rank has written its shards of step KILLED_WHILE_SAVING's checkpoint (not yet
    complete: no state.json, not renamed), rank 0 SIGKILLs both processes."""
    import torch.distributed.checkpoint as dcp

    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    real_save, calls = dcp.save, []

    def save_then_die(*args, **kwargs):
        result = real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == KILLED_WHILE_SAVING and dist.get_rank() == 0:
            for pid in pids[1:] + pids[:1]:  # the other rank first, then this one
                os.kill(pid, signal.SIGKILL)
        return result

    dcp.save = save_then_die
    _unlearner(model_dir, out).fit(FORGET, RETAIN)


def _resumed_and_straight(model_dir, out):
    """{refused: the error of a resume with another lr, steps: optimizer steps the resume made, resumed: its
    final weights, straight: the weights of an uninterrupted run without checkpoints}."""
    result = {}
    try:
        _unlearner(model_dir, out, lr=2e-2).fit(FORGET, RETAIN, resume=True)
    except ValueError as err:
        result["refused"] = str(err)
    run = _unlearner(model_dir, out)
    steps, real_step = [], run._optimizer_step
    run._optimizer_step = lambda optimizer: steps.append(1) or real_step(optimizer)
    run.fit(FORGET, RETAIN, resume=True)
    result.update(steps=len(steps), resumed=run.full_state_dict(), history=run.history)
    straight = _unlearner(model_dir, None, checkpoint_every=0)
    straight.fit(FORGET, RETAIN)
    result["straight"] = straight.full_state_dict()
    return result


def _worker(rank, world, port, model_dir, out, phase, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if phase == "killed":
            _killed(model_dir, out)
        else:
            result = _resumed_and_straight(model_dir, out)
            if rank == 0:
                torch.save(result, result_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo's threads can abort it on a loaded machine)


def test_fsdp_checkpoint_survives_kill_9_and_resumes_exactly(tiny_llava_dir, tmp_path):
    """Catches a checkpoint visible before it is complete, a resume that restarts from scratch, loses the optimizer
    moments, the fp32 masters or the reference values, or that accepts another run's checkpoint."""
    torch.set_num_threads(1)
    out, model_dir = str(tmp_path / "run"), str(tiny_llava_dir)
    with pytest.raises(mp.ProcessExitedException, match="signal"):
        mp.spawn(_worker, args=(2, _free_port(), model_dir, out, "killed", None), nprocs=2, join=True)
    ckpts = tmp_path / "run" / "checkpoints"
    names = sorted(os.listdir(ckpts))
    assert names == [f".tmp-step-{KILLED_WHILE_SAVING:06d}", "latest", "step-000001", "step-000002"], names
    assert (ckpts / "latest").read_text() == "step-000002"

    mp.spawn(_worker, args=(2, _free_port(), model_dir, out, "resume", str(tmp_path / "result.pt")), nprocs=2,
             join=True)
    result = torch.load(tmp_path / "result.pt")
    assert "belongs to another run" in result.get("refused", "") and "lr" in result["refused"]
    assert result["steps"] == SETTINGS["steps"] - 2, "the resume did not continue from step 2"
    assert [h["step"] for h in result["history"]] == list(range(1, SETTINGS["steps"] + 1))
    initial, _ = ue.load_vlm(model_dir, dtype="bfloat16")
    resumed, straight = result["resumed"], result["straight"]
    assert any(not torch.equal(straight[k], v) for k, v in initial.state_dict().items()), "nothing trained"
    differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
    assert sorted(os.listdir(ckpts)) == ["latest", "step-000004", "step-000005"]
