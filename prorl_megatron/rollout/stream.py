"""A step's samples from a stream of requests: generation that does not wait for rounds.

The engine is fed prompts as it goes (vLLM's request-level API: :meth:`RolloutEngine.submit`,
:meth:`~RolloutEngine.advance`, :meth:`~RolloutEngine.abort`); each prompt's group of
``rollout.n`` samples is scored as soon as it is complete; groups whose rewards are not all equal
(dynamic sampling) fill the step's batch of ``train.prompts_per_step`` groups.

When prompts are drawn (``rollout.overdraw``):

- ``0`` (the default): in waves, as the rounds of dynamic sampling always were — the first wave
  holds ``train.prompts_per_step`` prompts, each next one what is still missing over the keep
  rate so far (at most a full wave), drawn once every group of the previous wave is complete;
  at most ``algo.max_sampling_rounds`` waves. The batch is the first groups with signal in draw
  order; every drawn group completes. Requests, seeds and order are the rounds', so the samples
  are the same as generating round by round;
- ``x > 0``: ahead of need — whenever the groups in flight are not expected to bring ``1 + x``
  times what is still missing (at the keep rate so far), more prompts are drawn at once, up to
  ``algo.max_prompts_per_step``. The batch is the first groups with signal to *complete*; the
  step ends as soon as it is full, without waiting for the slowest samples, and what is still
  in flight is aborted (``rollout.partial: abort``).

Every (step, slot, sample) has its own seed (prorl_megatron/seeds.py; a wave's prompt ``i`` is
slot ``wave * prompts_per_step + i``, a drawn-ahead prompt's slot is its draw position). With
several engine replicas (engine data parallel), a wave is split into contiguous shares as
``generate_global`` splits a round, every rank runs its replica's engine step by step, and the
finished groups are gathered on every rank after each engine step: every rank decides the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from prorl_megatron.algo import keep_informative_groups
from prorl_megatron.collect import gather_lists, map_over_world, shard_bounds
from prorl_megatron.rewards.pool import ScoreRequest
from prorl_megatron.rollout.engine import Request, Rollout
from prorl_megatron.seeds import request_seed


def score_rollouts(pool: Any, prompts: list[Any], rollouts: list[list[Rollout]]) -> list[list[float]]:
    """Rewards [prompt][sample] of ``rollouts`` (per prompt: its samples), scored by every rank's
    reward pool in parallel (collective). ``prompts``: encoded prompts (``row`` and ``opened_think``)."""
    requests = [ScoreRequest(p.row.domain, r.text or "", p.row.ground_truth, p.opened_think)
                for p, samples in zip(prompts, rollouts) for r in samples]
    flat = map_over_world(requests, lambda part: [s.reward for s in pool.score(part)])
    out, i = [], 0
    for samples in rollouts:
        out.append(flat[i: i + len(samples)])
        i += len(samples)
    return out


@dataclass
class Group:
    """One drawn prompt's group, from its draw to its scores."""

    prompt: Any  # EncodedPrompt
    slot: int  # its seed slot in the step
    order: int  # its draw position in the step
    samples: Optional[list[Rollout]] = None  # when complete
    rewards: Optional[list[float]] = None  # when scored
    informative: bool = False  # its rewards are not all equal (or dynamic sampling is off)
    done_at: int = -1  # completion position in the step (the batch's order when drawing ahead)


@dataclass(frozen=True)
class StreamSettings:
    """What a step's stream needs of the recipe."""

    target: int  # train.prompts_per_step: groups the batch holds
    n: int  # rollout.n
    max_tokens: int  # rollout.max_response_tokens
    dynamic: bool  # algo.dynamic_sampling
    max_waves: int  # algo.max_sampling_rounds (waves without drawing ahead)
    max_prompts: int  # algo.max_prompts_per_step (its resolved value)
    overdraw: float  # rollout.overdraw

    @classmethod
    def of(cls, recipe: Any) -> "StreamSettings":
        return cls(target=recipe.train.prompts_per_step, n=recipe.rollout.n,
                   max_tokens=recipe.rollout.max_response_tokens, dynamic=recipe.algo.dynamic_sampling,
                   max_waves=recipe.algo.max_sampling_rounds if recipe.algo.dynamic_sampling else 1,
                   max_prompts=recipe.algo.prompts_cap(recipe.train.prompts_per_step)
                   if recipe.algo.dynamic_sampling else recipe.train.prompts_per_step,
                   overdraw=recipe.rollout.overdraw)


@dataclass
class StreamResult:
    """What the step's stream produced: the batch's groups (in batch order), every complete
    group (for the metrics), and counts."""

    batch: list[Group]
    complete: list[Group]
    drawn: int
    waves: int
    aborted: int  # groups still in flight when the batch was full


