"""Splitting a step's work over the ranks of the job and gathering the results everywhere."""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist


def shard_bounds(count: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of piece ``index`` when ``count`` items are cut into ``parts`` contiguous,
    near-equal pieces (sizes differ by at most one)."""
    size, extra = divmod(count, parts)
    start = index * size + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


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
