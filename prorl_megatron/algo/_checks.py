"""Argument checks shared by the algorithm functions: errors name the argument and the shape."""

from __future__ import annotations

import torch


def as_float32(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` as a float32 tensor (bf16/fp16 inputs are upcast; gradients flow through)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name}: expected a real tensor, got dtype {x.dtype}")
    return x.float() if x.dtype != torch.float32 else x


def check_shape(name: str, x: torch.Tensor, shape: tuple[int, ...], expected: str) -> None:
    """Raise ValueError unless ``x.shape == shape``; ``expected`` describes it, e.g. '[N, T]'."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {expected} = {list(shape)}, got {list(x.shape)}")


def check_ndim(name: str, x: torch.Tensor, ndim: int, expected: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected shape {expected}, got {list(x.shape)}")


def check_group_ids(group_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Validate ``group_ids`` [N] (integer) and return dense ids 0..G-1 (``inverse``)."""
    if not isinstance(group_ids, torch.Tensor):
        raise ValueError(f"group_ids: expected an int64 tensor, got {type(group_ids).__name__}")
    check_shape("group_ids", group_ids, (n,), "[N]")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise ValueError(f"group_ids: expected an integer tensor (int64), got dtype {group_ids.dtype}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse


def group_sums(values: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sum of ``values`` [N] and per-group count, both float32 [G]."""
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    sums = torch.zeros(num_groups, dtype=torch.float32, device=values.device).index_add(0, inverse, values)
    counts = torch.zeros(num_groups, dtype=torch.float32, device=values.device).index_add(
        0, inverse, torch.ones_like(values)
    )
    return sums, counts


def mask_as_float(mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Validate a [N, T] mask (bool or float 0/1 weights) and return it as float32."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a bool or float tensor, got {type(mask).__name__}")
    check_shape("mask", mask, shape, "[N, T]")
    return mask.to(torch.float32)
