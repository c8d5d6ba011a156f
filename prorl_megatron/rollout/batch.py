"""Scored rollouts -> padded training tensors, and how a step's rows are split for training.

A row is one (prompt, response) sequence. Tensors of a :class:`TrainBatch` share their first
dimension N (rows). ``input_ids`` [N, S] are prompt + response, right-padded; the response
token ``j`` of a row is predicted at sequence position ``prompt_len - 1 + j``, which
``response_index`` [N, R] holds so that per-position logprobs [N, S-1] can be gathered into
per-response-token values [N, R] (``mask`` marks the R positions that are real tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from prorl_megatron.collect import shard_bounds
from prorl_megatron.models.forward import MicroBatch


@dataclass
class Sample:
    """One scored response to one prompt of a step."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # per response token, from the engine (sampling distribution)
    reward: float
    truncated: bool
    domain: str
    group: int  # the prompt's index among the step's prompts (the GRPO group)
    info: dict = field(default_factory=dict)


@dataclass
class TrainBatch:
    """Named row tensors (first dimension N); see the module docstring."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if value.shape[0] != len(self):
            raise ValueError(f"{name}: expected {len(self)} rows, got shape {list(value.shape)}")
        self.tensors[name] = value

    def rows(self, index: torch.Tensor | list[int]) -> "TrainBatch":
        """The given rows, with padding trimmed to the longest of them."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked = {k: v[index] for k, v in self.tensors.items()}
        seq = int((picked["prompt_len"] + picked["response_len"]).max()) if len(index) else 1
        resp = max(int(picked["response_len"].max()) if len(index) else 1, 1)
        for name, value in picked.items():
            if name == "input_ids":
                picked[name] = value[:, :seq]
            elif value.dim() == 2:
                picked[name] = value[:, :resp]
        picked["response_index"] = picked["response_index"].clamp(max=max(seq - 2, 0))
        return TrainBatch(picked)


