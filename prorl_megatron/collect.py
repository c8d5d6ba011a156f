"""Splitting a step's work over the ranks of the job and gathering the results everywhere.

Collectives on tensors follow one rule: the tensor lives on :func:`collective_device`, the
device of this process's layout (the current CUDA device on a GPU run, where the default
group's NCCL backend carries it; the CPU under gloo). Tensors that come from the model (its
parameters, activations, logits) are already there; bookkeeping tensors (metrics, flags)
are built with ``device=collective_device()``. tests/test_collectives.py checks every call
site in the package.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def shard_bounds(count: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of piece ``index`` when ``count`` items are cut into ``parts`` contiguous,
    near-equal pieces (sizes differ by at most one)."""
    size, extra = divmod(count, parts)
    start = index * size + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


def collective_device_type(backend_config: Optional[str], cuda_available: bool) -> str:
    """``"cuda"`` or ``"cpu"``: where tensor collectives go, given the group's backend config
    (``torch.distributed.get_backend_config``, e.g. ``"cpu:gloo,cuda:nccl"``; None when
    torch.distributed is not initialised) and whether CUDA is available.

    CUDA when it is available and the group has a GPU backend for it (NCCL; gloo's CUDA
    path is not one); the CPU otherwise.
    """
    if not cuda_available:
        return "cpu"
    if backend_config is None:
        return "cuda"
    config = backend_config.lower()
    backends = dict(pair.split(":", 1) for pair in config.split(",")) if ":" in config else {"cuda": config}
    return "cuda" if backends.get("cuda", "gloo") != "gloo" else "cpu"


def collective_device(group: Optional[Any] = None) -> torch.device:
    """The device a tensor collective on ``group`` (default: the world) must use: this
    process's current CUDA device on a GPU run, the CPU otherwise (see the module's rule)."""
    config = dist.get_backend_config(group) if dist.is_initialized() else None
    if collective_device_type(config, torch.cuda.is_available()) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, group: Optional[Any] = None) -> bool:
    """Collective: True on every rank of ``group`` when ``flag`` is True on any of them."""
    if not dist.is_initialized():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def gather_lists(local: list[Any], group: Optional[Any] = None) -> list[list[Any]]:
    """Every rank's ``local`` list (picklable items), in rank order, on every rank."""
    if not dist.is_initialized():
        return [local]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, local, group=group)
    return out


def map_over_world(items: list[Any], fn) -> list[Any]:
    """``fn(piece)`` on this rank's piece of ``items``; the concatenated results, everywhere."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    start, end = shard_bounds(len(items), world, rank)
    mine = fn(items[start:end]) if end > start else []
    return [x for part in gather_lists(list(mine)) for x in part]
