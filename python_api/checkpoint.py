"""Training checkpoints as safetensors + JSON (never pickle), written atomically; `latest` points at the
newest complete one, so a run killed at any moment resumes from its last checkpoint.

    directory/step-NNNNNN/params.safetensors     the trained parameters' fp32 master copies
                          optimizer.safetensors  the optimizer's tensor state (AdamW moments, fp32)
                          rng.safetensors        the torch RNG state
                          state.json             step, run fingerprint, optimizer scalars, history, caches

A checkpoint is resumed only by the run it belongs to: its fingerprint (what decides the trajectory) must equal
the resuming run's, or a ValueError names the differing fields. Every tensor read back is checked for its exact
name, shape and dtype before anything is copied (never broadcast); an unreadable, truncated or inconsistent
checkpoint raises CheckpointError naming the file, and resume falls back to the newest intact one with a warning.
Retention keeps the newest `keep` checkpoints, deleting older ones only after the newer one is complete.
"""
import ast
import json
import os
import random
import re
import shutil
import warnings

import torch
from safetensors.torch import load_file, save_file

from unlearn_engine.api.loading import CheckpointError
from unlearn_engine.atomic import atomic_dir, write_text

LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
__all__ = ["save_checkpoint", "find_checkpoint", "apply_checkpoint", "list_checkpoints", "read_state",
           "fingerprint_mismatch", "check_same_run"]


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


def list_checkpoints(directory):
    """[(step, path)] of the complete checkpoints in `directory`, newest first (temporary folders are ignored)."""
    if not directory or not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, name)) for name in os.listdir(directory)
             if (m := STEP_DIR.match(name)) and os.path.isdir(os.path.join(directory, name))]
    return sorted(found, reverse=True)


def save_checkpoint(directory, step, named_params, optimizer, extra: dict, *, keep: int = 0):
    """directory/step-NNNNNN/{params,optimizer,rng}.safetensors + state.json, then directory/latest, then the
    checkpoints older than the newest `keep` are deleted (keep=0: all are kept)."""
    os.makedirs(directory, exist_ok=True)
    for leftover in os.listdir(directory):  # half-written or half-deleted folders of a killed run (one writer)
        if leftover.startswith((".tmp-", ".old-")) and os.path.isdir(os.path.join(directory, leftover)):
            shutil.rmtree(os.path.join(directory, leftover), ignore_errors=True)
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
    if keep:  # only now that the new checkpoint is complete and `latest` names it
        for _, old in list_checkpoints(directory)[keep:]:
            # renamed first: a run killed while deleting leaves no half checkpoint under a step-* name
            trash = os.path.join(directory, ".old-" + os.path.basename(old))
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    return final


def fingerprint_mismatch(saved: dict | None, current: dict) -> list:
    """Names (with both values) of the fingerprint fields that differ; [] when the run is the same."""
    if not isinstance(saved, dict):
        return ["fingerprint (the checkpoint has none: made by an older version or another tool)"]
    return [f"{k} (checkpoint {saved.get(k, '<absent>')!r}, this run {current.get(k, '<absent>')!r})"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def check_same_run(path: str, saved: dict | None, current: dict, *, known_only: bool = False) -> None:
    """ValueError naming the differing fields when checkpoint `path`, whose fingerprint is `saved`, belongs to
    another run than `current`; known_only compares just the fields `current` has (those known before the model
    is loaded)."""
    if known_only and isinstance(saved, dict):
        saved = {k: v for k, v in saved.items() if k in current}
    differ = fingerprint_mismatch(saved, current)
    if differ:
        raise ValueError(f"checkpoint {path} belongs to another run; differing: {'; '.join(differ)} "
                         "(resume with the same settings, or use another output folder)")


def _tensors(path, name):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing (incomplete checkpoint)")
    try:
        return load_file(file)
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def _check(file, name, tensor, shape, dtype):
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, "
                              f"expected {tuple(shape)} and {dtype}")


def _expected_state(optimizer, i, p, key):
    """(shape, dtype) the optimizer keeps for state `key` of its i-th parameter."""
    if key == "step":
        return (), torch.float32
    if getattr(optimizer, "compact_state", False):  # MaskedOptimizer: state for the selected elements only
        return (optimizer.mask.count(i),), p.dtype
    return tuple(p.shape), getattr(optimizer, "state_dtype", p.dtype)  # ParamAdamW may keep bf16 moments


def read_state(path: str) -> dict:
    """A checkpoint's state.json, checked (CheckpointError naming the file when missing or malformed)."""
    state_file = os.path.join(path, "state.json")
    try:
        with open(state_file) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    except FileNotFoundError:
        raise CheckpointError(f"{state_file} is missing (incomplete checkpoint)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_file} is not a valid checkpoint state ({err})") from None
    return state


