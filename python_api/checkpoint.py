"""Training checkpoints as safetensors + JSON (never pickle), written atomically; `latest` points at the
newest complete one, so a run killed at any moment resumes from its last checkpoint."""
import json
import os
import random

import torch
from safetensors.torch import load_file, save_file

from unlearn_engine.atomic import atomic_dir, write_text

LATEST = "latest"


def _flatten_optimizer(state_dict):
    tensors, plain = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, entry in state_dict["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
                plain["state"][str(idx)][key] = {"tensor": f"{idx}.{key}"}
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors, plain, device):
    state = {}
    for idx, entry in plain["state"].items():
        state[int(idx)] = {k: (tensors[v["tensor"]].to(device) if isinstance(v, dict) and "tensor" in v else v)
                           for k, v in entry.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(directory, step, named_params, optimizer, extra: dict):
    """directory/step-NNNNNN/{params,optimizer,rng}.safetensors + state.json, then directory/latest."""
    os.makedirs(directory, exist_ok=True)
    name = f"step-{step:06d}"
    final = os.path.join(directory, name)
    with atomic_dir(final) as tmp:
        save_file({n: p.detach().contiguous().cpu() for n, p in named_params}, os.path.join(tmp, "params.safetensors"))
        opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, os.path.join(tmp, "rng.safetensors"))
        state = dict(extra, step=step, optimizer=opt_plain, python_random=repr(random.getstate()))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f)
    write_text(os.path.join(directory, LATEST), name)
    return final


def load_latest(directory, named_params, optimizer, device):
    """Restores params, optimizer and RNG from the newest checkpoint; returns its state dict (or None)."""
    pointer = os.path.join(directory, LATEST)
    if not os.path.exists(pointer):
        return None
    path = os.path.join(directory, open(pointer).read().strip())
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    params = load_file(os.path.join(path, "params.safetensors"))
    with torch.no_grad():
        for name, p in named_params:
            if name not in params:
                raise ValueError(f"checkpoint {path} lacks parameter {name}: was it made with another setup?")
            p.copy_(params[name])
    optimizer.load_state_dict(_unflatten_optimizer(load_file(os.path.join(path, "optimizer.safetensors")),
                                                   state["optimizer"], device))
    torch.set_rng_state(load_file(os.path.join(path, "rng.safetensors"))["torch"])
    import ast

    random.setstate(ast.literal_eval(state["python_random"]))
    return state
