"""The frozen reference model kept in host memory: `cpu_reference(model, device)` makes a copy whose weights
live on the CPU (pinned when `device` is CUDA) and are copied to `device` one module at a time, only while that
module runs, so between steps the reference holds no accelerator memory and during its forward at most one
module's weights (a decoder layer: about 0.4 GB at 7B; the LM head: 0.26 GB) are there.

The copy is made without a second device copy of the model: every parameter and buffer is cloned straight to the
CPU. The reference is only ever run under no_grad, so swapping its tensors in and out is safe.
"""
import copy

import torch

__all__ = ["cpu_reference", "stream_weights"]


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    host = t.detach().to("cpu", copy=True)
    return host.pin_memory() if pin else host


def cpu_reference(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A frozen (eval, no grad) copy of `model` held on the CPU that computes on `device` (see the module doc)."""
    device = torch.device(device)
    pin = device.type == "cuda"
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:  # tied weights stay tied: one host clone per tensor
            host = _host(t, pin)
            memo[id(t)] = torch.nn.Parameter(host, requires_grad=False) if isinstance(t, torch.nn.Parameter) else host
    reference = copy.deepcopy(model, memo)
    reference.eval().requires_grad_(False)
    stream_weights(reference, device)
    return reference


def stream_weights(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Hooks on every module that owns parameters or buffers: its own tensors are replaced by copies on `device`
    before its forward and the host ones put back after it (also when the forward raises, e.g. a hook that stops
    the forward at a layer). A model already on `device` gets no hooks."""
    device = torch.device(device)
    for module in model.modules():
        own = {**{("_parameters", n): t for n, t in module._parameters.items() if t is not None},
               **{("_buffers", n): t for n, t in module._buffers.items() if t is not None}}
        if not own or all(t.device == device for t in own.values()):
            continue

        def fetch(mod, args, kwargs, own=own):
            for (kind, name), t in own.items():
                moved = t.detach().to(device, non_blocking=True)
                getattr(mod, kind)[name] = torch.nn.Parameter(moved, False) if kind == "_parameters" else moved

        def release(mod, args, kwargs, output, own=own):
            for (kind, name), t in own.items():
                getattr(mod, kind)[name] = t

        module.register_forward_pre_hook(fetch, with_kwargs=True)
        module.register_forward_hook(release, with_kwargs=True, always_call=True)
    return model