def _read(path, state, named_params, optimizer):
    """The tensors of one checkpoint, read and checked against the run's parameters and optimizer."""
    state_file = os.path.join(path, "state.json")
    params_file = os.path.join(path, "params.safetensors")
    params = _tensors(path, "params.safetensors")
    names = [n for n, _ in named_params]
    missing, unexpected = sorted(set(names) - set(params)), sorted(set(params) - set(names))
    if missing or unexpected:
        raise CheckpointError(f"{params_file}: missing parameter(s) {missing[:5]}, unexpected {unexpected[:5]}")
    for n, p in named_params:
        _check(params_file, n, params[n], p.shape, p.dtype)
    opt_file = os.path.join(path, "optimizer.safetensors")
    opt_tensors = _tensors(path, "optimizer.safetensors")
    plain = state.get("optimizer")
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        groups_ok = [len(g["params"]) for g in plain["param_groups"]] == [len(g["params"]) for g in
                                                                          optimizer.param_groups]
        entries = {int(i): e for i, e in plain["state"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{state_file}: malformed optimizer state") from None
    if not groups_ok or any(not 0 <= i < len(ordered) for i in entries):
        raise CheckpointError(f"{state_file}: the optimizer state does not match this run's parameter groups")
    state_dict = {"param_groups": plain["param_groups"], "state": {}}
    for i, entry in entries.items():
        state_dict["state"][i] = {}
        for key, value in entry.items():
            if isinstance(value, dict) and "tensor" in value:
                if value["tensor"] not in opt_tensors:
                    raise CheckpointError(f"{opt_file} lacks tensor {value['tensor']}")
                value = opt_tensors[value["tensor"]]
                _check(opt_file, f"{i}.{key}", value, *_expected_state(optimizer, i, ordered[i], key))
            state_dict["state"][i][key] = value
    rng = _tensors(path, "rng.safetensors").get("torch")
    reference = torch.get_rng_state()
    if rng is None:
        raise CheckpointError(f"{os.path.join(path, 'rng.safetensors')} lacks tensor torch")
    _check(os.path.join(path, "rng.safetensors"), "torch", rng, reference.shape, reference.dtype)
    try:
        python_random = ast.literal_eval(state["python_random"])
    except (KeyError, ValueError, SyntaxError):
        raise CheckpointError(f"{state_file}: malformed python_random state") from None
    return {"path": path, "state": state, "params": params, "optimizer": state_dict, "rng": rng,
            "python_random": python_random}


def find_checkpoint(directory, named_params, optimizer, fingerprint: dict | None = None):
    """The newest intact checkpoint of `directory`, read and checked but not applied (None when there is none).

    A checkpoint of another run (fingerprint differs) raises ValueError naming the differing fields; an
    unreadable one is skipped with a warning naming the file, and the next older one is tried."""
    return newest_intact(directory, fingerprint, lambda path, state: _read(path, state, named_params, optimizer))


def newest_intact(directory, fingerprint: dict | None, read):
    """read(path, state) of the newest checkpoint of `directory` whose state.json and read() raise no
    CheckpointError (None when there is none): a broken one is skipped with a warning and the next older one tried;
    another run's checkpoint (fingerprint differs) raises ValueError. One walk for both checkpoint formats."""
    problems = []
    for _, path in list_checkpoints(directory):
        try:
            state = read_state(path)
            if fingerprint is not None:  # another run's checkpoint is refused, not skipped
                check_same_run(path, state.get("fingerprint"), fingerprint)
            return read(path, state)
        except CheckpointError as err:
            warnings.warn(f"{err}; falling back to an older checkpoint", stacklevel=3)
            problems.append(str(err))
    if problems:
        raise CheckpointError(f"no intact checkpoint in {directory}: {' | '.join(problems)}")
    return None


@torch.no_grad()
def apply_checkpoint(ckpt, named_params, optimizer, device):
    """Copies a checkpoint found by find_checkpoint into the parameters, the optimizer and the RNGs."""
    for name, p in named_params:
        p.copy_(ckpt["params"][name])  # shapes and dtypes were checked: nothing broadcasts
    state_dict = {"param_groups": ckpt["optimizer"]["param_groups"],
                  "state": {i: {k: (v.to(device) if torch.is_tensor(v) and k != "step" else v) for k, v in e.items()}
                            for i, e in ckpt["optimizer"]["state"].items()}}
    optimizer.load_state_dict(state_dict)
    torch.set_rng_state(ckpt["rng"])
    random.setstate(ckpt["python_random"])
    return ckpt["state"]