class StepStream:
    """The groups of one step, streamed through ``engine`` (collective: every rank runs it alike).

    ``draw(count)``: the next ``count`` encoded prompts of the data; ``score(prompts, rollouts)``:
    their rewards (collective, e.g. :func:`score_rollouts`); ``base_seed``: the step's first seed
    (:func:`~prorl_megatron.seeds.step_base_seed`); ``check()``: a collective check after every
    engine step that raises to stop at once (a stop signal: the step is redone after the resume);
    whatever leaves :meth:`run` early aborts what is in flight. ``timer``: a
    :class:`~prorl_megatron.metrics.PhaseTimer`, the engine's steps timed as ``rollout``.
    """

    def __init__(self, engine: Any, settings: StreamSettings, base_seed: int,
                 draw: Callable[[int], list[Any]], score: Callable[[list[Any], list[list[Rollout]]], list[list[float]]],
                 check: Callable[[], None], timer: Any) -> None:
        self.engine, self.cfg, self.base_seed = engine, settings, base_seed
        self.draw, self.score, self.check, self.timer = draw, score, check, timer
        self.groups: list[Group] = []
        self.waves = 0
        self.completed = 0

    # ---- accounting ----------------------------------------------------------------------

    @property
    def in_flight(self) -> list[Group]:
        return [g for g in self.groups if g.rewards is None]

    @property
    def kept(self) -> list[Group]:
        """The groups with signal so far, in batch order (draw order for waves, completion order
        when drawing ahead)."""
        chosen = [g for g in self.groups if g.rewards is not None and g.informative]
        return chosen if self.cfg.overdraw == 0 else sorted(chosen, key=lambda g: g.done_at)

    def keep_rate(self) -> float:
        """Groups with signal over groups scored (today's rounds: over groups drawn); 1 at first."""
        scored = [g for g in self.groups if g.rewards is not None] if self.cfg.overdraw else self.groups
        return len([g for g in scored if g.informative]) / len(scored) if scored else 1.0

    # ---- drawing ----------------------------------------------------------------------------

    def wanted(self) -> int:
        """How many prompts to draw now (0: none)."""
        cfg, missing = self.cfg, self.cfg.target - len(self.kept)
        room = cfg.max_prompts - len(self.groups)
        if missing <= 0 or room <= 0:
            return 0
        rate = max(self.keep_rate(), 0.1)
        if cfg.overdraw == 0:  # a wave once the previous one is done
            if self.in_flight or self.waves >= cfg.max_waves:
                return 0
            return min(cfg.target, math.ceil(missing / rate), room)
        ahead = math.ceil(missing * (1 + cfg.overdraw) / rate) - len(self.in_flight)
        return min(cfg.target, ahead, room) if ahead > 0 else 0

    def draw_wave(self, count: int) -> None:
        """Draw ``count`` prompts and submit this replica's share."""
        prompts = self.draw(count)
        first = len(self.groups)
        slots = [self.waves * self.cfg.target + i for i in range(count)] if self.cfg.overdraw == 0 else \
            list(range(first, first + count))
        wave = [Group(p, slot, first + i) for i, (p, slot) in enumerate(zip(prompts, slots))]
        self.groups += wave
        self.waves += 1
        start, end = shard_bounds(len(wave), self.engine.data_parallel, self.engine.dp_rank)
        self.engine.submit([Request(g.order, tuple(g.prompt.ids), self.cfg.n,
                                    request_seed(self.base_seed, g.slot, self.cfg.n), self.cfg.max_tokens)
                            for g in wave[start:end]])

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> StreamResult:
        """Stream until the batch is full or nothing more may be drawn; returns what was made."""
        try:
            while True:
                count = self.wanted()
                if count:
                    self.draw_wave(count)
                if not self.in_flight:
                    break
                with self.timer("rollout"):
                    finished = self.gather(self.engine.advance())
                self.receive(finished)
                self.check()
                if self.cfg.overdraw and len(self.kept) >= self.cfg.target:  # full: the stragglers are cut
                    break
        finally:
            self.engine.abort()  # what is still in flight (nothing, after waves)
        complete = [g for g in self.groups if g.rewards is not None]
        aborted = len(self.groups) - len(complete)
        return StreamResult(self.kept[: self.cfg.target], complete, len(self.groups), self.waves, aborted)

    def gather(self, finished: list[tuple[Any, list[Rollout]]]) -> list[tuple[int, list[Rollout]]]:
        """Every replica's finished requests, on every rank (a replica's ranks report alike)."""
        by_replica: dict[int, list] = {}
        for replica, done in gather_lists([self.engine.dp_rank, finished]):
            by_replica.setdefault(replica, done)
        return [item for replica in sorted(by_replica) for item in by_replica[replica]]

    def receive(self, finished: list[tuple[int, list[Rollout]]]) -> None:
        """Score the groups that completed (collective) and mark those with signal."""
        if not finished:
            return
        groups = [self.groups[order] for order, _ in finished]
        for group, (_, samples) in zip(groups, finished):
            group.samples, group.done_at = samples, self.completed
            self.completed += 1
        rewards = self.score([g.prompt for g in groups], [g.samples for g in groups])
        informative = keep_informative_groups(torch.tensor([r for rs in rewards for r in rs]),
                                              torch.tensor([i for i, rs in enumerate(rewards) for _ in rs]))
        keep = informative.view(len(groups), -1).all(dim=1).tolist()
        for group, rs, k in zip(groups, rewards, keep):
            group.rewards, group.informative = rs, bool(k) or not self.cfg.dynamic