def make_batch(samples: list[Sample], pad_id: int = 0) -> TrainBatch:
    """Pad ``samples`` into tensors: input_ids, prompt_len, response_len, response_index,
    mask (bool), rollout_logprobs (float32), rewards (float32), group_ids, truncated (bool)."""
    if not samples:
        raise ValueError("no samples to batch")
    n = len(samples)
    seq = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    resp = max(max(len(s.response_ids) for s in samples), 1)
    input_ids = torch.full((n, seq), pad_id, dtype=torch.long)
    rollout_lp = torch.zeros(n, resp)
    mask = torch.zeros(n, resp, dtype=torch.bool)
    prompt_len = torch.tensor([len(s.prompt_ids) for s in samples])
    response_len = torch.tensor([len(s.response_ids) for s in samples])
    for i, s in enumerate(samples):
        ids = s.prompt_ids + s.response_ids
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        r = len(s.response_ids)
        rollout_lp[i, :r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        mask[i, :r] = True
    # positions past a row's end point at its last real position (masked out anyway)
    offsets = torch.arange(resp).unsqueeze(0)
    response_index = (prompt_len.unsqueeze(1) - 1 + offsets).clamp(max=seq - 2).clamp(min=0)
    return TrainBatch({
        "input_ids": input_ids, "prompt_len": prompt_len, "response_len": response_len,
        "response_index": response_index, "mask": mask, "rollout_logprobs": rollout_lp,
        "rewards": torch.tensor([s.reward for s in samples], dtype=torch.float32),
        "group_ids": torch.tensor([s.group for s in samples], dtype=torch.long),
        "truncated": torch.tensor([s.truncated for s in samples], dtype=torch.bool),
    })


def response_values(per_position: torch.Tensor, response_index: torch.Tensor) -> torch.Tensor:
    """Gather per-position values [B, S-1] (e.g. logprobs) into per-response-token [B, R]."""
    return per_position.gather(1, response_index.to(per_position.device))


@dataclass
class MiniBatch:
    """One optimizer update: all of its rows (every DP rank's) and this rank's micro-batches."""

    rows: list[int]
    micro: list[list[int]]


def micro_batch_cost(lengths: Sequence[int], packed: bool = False) -> int:
    """Tokens a micro-batch computes: rows x the longest row (right-padded), or the sum of the
    lengths when the rows are packed into one sequence."""
    if not lengths:
        return 0
    return int(sum(lengths)) if packed else len(lengths) * int(max(lengths))


def token_micro_batches(rows: list[int], lengths: Sequence[int], max_tokens: int, packed: bool = False,
                        min_count: int = 1) -> list[list[int]]:
    """Group ``rows`` into micro-batches of similar length whose cost stays <= ``max_tokens``.

    ``lengths[r]`` is row ``r``'s length in tokens (prompt + response). Rows are sorted by
    length, longest first, and consecutive rows share a micro-batch while its
    :func:`micro_batch_cost` fits, so padding is only the gap between neighbours in that order.
    A row longer than ``max_tokens`` gets a micro-batch of its own. Then, while there are fewer
    than ``min_count`` micro-batches (e.g. the DP size: no rank without work), the costliest
    one with more than one row is split in two.
    """
    order = sorted(rows, key=lambda r: (-int(lengths[r]), r))
    groups: list[list[int]] = []
    for r in order:
        if groups and micro_batch_cost([lengths[i] for i in groups[-1]] + [lengths[r]], packed) <= max_tokens:
            groups[-1].append(r)
        else:
            groups.append([r])
    while len(groups) < min_count:
        splittable = [g for g in groups if len(g) > 1]
        if not splittable:
            break
        costliest = max(splittable, key=lambda g: micro_batch_cost([lengths[i] for i in g], packed))
        at = groups.index(costliest)
        half = (len(costliest) + 1) // 2
        groups[at: at + 1] = [costliest[:half], costliest[half:]]
    return groups


def balance_over_ranks(costs: Sequence[int], dp_size: int) -> list[list[int]]:
    """Indices of ``costs`` (micro-batches) per DP rank, balancing the sum of costs.

    Longest-processing-time first (each item, costliest first, to the least loaded rank; ties
    to the lower rank), then single moves and pairwise swaps between the most and the least
    loaded rank while they lower the most loaded rank's load. Deterministic: every rank
    computes the same assignment from the same costs.
    """
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for i in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        k = min(range(dp_size), key=lambda j: (load[j], j))
        ranks[k].append(i)
        load[k] += int(costs[i])
    for _ in range(4 * len(costs)):
        hi = max(range(dp_size), key=lambda j: (load[j], -j))
        lo = min(range(dp_size), key=lambda j: (load[j], j))
        gap = load[hi] - load[lo]
        best, best_delta = None, 0
        for a in ranks[hi]:  # move a: hi -> lo, or swap a <-> b; delta = how much hi's load drops
            delta = int(costs[a])
            if 0 < delta < gap and delta > best_delta:
                best, best_delta = (a, None), delta
            for b in ranks[lo]:
                delta = int(costs[a]) - int(costs[b])
                if 0 < delta < gap and delta > best_delta:
                    best, best_delta = (a, b), delta
        if best is None:
            break
        a, b = best
        ranks[hi].remove(a)
        ranks[lo].append(a)
        if b is not None:
            ranks[lo].remove(b)
            ranks[hi].append(b)
        load[hi] -= best_delta
        load[lo] += best_delta
    return [sorted(r, key=lambda i: (-int(costs[i]), i)) for r in ranks]


def training_plan(groups: list[list[int]], mini_batch_groups: int, dp_size: int, dp_rank: int,
                  micro_batch_size: int, lengths: Optional[Sequence[int]] = None,
                  max_tokens: Optional[int] = None, packed: bool = False) -> list[MiniBatch]:
    """Which rows this data-parallel rank trains on, mini-batch by mini-batch.

    ``groups``: the row indices of each kept prompt group, in order. Mini-batch ``m`` holds
    groups ``[m * G, (m + 1) * G)``. With a token budget (``max_tokens`` and each row's
    ``lengths``), its rows are grouped into micro-batches of similar length under the budget
    (:func:`token_micro_batches`; ``packed``: costed as packed sequences) and the micro-batches
    are spread over the DP ranks balancing tokens (:func:`balance_over_ranks`). Without one,
    its rows are split evenly by count over the ranks, in order, then into micro-batches of
    ``micro_batch_size`` rows. Either way the same plan serves the logprob pass and the update,
    so the first update sees exactly the old logprobs' micro-batches; the loss does not depend
    on the grouping (``aggregation_share`` normalises by the whole mini-batch).
    """
    if max_tokens is not None and lengths is None:
        raise ValueError("a token budget needs each row's length")
    plan = []
    for start in range(0, len(groups), mini_batch_groups):
        rows = [r for g in groups[start: start + mini_batch_groups] for r in g]
        if max_tokens is None:
            start_row, end_row = shard_bounds(len(rows), dp_size, dp_rank)
            mine = rows[start_row:end_row]
            micro = [mine[i: i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
        else:
            candidates = token_micro_batches(rows, lengths, max_tokens, packed, min_count=dp_size)
            costs = [micro_batch_cost([lengths[r] for r in m], packed) for m in candidates]
            micro = [candidates[i] for i in balance_over_ranks(costs, dp_size)[dp_rank]]
        plan.append(MiniBatch(rows, micro))
    return plan


def micro_batches(batch: TrainBatch, row_lists: Iterable[list[int]], device: torch.device,
                  fields: Optional[list[str]] = None) -> list[MicroBatch]:
    """One :class:`MicroBatch` per row list; every other tensor travels in ``extras``."""
    out = []
    for rows in row_lists:
        part = batch.rows(rows)
        names = fields if fields is not None else [k for k in part.tensors if k != "input_ids"]
        out.append(MicroBatch(part["input_ids"].to(device), {k: part[k].to(device) for k in names},
                              lengths=part["prompt_len"] + part["response_len"]))  # on the host: packing reads it
    return out
