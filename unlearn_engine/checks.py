"""Argument checks shared by every op wrapper: each failure is a ValueError that names the argument,
what was expected and what was got."""
from typing import Sequence

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32,) + LOW_PRECISION  # what the fused kernels are compiled for


def fail(message: str):
    raise ValueError(message)


def require(condition: bool, message: str) -> None:
    if not condition:
        fail(message)


def check_tensor(t, name: str, *, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, floating: bool = False) -> None:
    require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        require(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None:
        require(t.dtype == dtype, f"{name} must have dtype {dtype}, got {t.dtype}")
    if floating:
        require(t.is_floating_point(), f"{name} must be a floating-point tensor, got {t.dtype}")
    if device is not None:
        require(t.device == device, f"{name} must be on {device} (where hidden is), got {t.device}")


def check_kernel_dtype(t: torch.Tensor, name: str) -> None:
    require(t.dtype in KERNEL_DTYPES, f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
