"""Data-parallel unlearning: 2 processes on the gloo backend end with the weights of 1 process."""
import os
import socket

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


def _run(model_dir, method, steps, out_file):
    model, tok = ue.load_vlm(model_dir, dtype="float32")
    ue.Unlearner(model, tok, method=method, steps=steps, lr=3e-3, batch_size=4, progress=False).fit(FORGET, RETAIN)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out_file)


def _worker(rank, world, port, model_dir, method, steps, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _run(model_dir, method, steps, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["gd", "npo"])
def test_two_processes_match_one(tiny_llava_dir, tmp_path, method):
    torch.set_num_threads(1)
    _run(str(tiny_llava_dir), method, 4, str(tmp_path / "single.pt"))
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_llava_dir), method, 4, str(tmp_path / "ddp.pt")), nprocs=2,
             join=True)
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    initial = ue.load_vlm(str(tiny_llava_dir), dtype="float32")[0].state_dict()
    assert single.keys() == ddp.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(single[k], initial[k]) for k in single), "training changed nothing"
