"""Scale-out: 2 processes on the gloo backend (gradient-averaging data parallel, and FSDP2 fully_shard) end
with the weights of 1 process."""
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


def _run(model_dir, method, parallel, steps, out_file):
    model, tok = ue.load_vlm(model_dir, dtype="float32")
    unlearner = ue.Unlearner(model, tok, method=method, steps=steps, lr=3e-3, batch_size=4, parallel=parallel,
                             progress=False)
    unlearner.fit(FORGET, RETAIN)
    state = unlearner.full_state_dict()  # collective under FSDP: every rank calls it
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(state, out_file)


def _worker(rank, world, port, model_dir, method, parallel, steps, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _run(model_dir, method, parallel, steps, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method,parallel", [("gd", "ddp"), ("npo", "ddp"), ("gd", "fsdp"), ("npo", "fsdp")])
def test_two_processes_match_one(tiny_llava_dir, tmp_path, method, parallel):
    torch.set_num_threads(1)
    _run(str(tiny_llava_dir), method, parallel, 4, str(tmp_path / "single.pt"))
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_llava_dir), method, parallel, 4, str(tmp_path / "ddp.pt")),
             nprocs=2, join=True)
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    initial = ue.load_vlm(str(tiny_llava_dir), dtype="float32")[0].state_dict()
    assert single.keys() == ddp.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(single[k], initial[k]) for k in single), "training changed nothing"


def test_torchrun_cli_fsdp(tiny_llava_dir, tmp_path):
    """`torchrun --nproc_per_node 2 unlearn-engine unlearn --parallel fsdp` writes one plain model."""
    ue.write_jsonl(FORGET, str(tmp_path / "f.jsonl"))
    ue.write_jsonl(RETAIN, str(tmp_path / "r.jsonl"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "unlearn_engine.api.cli", "unlearn", "--model", str(tiny_llava_dir),
           "--forget", str(tmp_path / "f.jsonl"), "--retain", str(tmp_path / "r.jsonl"), "--method", "gd",
           "--steps", "3", "--lr", "3e-3", "--dtype", "float32", "--device", "cpu", "--parallel", "fsdp",
           "--out", str(tmp_path / "out"), "--no-progress", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    model, _ = ue.load_vlm(str(tmp_path / "out" / "model"), dtype="float32")
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())

