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
  step ends as soon as it is full, without waiting for the slowest samples. What is still in
  flight is then aborted (``rollout.partial: abort``), or carried into the next step
  (``resume``): its samples continue from their last token with the next step's weights, each
  token tagged with the policy version that sampled it (:class:`Carried`). A group whose oldest
  token is more than ``rollout.max_staleness`` versions behind the policy that trains on it is
  dropped, and counted.

Every (step, slot, sample) has its own seed (prorl_megatron/seeds.py; a wave's prompt ``i`` is
slot ``wave * prompts_per_step + i``, a drawn-ahead prompt's slot is its draw position, and a
carried sample's continuation ``c`` takes the residue ``slots * n + c`` of its step). With
several engine replicas (engine data parallel), requests are split into contiguous shares as
``generate_global`` splits a round, every rank runs its replica's engine step by step, and the
finished requests are gathered on every rank after each engine step: every rank decides the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from prorl_megatron.algo import keep_informative_groups
from prorl_megatron.collect import gather_lists, map_over_world, shard_bounds
from prorl_megatron.rewards.pool import ScoreRequest
from prorl_megatron.rollout.engine import Request, Rollout
from prorl_megatron.seeds import SEED_MODULUS, request_seed


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
class Partial:
    """One sample as far as it got: its tokens, their logprobs under the sampling distribution,
    and the policy version that sampled them as runs ``[version, count]``; ``finish_reason`` once
    it is done."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[list[int]] = field(default_factory=list)
    finish_reason: Optional[str] = None

    def extend(self, tokens: list[int], logprobs: list[float], version: int) -> None:
        if tokens:
            self.tokens += tokens
            self.logprobs += logprobs
            if self.versions and self.versions[-1][0] == version:
                self.versions[-1][1] += len(tokens)
            else:
                self.versions.append([version, len(tokens)])


@dataclass
class Carried:
    """A group still in flight when its step's batch was full (``rollout.partial: resume``): its
    prompt, and each sample as far as it got. Plain data: it goes into the checkpoint."""

    prompt: Any  # EncodedPrompt
    samples: list[Partial]

    def to_state(self) -> dict[str, Any]:
        p = self.prompt
        return {"row": {**p.row.to_json(), "source": p.row.source}, "ids": list(p.ids),
                "opened_think": p.opened_think, "samples": [vars(s) for s in self.samples]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Carried":
        from prorl_megatron.data.chat import EncodedPrompt
        from prorl_megatron.data.schema import parse_row

        row = parse_row(state["row"], state["row"].get("source", ""))
        prompt = EncodedPrompt(row, list(state["ids"]), bool(state["opened_think"]))
        return cls(prompt, [Partial(**s) for s in state["samples"]])


@dataclass
class Group:
    """One prompt's group in the step, from its draw (or its carry from the last step) to its scores."""

    prompt: Any  # EncodedPrompt
    slot: int  # its seed slot in the step (-1: carried in from the last step)
    order: int  # its position among the step's groups (carried ones first)
    samples: Optional[list[Rollout]] = None  # when complete
    rewards: Optional[list[float]] = None  # when scored
    informative: bool = False  # its rewards are not all equal (or dynamic sampling is off)
    done_at: int = -1  # completion position in the step (the batch's order when drawing ahead)
    oldest: int = 0  # the oldest policy version among its tokens
    partial: Optional[list[Partial]] = None  # a carried group's samples as they grow


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
    resume: bool = False  # rollout.partial == "resume"
    max_staleness: int = 0  # rollout.max_staleness

    @classmethod
    def of(cls, recipe: Any) -> "StreamSettings":
        return cls(target=recipe.train.prompts_per_step, n=recipe.rollout.n,
                   max_tokens=recipe.rollout.max_response_tokens, dynamic=recipe.algo.dynamic_sampling,
                   max_waves=recipe.algo.max_sampling_rounds if recipe.algo.dynamic_sampling else 1,
                   max_prompts=recipe.algo.prompts_cap(recipe.train.prompts_per_step)
                   if recipe.algo.dynamic_sampling else recipe.train.prompts_per_step,
                   overdraw=recipe.rollout.overdraw, resume=recipe.rollout.partial == "resume",
                   max_staleness=recipe.rollout.max_staleness)


@dataclass
class StreamResult:
    """What the step's stream produced: the batch's groups (in batch order), every complete
    group (for the metrics), what goes on into the next step, and counts."""

    batch: list[Group]
    complete: list[Group]
    carried: list[Carried]
    drawn: int
    waves: int
    aborted: int  # groups still in flight when the batch was full, not carried on
    stale: int  # complete groups with signal left out for their staleness


class StepStream:
    """The groups of one step, streamed through ``engine`` (collective: every rank runs it alike).

    ``draw(count)``: the next ``count`` encoded prompts of the data; ``score(prompts, rollouts)``:
    their rewards (collective, e.g. :func:`score_rollouts`); ``base_seed``: the step's first seed
    (:func:`~prorl_megatron.seeds.step_base_seed`), ``slots`` its layout's prompt slots;
    ``version``: the policy version the engine holds (the updates so far); ``carried``: the groups
    the last step carried over. ``check()``: a collective check after every engine step that
    raises to stop at once (a stop signal: the step is redone after the resume); whatever leaves
    :meth:`run` early aborts what is in flight. ``timer``: a
    :class:`~prorl_megatron.metrics.PhaseTimer`, the engine's steps timed as ``rollout``.
    """

    def __init__(self, engine: Any, settings: StreamSettings, base_seed: int,
                 draw: Callable[[int], list[Any]], score: Callable[[list[Any], list[list[Rollout]]], list[list[float]]],
                 check: Callable[[], None], timer: Any, slots: int = 0, version: int = 0,
                 carried: Optional[list[Carried]] = None) -> None:
        self.engine, self.cfg, self.base_seed = engine, settings, base_seed
        self.draw, self.score, self.check, self.timer = draw, score, check, timer
        self.slots, self.version = slots, version
        self.groups: list[Group] = [Group(c.prompt, -1, i, partial=c.samples, oldest=_oldest(c.samples, version))
                                    for i, c in enumerate(carried or [])]
        self.waves = 0
        self.completed = 0

    # ---- accounting ----------------------------------------------------------------------

    @property
    def in_flight(self) -> list[Group]:
        return [g for g in self.groups if g.rewards is None]

    def fresh(self, group: Group) -> bool:
        """Within ``rollout.max_staleness`` versions of the policy that trains on it."""
        return self.version - group.oldest <= self.cfg.max_staleness

    @property
    def kept(self) -> list[Group]:
        """The groups with signal so far, in batch order (draw order for waves, completion order
        when drawing ahead), fresh enough to train on."""
        chosen = [g for g in self.groups if g.rewards is not None and g.informative and self.fresh(g)]
        return chosen if self.cfg.overdraw == 0 else sorted(chosen, key=lambda g: g.done_at)

    def keep_rate(self) -> float:
        """Groups with signal over groups scored (the rounds': over groups drawn); 1 at first."""
        scored = [g for g in self.groups if g.rewards is not None] if self.cfg.overdraw else self.groups
        return len([g for g in scored if g.informative]) / len(scored) if scored else 1.0

    # ---- drawing ----------------------------------------------------------------------------

    def wanted(self) -> int:
        """How many prompts to draw now (0: none)."""
        cfg, missing = self.cfg, self.cfg.target - len(self.kept)
        room = cfg.max_prompts - len([g for g in self.groups if g.slot >= 0])
        if missing <= 0 or room <= 0:
            return 0
        rate = max(self.keep_rate(), 0.1)
        if cfg.overdraw == 0:  # a wave once the previous one is done
            if self.in_flight or self.waves >= cfg.max_waves:
                return 0
            return min(cfg.target, math.ceil(missing / rate), room)
        ahead = math.ceil(missing * (1 + cfg.overdraw) / rate) - len(self.in_flight)
        return min(cfg.target, ahead, room) if ahead > 0 else 0

    def submit_share(self, requests: list[Request]) -> None:
        """This replica's contiguous share of ``requests`` (every rank holds them all)."""
        start, end = shard_bounds(len(requests), self.engine.data_parallel, self.engine.dp_rank)
        self.engine.submit(requests[start:end], partial=self.cfg.resume)

    def draw_wave(self, count: int) -> None:
        """Draw ``count`` prompts and submit this replica's share."""
        prompts = self.draw(count)
        first, drawn = len(self.groups), len([g for g in self.groups if g.slot >= 0])
        slots = [self.waves * self.cfg.target + i for i in range(count)] if self.cfg.overdraw == 0 else \
            list(range(drawn, drawn + count))
        wave = [Group(p, slot, first + i, oldest=self.version) for i, (p, slot) in enumerate(zip(prompts, slots))]
        self.groups += wave
        self.waves += 1
        self.submit_share([Request(("g", g.order), tuple(g.prompt.ids), self.cfg.n,
                                   request_seed(self.base_seed, g.slot, self.cfg.n), self.cfg.max_tokens)
                           for g in wave])

    def continue_carried(self) -> None:
        """Submit each carried sample that is not done, from its last token, one request each
        (the continuation residues of the step: ``slots * n + c``)."""
        requests = []
        for g in self.groups:
            for j, s in enumerate(g.partial or []):
                if s.finish_reason is None:
                    seed = (self.base_seed + self.slots * self.cfg.n + len(requests)) % SEED_MODULUS
                    requests.append(Request(("c", g.order, j), tuple(g.prompt.ids) + tuple(s.tokens), 1, seed,
                                            self.cfg.max_tokens - len(s.tokens)))
        self.submit_share(requests)

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> StreamResult:
        """Stream until the batch is full or nothing more may be drawn; returns what was made."""
        carried: list[Carried] = []
        try:
            self.continue_carried()
            self.receive([])  # carried groups that were only waiting to be scored
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
                    if self.cfg.resume:
                        carried = self.carry_on(self.gather_partial(self.engine.abort()))
                    break
        finally:
            self.engine.abort()  # what is still in flight (nothing, after waves)
        complete = [g for g in self.groups if g.rewards is not None]
        stale = len([g for g in complete if g.informative and not self.fresh(g)])
        return StreamResult(self.kept[: self.cfg.target], complete, carried,
                            len([g for g in self.groups if g.slot >= 0]), self.waves,
                            len(self.groups) - len(complete) - len(carried), stale)

    def gather(self, finished: list[tuple[Any, list[Rollout]]]) -> list[tuple[Any, list[Rollout]]]:
        """Every replica's finished requests, on every rank (a replica's ranks report alike)."""
        by_replica: dict[int, list] = {}
        for replica, done in gather_lists([self.engine.dp_rank, finished]):
            by_replica.setdefault(replica, done)
        return [item for replica in sorted(by_replica) for item in by_replica[replica]]

    def gather_partial(self, partial: dict[Any, list]) -> dict[Any, list]:
        """Every replica's aborted requests' tokens so far, on every rank."""
        out: dict[Any, list] = {}
        for replica, part in gather_lists([self.engine.dp_rank, sorted(partial.items())]):
            out.update({key: samples for key, samples in part})
        return out

    def receive(self, finished: list[tuple[Any, list[Rollout]]]) -> None:
        """Take the finished requests; score the groups they complete (collective) and mark
        those with signal."""
        complete = []
        for (kind, order, *sample), samples in finished:
            group = self.groups[order]
            if kind == "g":
                group.samples = samples
            else:  # a carried sample's continuation
                out = samples[0]
                group.partial[sample[0]].extend(out.response_ids, out.logprobs, self.version)
                group.partial[sample[0]].finish_reason = out.finish_reason
        for group in self.groups:
            if group.rewards is None and group.samples is None and group.partial is not None and \
                    all(s.finish_reason is not None for s in group.partial):
                group.samples = [Rollout(s.tokens, s.logprobs, s.finish_reason, self.engine.decode(s.tokens))
                                 for s in group.partial]
            if group.rewards is None and group.samples is not None and group.done_at < 0:
                group.done_at, self.completed = self.completed, self.completed + 1
                complete.append(group)
        if not complete:
            return
        rewards = self.score([g.prompt for g in complete], [g.samples for g in complete])
        informative = keep_informative_groups(torch.tensor([r for rs in rewards for r in rs]),
                                              torch.tensor([i for i, rs in enumerate(rewards) for _ in rs]))
        keep = informative.view(len(complete), -1).all(dim=1).tolist()
        for group, rs, k in zip(complete, rewards, keep):
            group.rewards, group.informative = rs, bool(k) or not self.cfg.dynamic

    def carry_on(self, partial: dict[Any, list]) -> list[Carried]:
        """The groups in flight, as far as they got, for the next step: those that will still be
        fresh enough there (their oldest token at most ``max_staleness`` versions behind it)."""
        out = []
        for g in self.in_flight:
            samples = g.partial if g.partial is not None else [Partial() for _ in range(self.cfg.n)]
            if g.partial is None:  # a fresh group: every sample so far came from this version
                for j, (tokens, logprobs, reason) in enumerate(partial.get(("g", g.order),
                                                                           [([], [], None)] * self.cfg.n)):
                    samples[j].extend(tokens, logprobs, self.version)
                    samples[j].finish_reason = reason
            else:
                for j, s in enumerate(samples):
                    if s.finish_reason is None:
                        tokens, logprobs, reason = partial.get(("c", g.order, j), [([], [], None)])[0]
                        s.extend(tokens, logprobs, self.version)
                        s.finish_reason = reason
            if self.version + 1 - _oldest(samples, self.version) <= self.cfg.max_staleness:
                out.append(Carried(g.prompt, samples))
        return out


def _oldest(samples: list[Partial], default: int) -> int:
    """The oldest version among the samples' tokens (``default`` when they have none)."""
    return min((v for s in samples for v, _ in s.versions), default=default)
