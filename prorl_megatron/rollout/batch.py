"""Scored rollouts -> padded training tensors, and how a step's rows are split for training.

A row is one (prompt, response) sequence. Tensors of a :class:`TrainBatch` share their first
dimension N (rows). ``input_ids`` [N, S] are prompt + response, right-padded; the response
token ``j`` of a row is predicted at sequence position ``prompt_len - 1 + j``, which
``response_index`` [N, R] holds so that per-position logprobs [N, S-1] can be gathered into
per-response-token values [N, R] (``mask`` marks the R positions that are real tokens).
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from prorl_megatron.collect import shard_bounds
from prorl_megatron.models.forward import MicroBatch, padded_lengths


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


@dataclass(frozen=True)
class CostModel:
    """What the planner balances over DP ranks, and how it counts a packed micro-batch's tokens.

    Compute: a sequence of ``L`` tokens costs ``linear * L + quadratic * L**2``: the matmuls every
    token goes through, and causal attention (QK^T and AV) over its sequence. Only the ratio
    ``quadratic / linear`` shapes the plan. :func:`prorl_megatron.plan.cost_model` derives both
    from the model's shape (forward FLOPs); coefficients fitted to measured micro-batch times can
    replace them there without changing the planner. Tokens: a packed micro-batch rounds each
    sequence up to ``sequence_multiple`` tokens and the whole row up to ``row_multiple``
    (:func:`~prorl_megatron.models.forward.packing_multiples`). The defaults count plain tokens.
    """

    linear: float = 1.0
    quadratic: float = 0.0
    sequence_multiple: int = 1
    row_multiple: int = 1

    def __post_init__(self) -> None:
        if not (self.linear > 0 and self.quadratic >= 0 and self.sequence_multiple >= 1 and self.row_multiple >= 1):
            raise ValueError(f"{self}: needs linear > 0, quadratic >= 0 and multiples >= 1")

    def sequence_cost(self, length: int) -> int:
        """One sequence's cost in token equivalents (units of ``linear``), rounded to an integer so
        that sums of costs are exact: the same on every rank, in any order."""
        return int(length) + round(self.quadratic / self.linear * int(length) ** 2)


TOKENS = CostModel()


def micro_batch_tokens(lengths: Sequence[int], packed: bool = False, cost: CostModel = TOKENS) -> int:
    """Tokens a micro-batch holds, what the token budget bounds: rows x the longest row
    (right-padded), or the packed row's length with ``cost``'s packing multiples."""
    if not lengths:
        return 0
    if packed:
        return sum(padded_lengths(lengths, cost.sequence_multiple, cost.row_multiple))
    return len(lengths) * int(max(lengths))


def micro_batch_cost(lengths: Sequence[int], packed: bool = False, cost: CostModel = TOKENS) -> int:
    """Compute of a micro-batch in token equivalents (:meth:`CostModel.sequence_cost`): every
    right-padded row at the longest row's length, or each packed sequence at its padded length.
    With the default cost model: its tokens, as :func:`micro_batch_tokens`."""
    if not lengths:
        return 0
    if packed:
        return sum(cost.sequence_cost(n) for n in padded_lengths(lengths, cost.sequence_multiple, cost.row_multiple))
    return len(lengths) * cost.sequence_cost(max(lengths))


def token_micro_batches(rows: list[int], lengths: Sequence[int], max_tokens: int, packed: bool = False,
                        cost: CostModel = TOKENS) -> list[list[int]]:
    """Group ``rows`` into micro-batches whose :func:`micro_batch_tokens` stay <= ``max_tokens``.

    ``lengths[r]`` is row ``r``'s length in tokens (prompt + response). Rows are taken longest
    first (ties: lower row). Right-padded, consecutive rows share a micro-batch while it fits, so
    padding is only the gap between neighbours in that order. Packed (no padding between rows),
    each row goes to the fullest micro-batch it fits (best fit decreasing: few micro-batches).
    A row that alone exceeds ``max_tokens`` gets a micro-batch of its own.
    """
    order = sorted(rows, key=lambda r: (-int(lengths[r]), r))
    groups: list[list[int]] = []
    if not packed:
        for r in order:  # longest first: a micro-batch's first row is its longest
            if groups and (len(groups[-1]) + 1) * int(lengths[groups[-1][0]]) <= max_tokens:
                groups[-1].append(r)
            else:
                groups.append([r])
        return groups
    # the packed row fits iff its sequences' padded sum fits the largest row multiple under the budget
    capacity = max_tokens // cost.row_multiple * cost.row_multiple
    needs = padded_lengths([lengths[r] for r in order], cost.sequence_multiple)
    room: list[tuple[int, int]] = []  # (tokens left, micro-batch), ascending
    for r, need in zip(order, needs):
        at = bisect.bisect_left(room, (need, -1))
        if at < len(room):
            left, index = room.pop(at)
            groups[index].append(r)
        else:
            left, index = capacity, len(groups)
            groups.append([r])
        if left - need > 0:
            bisect.insort(room, (left - need, index))
    return groups


def balance_over_ranks(costs: Sequence[int], dp_size: int) -> list[list[int]]:
    """Indices of ``costs`` (integers) per DP rank, balancing the sum of costs.

    Longest processing time first: each item, costliest first (ties: lower index), goes to the
    least loaded rank (ties: lower rank), through a heap: O(n log dp). Then :func:`_exchange`
    moves and swaps items between the most and the least loaded rank, which never raises the
    most loaded rank's load, so Graham's bound for greedy assignment still holds: with costs
    ``c_1 >= c_2 >= ...``, the most loaded rank carries at most ``max(c_1, mean + (1 - 1/dp) *
    c_{dp+1})`` (a rank with two items or more got its last one after the first ``dp`` items).
    Deterministic: every rank computes the same assignment from the same costs.
    """
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    heap = [(0, k) for k in range(dp_size)]  # (load, rank): a valid heap as it stands
    for i in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        load, k = heap[0]
        ranks[k].append(i)
        heapq.heapreplace(heap, (load + int(costs[i]), k))
    loads = [0] * dp_size
    for load, k in heap:
        loads[k] = load
    _exchange([int(c) for c in costs], ranks, loads, rounds=2 * dp_size)
    return ranks


def _exchange(costs: list[int], ranks: list[list[int]], loads: list[int], rounds: int) -> None:
    """Up to ``rounds`` times, the move (an item from the most to the least loaded rank) or swap
    (one item each way) that brings the two closest to their mean, while one lowers the larger
    of the two; in place. The most loaded rank's load never rises."""
    for _ in range(rounds):
        hi = max(range(len(loads)), key=loads.__getitem__)  # ties: the lowest rank
        lo = min(range(len(loads)), key=loads.__getitem__)
        gap = loads[hi] - loads[lo]
        if gap < 2:  # no integer shift lies strictly between 0 and the gap
            return
        pool = sorted((costs[b], b) for b in ranks[lo])
        best, best_miss = None, gap  # a shift d between the two lowers the larger iff 0 < d < gap
        for a in ranks[hi]:
            at = bisect.bisect_left(pool, (costs[a] - gap // 2, -1))  # swaps with a shift near gap / 2
            for cost_b, b in [(0, None)] + pool[max(at - 1, 0): at + 1]:
                shift = costs[a] - cost_b
                if 0 < shift < gap and abs(gap - 2 * shift) < best_miss:
                    best, best_miss = (a, b, shift), abs(gap - 2 * shift)
        if best is None:
            return
        a, b, shift = best
        ranks[hi].remove(a)
        ranks[lo].append(a)
        if b is not None:
            ranks[lo].remove(b)
            ranks[hi].append(b)
        loads[hi] -= shift
        loads[lo] += shift


def _split_moves(plan: list[list[list[int]]], row_cost: dict[int, int], rounds: int) -> None:
    """Up to ``rounds`` times, split a right-padded micro-batch of the most loaded rank in two and
    give the shorter rows to the least loaded rank, where that lowers the larger of the two loads;
    in place. ``plan[rank][micro-batch]`` lists rows longest first, so a micro-batch ``m`` costs
    ``len(m) * row_cost[m[0]]``; splitting never adds padding."""
    loads = [sum(len(m) * row_cost[m[0]] for m in micro) for micro in plan]
    for _ in range(rounds):
        hi = max(range(len(loads)), key=loads.__getitem__)  # ties: the lowest rank
        lo = min(range(len(loads)), key=loads.__getitem__)
        best, best_load = None, loads[hi]
        for m, rows in enumerate(plan[hi]):
            whole = len(rows) * row_cost[rows[0]]
            for at in range(1, len(rows)):  # rows[:at] stay, rows[at:] go
                tail = (len(rows) - at) * row_cost[rows[at]]
                larger = max(loads[hi] - whole + at * row_cost[rows[0]], loads[lo] + tail)
                if larger < best_load:
                    best, best_load = (m, at, whole - at * row_cost[rows[0]], tail), larger
        if best is None:
            return
        m, at, drop, tail = best
        plan[lo].append(plan[hi][m][at:])
        plan[hi][m] = plan[hi][m][:at]
        loads[hi] -= drop
        loads[lo] += tail


def rank_micro_batches(rows: list[int], lengths: Sequence[int], dp_size: int, max_tokens: int,
                       packed: bool = False, cost: CostModel = TOKENS) -> list[list[list[int]]]:
    """Every DP rank's micro-batches of one mini-batch's ``rows``: ``[dp_size][micro-batch][row]``.

    Rows first: the rows are spread over the ranks by :func:`balance_over_ranks` on their
    :meth:`CostModel.sequence_cost` (each at its padded length when packed), then each rank's
    rows are grouped under the budget by :func:`token_micro_batches`. Packed, a rank's cost is
    the sum of its rows' (up to its micro-batches' tail padding), so the ranks are as balanced
    as the rows can make them. Right-padded, a rank's rows are far apart in length (a padding
    cost), so micro-batches first is also tried: all rows grouped by length, the micro-batches
    spread over the ranks by :func:`micro_batch_cost`, then split between the most and the least
    loaded rank (:func:`_split_moves`); the plan whose slowest rank costs less wins (rows first
    where equal). Every rank has work when there are at least ``dp_size`` rows.
    """
    multiple = cost.sequence_multiple if packed else 1
    row_cost = dict(zip(rows, map(cost.sequence_cost, padded_lengths([lengths[r] for r in rows], multiple))))
    by_rows = [token_micro_batches([rows[i] for i in mine], lengths, max_tokens, packed, cost)
               for mine in balance_over_ranks([row_cost[r] for r in rows], dp_size)]
    candidates = [] if packed else token_micro_batches(rows, lengths, max_tokens)
    if len(candidates) < dp_size:
        return by_rows
    batch_costs = [len(m) * row_cost[m[0]] for m in candidates]  # longest first: every row padded to m[0]
    by_batches = [[candidates[i] for i in mine] for mine in balance_over_ranks(batch_costs, dp_size)]
    _split_moves(by_batches, row_cost, rounds=2 * dp_size)

    def slowest(plan: list[list[list[int]]]) -> int:
        return max(sum(len(m) * row_cost[m[0]] for m in micro) for micro in plan)

    return by_batches if slowest(by_batches) < slowest(by_rows) else by_rows


def training_plan(groups: list[list[int]], mini_batch_groups: int, dp_size: int, dp_rank: int,
                  micro_batch_size: int, lengths: Optional[Sequence[int]] = None,
                  max_tokens: Optional[int] = None, packed: bool = False,
                  cost: CostModel = TOKENS) -> list[MiniBatch]:
    """Which rows this data-parallel rank trains on, mini-batch by mini-batch.

    ``groups``: the row indices of each kept prompt group, in order. Mini-batch ``m`` holds
    groups ``[m * G, (m + 1) * G)``. With a token budget (``max_tokens`` and each row's
    ``lengths``), its rows are spread over the DP ranks balancing ``cost`` and each rank's rows
    grouped into micro-batches under the budget (:func:`rank_micro_batches`; ``packed``: as
    packed sequences). Every rank computes the whole plan, the same everywhere. Without a
    budget, its rows are split evenly by count over the ranks, in order, then into micro-batches
    of ``micro_batch_size`` rows. Either way the same plan serves the logprob pass and the
    update, so the first update sees exactly the old logprobs' micro-batches; the loss does not
    depend on the grouping (``aggregation_share`` normalises by the whole mini-batch).
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
            micro = rank_micro_batches(rows, lengths, dp_size, max_tokens, packed, cost)[dp_rank]
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
