"""Checkpoints of a run sharded with FSDP2 (parallel='fsdp'), written and read by every rank together with
torch.distributed.checkpoint (DCP): each rank writes only its own shards of the fp32 masters and AdamW moments.

    directory/step-NNNNNN/.metadata, __<rank>_0.distcp   DCP's files: masters and optimizer moments, sharded
                          state.json                     as checkpoint.py's, plus each rank's RNG states and
                                                         forget-NLL cache (the divergence guard's, per rank)

The folder is written as directory/.tmp-step-NNNNNN and renamed to step-NNNNNN by rank 0 only after every rank's
shards, DCP's metadata and state.json are on disk, so a run killed at any moment (kill -9 included) leaves either
a complete checkpoint or a temporary folder that list_checkpoints ignores and the next save deletes. `latest` and
retention work as in checkpoint.py. The folder must be on a file system every rank sees.

Resume applies checkpoint.py's fingerprint check (a checkpoint of another run is refused, naming the differing
fields); a checkpoint whose state.json or DCP metadata is missing or unreadable is skipped with a warning. DCP's
`.metadata` is a pickle (torch's format; the tensors are read with weights_only): resume only your own runs.
"""
import ast
import json
import os
import random
import shutil

import torch
import torch.distributed as dist

from unlearn_engine.api.checkpoint import LATEST, list_checkpoints, newest_intact
from unlearn_engine.api.loading import CheckpointError
from unlearn_engine.atomic import write_text

__all__ = ["save_sharded", "find_sharded", "load_sharded"]


def _optimizer_tensors(named_masters, optimizer) -> dict:
    """{name: {state key: tensor}} of the optimizer's per-parameter state, keyed by the parameter's name (DTensor
    moments stay sharded; the scalar step is a plain tensor, the same on every rank)."""
    return {name: dict(optimizer.state[m]) for name, m in named_masters if optimizer.state.get(m)}


def _state_dict(named_masters, optimizer) -> dict:
    return {"masters": dict(named_masters), "optimizer": _optimizer_tensors(named_masters, optimizer)}


def _rank_state(extra_rank: dict) -> dict:
    return {"torch_rng": torch.get_rng_state().tolist(), "python_random": repr(random.getstate()), **extra_rank}


def save_sharded(directory: str, step: int, named_masters, optimizer, extra: dict, extra_rank: dict, *,
                 keep: int = 0) -> str:
    """Collective (every rank calls it): directory/step-NNNNNN written atomically, `latest` updated, then the
    checkpoints older than the newest `keep` deleted. `extra` goes to state.json (rank 0's); `extra_rank` is
    gathered from every rank into state.json's "ranks" list."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    name = f"step-{step:06d}"
    tmp, final = os.path.join(directory, ".tmp-" + name), os.path.join(directory, name)
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        for leftover in os.listdir(directory):  # a killed run's half-written or half-deleted folders
            if leftover.startswith((".tmp-", ".old-")) and os.path.isdir(os.path.join(directory, leftover)):
                shutil.rmtree(os.path.join(directory, leftover), ignore_errors=True)
        os.makedirs(tmp)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, _rank_state(extra_rank))  # also: the folder exists before any rank writes
    dcp.save(_state_dict(named_masters, optimizer), storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    if rank == 0:  # dcp.save returns once every rank's files and the metadata are written and synced
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(extra, step=step, ranks=ranks), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # visible only now, complete
        write_text(os.path.join(directory, LATEST), name)
        if keep:
            for _, old in list_checkpoints(directory)[keep:]:
                trash = os.path.join(directory, ".old-" + os.path.basename(old))
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
    dist.barrier()  # no rank goes on (or exits) before the checkpoint is complete
    return final


def find_sharded(directory: str, fingerprint: dict):
    """{"path", "state"} of the newest checkpoint of `directory` with a readable state.json and DCP metadata (every
    rank reads the same files, so every rank picks the same one), or None. ValueError when it belongs to another
    run; an unreadable one is skipped with a warning."""
    def read(path, state):
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CheckpointError(f"{os.path.join(path, '.metadata')} is missing (not a sharded checkpoint, or "
                                  "incomplete)")
        if len(state.get("ranks") or []) != dist.get_world_size():
            raise CheckpointError(f"{os.path.join(path, 'state.json')} has no state for each of the "
                                  f"{dist.get_world_size()} ranks")
        return {"path": path, "state": state}

    return newest_intact(directory, fingerprint, read)


@torch.no_grad()
def _init_optimizer_state(named_masters, optimizer) -> None:
    """Creates the optimizer's state (what it makes at its first step) so DCP can load into it in place: one step
    per parameter on a zero gradient with lr 0, which leaves the parameter unchanged."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    try:
        for _, m in named_masters:
            m.grad = torch.zeros_like(m)
            optimizer.step()
            m.grad = None
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr


def load_sharded(found: dict, named_masters, optimizer) -> dict:
    """Collective: loads a checkpoint found by find_sharded into the masters, the optimizer state and this rank's
    RNGs; returns its state (state.json) with this rank's own entry as state["rank"]."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(found["path"])
    try:
        saved = reader.read_metadata().state_dict_metadata
    except Exception as err:
        raise CheckpointError(f"{found['path']}: unreadable DCP metadata: {err}") from None
    # the parameters that had optimizer state when it was saved get it now (a parameter never stepped has none)
    stepped = {name for name, _ in named_masters if any(k.startswith(f"optimizer.{name}.") for k in saved)}
    _init_optimizer_state([(n, m) for n, m in named_masters if n in stepped], optimizer)
    target = _state_dict(named_masters, optimizer)
    try:
        dcp.load(target, storage_reader=reader)
    except Exception as err:  # DCP wraps each rank's failure (missing keys, shape mismatch, truncated file)
        raise CheckpointError(f"{found['path']}: cannot load the sharded checkpoint: {err}") from None
    state = found["state"]
    mine = state["ranks"][dist.get_rank()]
    torch.set_rng_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
    random.setstate(ast.literal_eval(mine["python_random"]))
    return {**state, "rank": mine}
