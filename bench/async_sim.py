"""Projected to the cluster: a discrete-event model of the 1.5B ProRL recipe on 32 GPUs.

    python bench/async_sim.py [--stage 8k|16k] [--json] [--splits 8,12,16] [--ks 0,1,2] [--steps 10]
        [--FLAG VALUE ...] [key.sub=value ...]   # flags: --help; recipe overrides as in the trainer

**A projection from a model, not a measurement.** It compares, for DeepSeek-R1-Distill-Qwen-1.5B
on 4 nodes x 8 H100-80GB (``recipes/prorl_1p5b.yaml``), the step time and throughput of:

- ``sync`` (colocated synchronous, today): every GPU holds the policy and a vLLM engine; a step
  is up to ``algo.max_sampling_rounds`` rounds of ``rollout.n`` samples per prompt, each round
  waiting for its slowest sample, groups whose rewards are all equal dropped and prompts drawn
  again exactly as ``prorl_megatron.train.collect_samples`` does, then training on all GPUs, then
  the in-process weight reload;
- ``stream`` (colocated streaming): the same GPUs, prompts fed continuously, groups scored as
  they finish, generation stopped as soon as ``train.prompts_per_step`` signal-carrying groups are
  in (the unfinished ones aborted and tried again next step: ``rollout.partial: abort``);
- ``separate`` (a separate rollout placement): G GPUs run vLLM engines only, 32 - G train; the
  engines generate while the trainer trains; a group whose oldest token is more than ``k``
  policy versions older than the policy that trains on it is dropped (``rollout.max_staleness``);
  new weights reach the engines by a bucketed broadcast after each update, and the requests in
  flight are then aborted and restarted (``abort``) or continued with the new weights after
  their KV cache is recomputed (``resume``). ``k = 0``: the engines stop when the batch is in
  and wait for the new weights (no overlap of generation with training). Staleness is judged
  per group (its oldest sample), and a dropped group counts its ``n`` samples.

Streaming and separate share one controller: new groups go to the least loaded engine while the
groups expected to carry signal (trained + waiting + in flight x the keep rate so far) stay
under the batches the engines' weights may still feed (``k + 1`` of them), plus ``--overcommit``
of a batch where generation stops at the batch (colocated streaming, ``k = 0``).

The model (every constant is a flag; each flag's help says whether it is cited or assumed):

- **decode**: continuous batching on each engine (``rollout.engine_tensor_parallel`` GPUs); one step
  generates a token for each of the B running sequences and takes
  ``max(bytes / (HBM bandwidth x efficiency), FLOPs / (peak x efficiency)) + a fixed overhead``,
  bytes = the weights + the KV cache of every running sequence's context + the sampler's
  float32 logits, FLOPs = 2 x params x B + attention over the contexts. Memory-bound at small B,
  the KV term grows with B x context. Concurrent sequences per engine are capped by
  ``--max-num-seqs`` and by the KV cache (what ``gpu_memory_utilization`` leaves after weights
  and a reserve, over the mean context of a running sequence; colocated engines get the recipe's
  ``rollout.gpu_memory_utilization``, dedicated ones ``--engine-mem-util``). Prefill (prompt once
  per group; the whole context again for ``resume``) is compute-bound time on the engine.
- **lengths**: prompts lognormal around ``--prompt-median``; responses lognormal
  (``--response-median``, ``--response-sigma``, ``--group-share`` of the log-variance common to a
  prompt's group) capped at the stage's
  ``rollout.max_response_tokens``; a group carries signal with probability ``--keep-rate``,
  independent of its lengths. The same seeded stream of groups feeds every mode.
- **training**: model FLOPs of the batch (6 N S + 12 L h S^2 per sequence of S tokens, as
  bench/RESULTS.md counts them) at the per-GPU rates measured on one H200 without Transformer
  Engine (the update, and the logprob pass as 2/3 of the update's FLOPs), perfectly balanced
  over the trainer's GPUs (the token plan's slowest/mean is 1.000, bench/RESULTS.md).
- **weights**: colocated, a fixed sleep/wake/reload time per step; separate, 2 bytes x params
  over ``--link-gbps`` (one InfiniBand NIC per GPU) plus a latency per bucket of
  ``rollout.sync_bucket_mib``, then ``--apply-s`` on the engines.

Not modelled: reward scoring time, evaluation, checkpoints, preemption inside vLLM, KV
overflow beyond the mean-context cap, data-parallel gradient all-reduce, a correlation between
correctness and length. See docs/cluster.md, "Placement and staleness: when to pick which".
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prorl_megatron.config import Recipe, load_recipe, stage_recipe  # noqa: E402  (yaml only; no torch)

GIB = 1 << 30
RECIPE = ROOT / "recipes" / "prorl_1p5b.yaml"
STAGES = {"8k": 0, "16k": 1}  # index into the recipe's stages: list


def cited(default: Any, source: str) -> Any:
    """A dataclass field whose default comes from ``source`` (named in its flag's help)."""
    return field(default=default, metadata={"help": f"[cited: {source}]"})


def assumed(default: Any, why: str) -> Any:
    """A dataclass field whose default is an assumption (said so in its flag's help)."""
    return field(default=default, metadata={"help": f"[assumed: {why}]"})


# --------------------------------------------------------------------------------------
# Constants: the hardware, the model, the training rates, the workload
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """One H100-80GB SXM and the cluster's links. Units: bytes, seconds, FLOP/s, Gb/s."""

    hbm_bytes_per_s: float = cited(3.35e12, "H100 SXM datasheet: 3.35 TB/s HBM3")
    bf16_flops: float = cited(989e12, "H100 SXM datasheet: 989 TFLOP/s dense BF16 (1979 with sparsity)")
    gpu_mem_bytes: float = cited(81559 * (1 << 20), "prorl_megatron/plan.py H100_80GB: what an H100-80GB reports")
    decode_bw_eff: float = assumed(0.6, "fraction of HBM bandwidth a decode step reaches (small kernels)")
    decode_flop_eff: float = assumed(0.4, "fraction of peak a decode step's GEMMs reach")
    prefill_flop_eff: float = assumed(0.4, "fraction of peak a prefill reaches")
    step_overhead_s: float = assumed(1.5e-3, "scheduler, sampling launch and Python per decode step")
    tp_allreduce_s: float = assumed(10e-6, "latency of one NVLink all-reduce in a TP>1 engine (2 per layer)")
    vllm_reserve_bytes: float = assumed(2 * GIB, "vLLM activations, CUDA graphs, sampler workspace")
    max_num_seqs: int = cited(1024, "vLLM engine/arg_utils.py: LLM-class default on >=70 GiB non-A100 GPUs")
    engine_mem_util: float = cited(0.9, "vLLM's default gpu_memory_utilization, for dedicated engine GPUs")
    link_gbps: float = cited(400.0, "one 400 Gb/s InfiniBand NIC per GPU (MLPerf H200-SXM-141GBx8 system)")
    link_eff: float = assumed(0.8, "fraction of the link a bucketed NCCL broadcast reaches")
    bucket_latency_s: float = assumed(1e-3, "per-bucket latency of the broadcast")
    apply_s: float = assumed(0.5, "engine pause to load the received weights (separate placement)")
    colocated_sync_s: float = assumed(2.0, "colocated: vLLM sleep + wake + in-process weight reload per step")


@dataclass(frozen=True)
class Model:
    """DeepSeek-R1-Distill-Qwen-1.5B's shape (docs/cluster.md's plan table; 1.777B in bench/RESULTS.md)."""

    params: float = cited(1.777e9, "bench/RESULTS.md: 1.777B parameters (R1-Distill-Qwen-1.5B shape)")
    layers: int = cited(28, "the model's config.json (docs/cluster.md plan table)")
    hidden: int = cited(1536, "the model's config.json")
    heads: int = cited(12, "the model's config.json")
    kv_heads: int = cited(2, "the model's config.json")
    vocab: int = cited(151936, "the model's config.json")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def weight_bytes(self) -> float:
        """bf16 weights, bytes."""
        return 2 * self.params

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, bf16, bytes (28 x 2 x 2 x 128 x 2 = 28 KiB)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    def sequence_flops(self, tokens: np.ndarray) -> np.ndarray:
        """Model FLOPs of forward + backward over sequences of ``tokens`` tokens (6 N S + 12 L h S^2)."""
        s = tokens.astype(np.float64)
        return 6 * self.params * s + 12 * self.layers * self.hidden * s * s


@dataclass(frozen=True)
class Training:
    """Per-GPU training rates (model FLOP/s) and what an update costs besides."""

    update_tflops: float = cited(92.2, "bench/RESULTS.md: 1.5B update on one H200, no TE (MFU 0.093)")
    logprob_tflops: float = cited(96.1, "bench/RESULTS.md: logprob pass 11.46 s vs update 17.91 s on the "
                                        "same batch, counted as 2/3 of the update's FLOPs")
    train_speedup: float = assumed(1.0, "multiplier on both rates: 1 = as measured without Transformer Engine; "
                                        "TE's fused attention and kernels are faster (not measured here)")


@dataclass(frozen=True)
class Workload:
    """Lengths and keep rate; the stage's cap and the recipe's batch come from the recipe."""

    prompt_median: float = assumed(300.0, "prompt tokens, median")
    prompt_sigma: float = assumed(0.5, "prompt lengths, lognormal sigma")
    response_median: Optional[float] = assumed(None, "response tokens, median; None: 4000 at 8k (as "
                                                     "bench/batching.py's R1-like step), 5000 at 16k")
    response_sigma: Optional[float] = assumed(None, "response lengths, lognormal sigma; None: 0.6 at 8k (as "
                                                    "bench/batching.py), 0.7 at 16k (a heavier tail)")
    group_share: float = assumed(0.5, "share of the response log-variance common to a prompt's group")
    keep_rate: float = assumed(0.5, "chance a group's rewards are not all equal (dynamic sampling keeps it)")
    overcommit: float = assumed(0.25, "streaming controller: groups admitted beyond the expected need, "
                                      "as a fraction of a batch")

    def median_for(self, cap: int) -> float:
        """Response median (tokens) for a stage whose responses stop at ``cap`` tokens."""
        if self.response_median is not None:
            return self.response_median
        return 4000.0 if cap <= 8192 else 5000.0

    def sigma_for(self, cap: int) -> float:
        """Response lognormal sigma for a stage whose responses stop at ``cap`` tokens."""
        if self.response_sigma is not None:
            return self.response_sigma
        return 0.6 if cap <= 8192 else 0.7


@dataclass(frozen=True)
class Recipe1p5b:
    """What the simulator reads from the recipe (one stage of it)."""

    n: int
    prompts_per_step: int
    max_rounds: int
    max_prompt: int
    max_response: int
    mem_util: float
    engine_tp: int
    bucket_bytes: float

    @classmethod
    def read(cls, recipe: Recipe) -> "Recipe1p5b":
        r = recipe.rollout
        return cls(n=r.n, prompts_per_step=recipe.train.prompts_per_step, max_rounds=recipe.algo.max_sampling_rounds,
                   max_prompt=r.max_prompt_tokens, max_response=r.max_response_tokens,
                   mem_util=r.gpu_memory_utilization, engine_tp=r.engine_tensor_parallel,
                   bucket_bytes=r.sync_bucket_mib * (1 << 20))


@dataclass(frozen=True)
class Config:
    """Everything one simulated run depends on."""

    recipe: Recipe1p5b
    hw: Hardware = Hardware()
    model: Model = Model()
    train: Training = Training()
    work: Workload = Workload()
    total_gpus: int = 32
    seed: int = 0


@dataclass(frozen=True)
class Setup:
    """A placement: ``mode`` sync | stream | separate, GPUs per role, staleness and partials."""

    mode: str
    engine_gpus: int
    trainer_gpus: int
    k: int = 0
    partial: str = "abort"

    @property
    def colocated(self) -> bool:
        return self.mode != "separate"

    def partial_label(self) -> str:
        """What happens to unfinished requests: ``-`` (sync: none are left), abort or resume."""
        if self.mode == "sync":
            return "-"
        return "abort" if self.mode == "stream" or self.k == 0 else self.partial

    def label(self) -> str:
        if self.colocated:
            return f"colocated {self.mode}"
        return f"separate k={self.k}" + ("" if self.k == 0 else f" {self.partial}")


# --------------------------------------------------------------------------------------
# Decode cost of one engine
# --------------------------------------------------------------------------------------


def linear_sum(c0: float, c1: float, start: int, stop: int) -> float:
    """sum over j in [start, stop) of c0 + c1 j."""
    n = stop - start
    return n * c0 + c1 * (start + stop - 1) * n / 2 if n > 0 else 0.0


def sum_max_linear(a0: float, a1: float, b0: float, b1: float, k: int) -> float:
    """sum over j in [0, k) of max(a0 + a1 j, b0 + b1 j): the two lines cross at most once."""
    d0, d1 = a0 - b0, a1 - b1
    if d1 == 0:
        return linear_sum(a0, a1, 0, k) if d0 >= 0 else linear_sum(b0, b1, 0, k)
    cross = -d0 / d1  # a >= b for j >= cross (d1 > 0) or j <= cross (d1 < 0)
    if d1 > 0:
        split = min(k, max(0, math.ceil(cross)))
        return linear_sum(b0, b1, 0, split) + linear_sum(a0, a1, split, k)
    split = min(k, max(0, math.floor(cross) + 1))
    return linear_sum(a0, a1, 0, split) + linear_sum(b0, b1, split, k)


@dataclass(frozen=True)
class DecodeCost:
    """Seconds per unit of work on one engine (its TP GPUs together)."""

    weights_s: float  # reading the weights, per decode step
    kv_s: float  # reading one context token's KV cache
    sampler_s: float  # the sampler's float32 logits of one sequence
    seq_flop_s: float  # the linear layers for one sequence's token
    ctx_flop_s: float  # attention of one query over one context token
    overhead_s: float  # fixed, per decode step
    prefill_s: float  # linear layers for one prompt token
    prefill_sq_s: float  # causal attention, per (token x token) of a prefill

    @classmethod
    def of(cls, hw: Hardware, m: Model, tp: int) -> "DecodeCost":
        bw = hw.hbm_bytes_per_s * hw.decode_bw_eff * tp
        flops = hw.bf16_flops * hw.decode_flop_eff * tp
        prefill = hw.bf16_flops * hw.prefill_flop_eff * tp
        attention = 4 * m.layers * m.heads * m.head_dim  # QK^T and AV, FLOPs per (query, context token)
        return cls(weights_s=m.weight_bytes / bw, kv_s=m.kv_bytes_per_token / bw, sampler_s=3 * 4 * m.vocab / bw,
                   seq_flop_s=2 * m.params / flops, ctx_flop_s=attention / flops,
                   overhead_s=hw.step_overhead_s + (2 * m.layers * hw.tp_allreduce_s if tp > 1 else 0.0),
                   prefill_s=2 * m.params / prefill, prefill_sq_s=attention / 2 / prefill)

    def steps_time(self, b: int, ctx: int, k: int) -> float:
        """Seconds of ``k`` decode steps of ``b`` sequences whose contexts sum to ``ctx`` tokens."""
        if k <= 0 or b == 0:
            return 0.0
        mem0 = self.weights_s + self.sampler_s * b + self.kv_s * ctx
        flop0 = self.seq_flop_s * b + self.ctx_flop_s * ctx
        return sum_max_linear(mem0, self.kv_s * b, flop0, self.ctx_flop_s * b, k) + k * self.overhead_s

    def steps_within(self, b: int, ctx: int, seconds: float, limit: int) -> int:
        """The most decode steps (at most ``limit``) that fit in ``seconds``."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.steps_time(b, ctx, mid) <= seconds:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def prefill_time(self, tokens: int) -> float:
        """Seconds to prefill one sequence of ``tokens`` tokens."""
        return self.prefill_s * tokens + self.prefill_sq_s * tokens * tokens


def engine_capacity(cfg: Config, tp: int, mem_util: float, mean_context: float) -> int:
    """Concurrent sequences on one engine: ``max_num_seqs``, or what its KV cache holds at the
    mean context of a running sequence."""
    hw, m = cfg.hw, cfg.model
    per_gpu = mem_util * hw.gpu_mem_bytes - m.weight_bytes / tp - hw.vllm_reserve_bytes
    tokens = tp * per_gpu / m.kv_bytes_per_token
    return max(1, min(hw.max_num_seqs, int(tokens // mean_context)))


# --------------------------------------------------------------------------------------
# The workload: a seeded stream of prompt groups
# --------------------------------------------------------------------------------------


class Group:
    """One prompt and its ``n`` response lengths; the rest is the group's state in one run."""

    __slots__ = ("gid", "prompt", "lengths", "signal", "flops", "done", "made", "oldest", "finished_oldest", "dead",
                 "attempt")

    def __init__(self, gid: int, prompt: int, lengths: list[int], signal: bool, flops: float):
        self.gid, self.prompt, self.lengths, self.signal, self.flops = gid, prompt, lengths, signal, flops
        self.attempt = 0
        self.reset()

    def reset(self) -> None:
        """Back to not started (a new attempt)."""
        self.done, self.made, self.dead = 0, 0, False
        self.oldest = self.finished_oldest = math.inf  # weights versions: of any sample started, of those finished

    @property
    def response_tokens(self) -> int:
        return sum(self.lengths)


class PromptStream:
    """Groups in a fixed order from ``seed``: every mode sees the same prompts and lengths."""

    BLOCK = 1024

    def __init__(self, cfg: Config, seed: int):
        self.cfg, self.rng, self.next_gid = cfg, np.random.default_rng(seed), 0
        self.buffer: deque[Group] = deque()

    def take(self) -> Group:
        if not self.buffer:
            self.buffer.extend(self._block())
        return self.buffer.popleft()

    def _block(self) -> Iterable[Group]:
        cfg, w, r = self.cfg, self.cfg.work, self.cfg.recipe
        prompts, lengths, signal = sample_lengths(self.rng, w, r, self.BLOCK)
        flops = cfg.model.sequence_flops(lengths + prompts[:, None]).sum(axis=1)
        for i in range(self.BLOCK):
            yield Group(self.next_gid + i, int(prompts[i]), lengths[i].tolist(), bool(signal[i]), float(flops[i]))
        self.next_gid += self.BLOCK


def sample_lengths(rng: np.random.Generator, w: Workload, r: Recipe1p5b, groups: int):
    """``(prompt tokens [groups], response tokens [groups, n], signal [groups])``."""
    prompts = np.exp(np.log(w.prompt_median) + w.prompt_sigma * rng.standard_normal(groups))
    prompts = np.clip(np.rint(prompts), 16, r.max_prompt).astype(np.int64)
    sigma = w.sigma_for(r.max_response)
    shared = math.sqrt(w.group_share) * sigma * rng.standard_normal((groups, 1))
    own = math.sqrt(1 - w.group_share) * sigma * rng.standard_normal((groups, r.n))
    lengths = np.exp(np.log(w.median_for(r.max_response)) + shared + own)
    lengths = np.clip(np.rint(lengths), 1, r.max_response).astype(np.int64)
    return prompts, lengths, rng.random(groups) < w.keep_rate


def mean_running_context(cfg: Config) -> float:
    """Mean context of a running sequence under continuous batching: the prompt plus, length-
    biased, half a response (E[L^2] / 2E[L]). From a fixed sample of the stage's lengths."""
    prompts, lengths, _ = sample_lengths(np.random.default_rng(12345), cfg.work, cfg.recipe, 4096)
    lengths = lengths.astype(np.float64)
    return float(prompts.mean() + (lengths ** 2).mean() / (2 * lengths.mean()))


# --------------------------------------------------------------------------------------
# One engine: continuous batching, event by event (a sequence finishing)
# --------------------------------------------------------------------------------------


class Seq:
    """One sample being generated: ``base`` tokens were made before ``start`` (a resume)."""

    __slots__ = ("group", "index", "length", "base", "start", "version")

    def __init__(self, group: Group, index: int):
        self.group, self.index, self.length = group, index, group.lengths[index]
        self.base, self.start, self.version = 0, 0, 0

    def made(self, steps: int) -> int:
        """Tokens generated so far, at the engine's step ``steps``."""
        return self.base + steps - self.start


class Engine:
    """vLLM continuous batching on ``tp`` GPUs: decode steps advance every running sequence by
    one token; the engine jumps from one sequence's end to the next (closed-form step times)."""

    def __init__(self, index: int, cost: DecodeCost, cap: int, record: bool = False):
        self.index, self.cost, self.cap = index, cost, cap
        self.time, self.steps, self.ctx = 0.0, 0, 0
        self.running: list[tuple[int, int, Seq]] = []  # heap of (finish step, order, seq)
        self.waiting: deque[Seq] = deque()
        self.busy, self.tokens, self.epoch, self.order = 0.0, 0, 0, 0
        self.planned: Optional[tuple] = None  # (steps, ctx, batch, k, seconds) of the last finish_time
        self.prefilled: set[tuple[int, int, int]] = set()  # (group, attempt, version): prompt KV cached
        self.intervals: Optional[list[tuple[float, float]]] = [] if record else None

    def work(self, seconds: float) -> None:
        """The engine's GPUs compute for ``seconds``."""
        if seconds <= 0:
            return
        if self.intervals is not None:
            self.intervals.append((self.time, self.time + seconds))
        self.time += seconds
        self.busy += seconds

    def admit(self, seq: Seq, version: int) -> None:
        """Start (or restart) ``seq`` at this step with weights ``version``."""
        g = seq.group
        key = (g.gid, g.attempt, version)
        if key not in self.prefilled:  # the prompt's prefill, once per group and weights
            self.prefilled.add(key)
            self.work(self.cost.prefill_time(g.prompt))
        seq.start, seq.version = self.steps, version
        g.oldest = min(g.oldest, version)
        self.ctx += g.prompt + seq.base
        self.order += 1
        heapq.heappush(self.running, (self.steps + seq.length - seq.base, self.order, seq))

    def load(self) -> int:
        """Sequences running or queued."""
        return len(self.running) + len(self.waiting)

    def fill(self, version: int) -> None:
        """Admit waiting sequences while there is room."""
        while self.waiting and len(self.running) < self.cap:
            self.admit(self.waiting.popleft(), version)

    def finish_time(self) -> Optional[float]:
        """When the next running sequence finishes; None when nothing runs."""
        if not self.running:
            return None
        k = self.running[0][0] - self.steps
        seconds = self.cost.steps_time(len(self.running), self.ctx, k)
        self.planned = (self.steps, self.ctx, len(self.running), k, seconds)
        return self.time + seconds

    def advance(self, k: int) -> None:
        """``k`` decode steps of the running batch."""
        b, p = len(self.running), self.planned
        same = p is not None and p[0] == self.steps and p[1] == self.ctx and p[2] == b and p[3] == k
        self.work(p[4] if same else self.cost.steps_time(b, self.ctx, k))
        self.tokens += k * b
        self.ctx += k * b
        self.steps += k

    def next_finished(self) -> list[Seq]:
        """Decode up to the next sequence's end; the sequences that finish there."""
        self.advance(self.running[0][0] - self.steps)
        done = []
        while self.running and self.running[0][0] == self.steps:
            seq = heapq.heappop(self.running)[2]
            self.ctx -= seq.group.prompt + seq.length
            done.append(seq)
        return done

    def advance_until(self, t: float) -> None:
        """Bring the engine up to ``t``: a busy one decodes the whole steps that end by then (none up
        to the next finish), so that what changes next happens at a step boundary at most one step
        before ``t``; an idle one waits until ``t``."""
        if not self.running:
            self.time = max(self.time, t)
        elif t > self.time:
            limit = max(0, self.running[0][0] - self.steps - 1)
            self.advance(self.cost.steps_within(len(self.running), self.ctx, t - self.time, limit))

    def abort_running(self) -> list[Seq]:
        """Every running sequence stops; returns them (their KV released)."""
        out = [item[2] for item in self.running]
        self.running, self.ctx = [], 0
        return out

    def remove(self, keep) -> list[Seq]:
        """Take out the running and waiting sequences for which ``keep(seq)`` is false; returns
        the running ones taken out (their KV released)."""
        out = [item[2] for item in self.running if not keep(item[2])]
        if out:
            self.running = [item for item in self.running if keep(item[2])]
            heapq.heapify(self.running)
            self.ctx -= sum(s.group.prompt + s.made(self.steps) for s in out)
        self.waiting = deque(s for s in self.waiting if keep(s))
        return out

    def restart(self, seqs: list[Seq]) -> None:
        """Put aborted sequences back at the head of the queue, to start over."""
        for seq in reversed(seqs):
            seq.base = 0
            self.waiting.appendleft(seq)

    def recompute(self) -> None:
        """Resume: every running sequence's KV cache is computed again under the new weights."""
        self.work(sum(self.cost.prefill_time(s.group.prompt + s.made(self.steps)) for _, _, s in self.running))
        for _, _, s in self.running:
            s.base, s.start = s.made(self.steps), self.steps


# --------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------


@dataclass
class Counters:
    """Totals over a run (samples, tokens, seconds); differences of two snapshots give a window."""

    generated_tokens: int = 0  # every decode token, wasted or not
    engine_busy_s: float = 0.0  # summed over engines (each engine = its TP GPUs)
    trainer_busy_s: float = 0.0
    finished_samples: int = 0  # samples whose generation completed
    trained_samples: int = 0
    trained_tokens: int = 0  # response tokens of trained samples
    filtered_samples: int = 0  # groups with equal rewards (dynamic sampling)
    stale_samples: int = 0  # groups too old for the policy that would train on them (all n samples)
    stale_unfinished: int = 0  # of which not finished (groups dropped while in flight)
    surplus_samples: int = 0  # kept groups beyond the batch (sync: kept[:target])
    aborted_tokens: int = 0  # decode tokens thrown away by an abort
    discarded_samples: int = 0  # finished samples of groups aborted before they completed
    kept_groups: int = 0
    scored_groups: int = 0

    def minus(self, other: "Counters") -> "Counters":
        return Counters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self)})


@dataclass
class Result:
    """One placement's projection, averaged over the measured steps (after the warm-up)."""

    label: str
    mode: str
    engine_gpus: int
    trainer_gpus: int
    k: int
    partial: str
    step_s: float
    samples_per_s: float
    gen_tokens_per_s_per_gpu: float  # every generated token, over all GPUs of the cluster
    trained_tokens_per_s_per_gpu: float  # response tokens that were trained on, over all GPUs
    engine_busy: float  # fraction of the engine GPUs' time spent generating
    trainer_busy: float  # fraction of the trainer GPUs' time spent training (and broadcasting)
    stale_samples_per_step: float
    aborted_token_frac: float  # of generated tokens
    sync_s: float  # weights from trainer to engines, per step
    engine_cap: int  # concurrent sequences per engine
    steps: int
    counters: dict = field(default_factory=dict)
    trained_groups: list = field(default_factory=list)  # (gid, staleness) of each trained group, when recorded
    timeline: dict = field(default_factory=dict)  # busy intervals, with --record (tests)


# --------------------------------------------------------------------------------------
# The simulation
# --------------------------------------------------------------------------------------


FINISH, TRAIN_DONE, WEIGHTS = 0, 1, 2  # event kinds, in this order at equal times


class Simulation:
    """One placement over ``steps`` training steps; ``record`` keeps timelines for the tests."""

    def __init__(self, setup: Setup, cfg: Config, record: bool = False):
        self.setup, self.cfg, self.record = setup, cfg, record
        r = cfg.recipe
        self.n, self.batch = r.n, r.prompts_per_step
        tp = r.engine_tp
        if setup.engine_gpus % tp or setup.engine_gpus <= 0:
            raise ValueError(f"{setup.engine_gpus} engine GPUs do not hold engines of TP {tp}")
        mem_util = r.mem_util if setup.colocated else cfg.hw.engine_mem_util
        self.cap = engine_capacity(cfg, tp, mem_util, mean_running_context(cfg))
        cost = DecodeCost.of(cfg.hw, cfg.model, tp)
        self.engines = [Engine(i, cost, self.cap, record) for i in range(setup.engine_gpus // tp)]
        self.stream, self.retry = PromptStream(cfg, cfg.seed), deque()
        self.c = Counters()
        self.sync_s = cfg.hw.colocated_sync_s if setup.colocated else broadcast_seconds(cfg)
        self.step_ends: list[float] = []
        self.snapshots: list[Counters] = []  # the counters at each step's end
        self.trained_groups: list[tuple[int, int]] = []
        self.trainer_intervals: list[tuple[float, float]] = []
        # the streaming/separate loop's state
        self.events: list[tuple[float, int, int, Any]] = []
        self.order = 0
        self.now = 0.0
        self.version = 0  # the engines' weights
        self.trainer_version = 0  # updates done
        self.consumed = 0  # groups trained on
        self.ready: deque[Group] = deque()
        self.inflight: dict[int, Group] = {}
        self.trainer_busy_until = 0.0
        self.training = False
        self.paused = False

    # ---- shared pieces -----------------------------------------------------------------

    def next_group(self) -> Group:
        """A prompt aborted earlier (tried again first), else the next fresh one."""
        if self.retry:
            g = self.retry.popleft()
            g.attempt += 1
            g.reset()
            return g
        return self.stream.take()

    def train_seconds(self, groups: list[Group]) -> float:
        """Logprob pass + update over ``groups`` on the trainer's GPUs."""
        t, gpus = self.cfg.train, self.setup.trainer_gpus
        flops = sum(g.flops for g in groups)
        update = flops / (gpus * t.update_tflops * 1e12 * t.train_speedup)
        logprob = (2 / 3) * flops / (gpus * t.logprob_tflops * 1e12 * t.train_speedup)
        return update + logprob

    def count_trained(self, groups: list[Group], start: float, seconds: float) -> None:
        self.c.trained_samples += self.n * len(groups)
        self.c.trained_tokens += sum(g.response_tokens for g in groups)
        self.c.trainer_busy_s += seconds
        if self.record:
            self.trained_groups.extend((g.gid, self.trainer_version - g.oldest) for g in groups)
            self.trainer_intervals.append((start, start + seconds))

    def end_step(self, t: float) -> None:
        self.step_ends.append(t)
        self.snapshots.append(self.totals())

    def totals(self) -> Counters:
        """The counters with the engines' own totals folded in."""
        c = dataclasses.replace(self.c)
        c.generated_tokens = sum(e.tokens for e in self.engines)
        c.engine_busy_s = sum(e.busy for e in self.engines)
        return c

    # ---- colocated synchronous: rounds with a barrier ---------------------------------------

    def run_sync(self, steps: int) -> None:
        t = 0.0
        for _ in range(steps):
            kept, drawn, rounds = [], 0, 0
            while len(kept) < self.batch and rounds < self.cfg.recipe.max_rounds:  # as train.collect_samples
                rounds += 1
                keep_rate = len(kept) / drawn if drawn else 1.0
                count = min(self.batch, math.ceil((self.batch - len(kept)) / max(keep_rate, 0.1)))
                groups = [self.next_group() for _ in range(count)]
                drawn += count
                t = self.sync_round(groups, t)
                kept += self.score_round(groups)
            self.c.surplus_samples += self.n * max(0, len(kept) - self.batch)
            kept = kept[:self.batch]
            seconds = self.train_seconds(kept)
            self.count_trained(kept, t, seconds)
            t += seconds + self.sync_s
            for e in self.engines:
                e.time = t
            self.end_step(t)

    def sync_round(self, groups: list[Group], start: float) -> float:
        """All groups generated at once (spread over the engines); returns when the slowest ends."""
        for i, g in enumerate(groups):
            self.engines[i % len(self.engines)].waiting.extend(Seq(g, j) for j in range(self.n))
        end = start
        for e in self.engines:
            e.time = start
            e.fill(self.version)
            while e.running:
                self.c.finished_samples += len(e.next_finished())
                e.fill(self.version)
            end = max(end, e.time)
        return end

    def score_round(self, groups: list[Group]) -> list[Group]:
        kept = [g for g in groups if g.signal]
        self.c.scored_groups += len(groups)
        self.c.kept_groups += len(kept)
        self.c.filtered_samples += self.n * (len(groups) - len(kept))
        return kept

    # ---- streaming and separate: one event loop -----------------------------------------

    def push(self, t: float, kind: int, payload: Any = None) -> None:
        self.order += 1
        heapq.heappush(self.events, (t, kind, self.order, payload))

    def schedule(self, e: Engine) -> None:
        """(Re)schedule ``e``'s next finish; older entries for it go stale (epoch)."""
        e.epoch += 1
        t = e.finish_time()
        if t is not None:
            self.push(t, FINISH, (e.index, e.epoch))

    def run_stream(self, steps: int) -> None:
        self.restart_all()
        while len(self.step_ends) < steps:
            if not self.events:
                raise RuntimeError(f"{self.setup.label()}: nothing left to happen after {len(self.step_ends)} steps")
            t, kind, _, payload = heapq.heappop(self.events)
            self.now = t
            if kind == FINISH:
                self.on_finish(*payload)
            elif kind == TRAIN_DONE:
                self.on_train_done(t, payload)
            else:
                self.on_weights(t, payload)

    def stops_at_batch(self) -> bool:
        """Generation stops when the batch is in: colocated streaming, and separate with k = 0."""
        return self.setup.colocated or self.setup.k == 0

    def keep_estimate(self) -> float:
        """The keep rate so far, starting from a prior of one batch kept whole (train.py's first
        round assumes 1.0), so that the first few groups scored do not swing it; at least 0.1."""
        return max((self.c.kept_groups + self.batch) / (self.c.scored_groups + self.batch), 0.1)

    def may_start_group(self) -> bool:
        """The controller: groups expected to carry signal stay within the batches that the
        engines' weights may still feed (k + 1 of them), plus the overcommit."""
        if self.paused:
            return False
        expected = self.consumed + len(self.ready) + len(self.inflight) * self.keep_estimate()
        extra = self.cfg.work.overcommit if self.stops_at_batch() else 0.0  # else: late groups serve the next step
        return expected < (self.version + self.setup.k + 1 + extra) * self.batch

    def dispatch(self) -> None:
        """New groups while the controller allows, each to the least loaded engine (running and
        queued sequences) that has room; an engine is brought up to now before it gets one."""
        touched: dict[int, Engine] = {}
        while self.may_start_group():
            e = min(self.engines, key=Engine.load)
            if e.load() >= e.cap:
                break
            if e.index not in touched:
                e.advance_until(self.now)
                touched[e.index] = e
            g = self.next_group()
            self.inflight[g.gid] = g
            e.waiting.extend(Seq(g, j) for j in range(self.n))
            e.fill(self.version)
        for e in touched.values():
            self.schedule(e)

    def restart_all(self) -> None:
        """Every engine admits what it holds queued, then new groups are dispatched."""
        for e in self.engines:
            e.fill(self.version)
            self.schedule(e)
        self.dispatch()

    def on_finish(self, index: int, epoch: int) -> None:
        e = self.engines[index]
        if epoch != e.epoch:
            return
        for seq in e.next_finished():
            self.c.finished_samples += 1
            g = seq.group
            if g.gid not in self.inflight:  # its group was aborted by a sample finishing at the same step
                self.c.discarded_samples += 1
                self.c.aborted_tokens += seq.length
                continue
            g.done += 1
            g.made += seq.length
            g.finished_oldest = min(g.finished_oldest, seq.version)
            if g.done == self.n:
                self.group_done(g)
        e.fill(self.version)
        self.schedule(e)
        self.dispatch()

    def stale(self, g: Group) -> bool:
        """Too old for the next policy that could train on it (the current trainer version)."""
        return self.trainer_version - g.oldest > self.setup.k

    def group_done(self, g: Group) -> None:
        del self.inflight[g.gid]
        self.c.scored_groups += 1
        if not g.signal:
            self.c.filtered_samples += self.n
            return
        self.c.kept_groups += 1
        if self.stale(g):
            self.c.stale_samples += self.n
            return
        self.ready.append(g)
        if self.stops_at_batch() and len(self.ready) >= self.batch:
            self.abort_inflight()
        self.maybe_train()

    def abort_inflight(self) -> None:
        """The batch is in: every unfinished group is aborted (its finished samples too) and its
        prompt tried again first later; the engines wait for the new weights."""
        for e in self.engines:
            e.advance_until(self.now)
            for seq in e.abort_running():
                self.c.aborted_tokens += seq.made(e.steps)
            e.waiting.clear()
            self.schedule(e)
        for g in self.inflight.values():
            self.c.discarded_samples += g.done
            self.c.aborted_tokens += g.made
            self.retry.append(g)
        self.inflight.clear()
        self.paused = True

    def take_batch(self) -> Optional[list[Group]]:
        """``batch`` groups fresh enough for the trainer's next step (stale ones dropped), or None."""
        fresh = deque()
        while self.ready:
            g = self.ready.popleft()
            if self.stale(g):
                self.c.stale_samples += self.n
            else:
                fresh.append(g)
        self.ready = fresh
        if len(fresh) < self.batch:
            return None
        return [self.ready.popleft() for _ in range(self.batch)]

    def maybe_train(self) -> None:
        if self.training or self.now < self.trainer_busy_until or len(self.ready) < self.batch:
            return
        groups = self.take_batch()
        if groups is None:
            return
        self.training = True
        seconds = self.train_seconds(groups)
        self.consumed += len(groups)
        self.count_trained(groups, self.now, seconds)
        self.push(self.now + seconds, TRAIN_DONE, len(groups))

    def on_train_done(self, t: float, groups: int) -> None:
        self.training = False
        self.trainer_version += 1
        self.trainer_busy_until = t + self.sync_s
        if not self.setup.colocated:
            self.c.trainer_busy_s += self.sync_s  # the trainer's ranks send the weights
        self.push(t + self.sync_s, WEIGHTS, self.trainer_version)

    def on_weights(self, t: float, version: int) -> None:
        """New weights on the engines: stale in-flight groups dropped, the rest aborted or resumed."""
        for e in self.engines:
            e.advance_until(t)
        if not self.setup.colocated:
            self.apply_partial()
        pause = 0.0 if self.setup.colocated else self.cfg.hw.apply_s
        for e in self.engines:
            e.time = max(e.time, t) + pause
        self.version, self.paused = version, False
        self.end_step(t)
        self.maybe_train()
        self.restart_all()

    def drop_hopeless(self) -> None:
        """In-flight groups already older than k versions can never be trained: dropped now."""
        dead = [g for g in self.inflight.values() if self.stale(g)]
        if not dead:
            return
        for g in dead:
            g.dead = True
            self.c.stale_samples += self.n
            self.c.stale_unfinished += self.n - g.done
            del self.inflight[g.gid]
        for e in self.engines:
            for seq in e.remove(lambda s: not s.group.dead):
                self.c.aborted_tokens += seq.made(e.steps)

    def apply_partial(self) -> None:
        """What the requests in flight do with the new weights. ``abort``: the running sequences
        start over (their groups' oldest tokens are then those of the finished samples), and groups
        already too old are dropped; ``resume``: groups too old are dropped, the others go on
        after their KV cache is recomputed."""
        if self.setup.partial == "abort":
            for e in self.engines:
                aborted = e.abort_running()
                self.c.aborted_tokens += sum(seq.made(e.steps) for seq in aborted)
                e.restart(aborted)
            for g in self.inflight.values():
                g.oldest = g.finished_oldest
        self.drop_hopeless()
        if self.setup.partial == "resume":
            for e in self.engines:
                e.recompute()

    # ---- results -------------------------------------------------------------------------

    def pending_samples(self) -> int:
        """Finished samples not yet accounted for: waiting to be trained, or of unfinished groups."""
        return self.n * len(self.ready) + sum(g.done for g in self.inflight.values())

    def result(self, warmup: int) -> Result:
        end = self.snapshots[-1]
        c = end.minus(self.snapshots[warmup - 1] if warmup else Counters())
        measured = len(self.step_ends) - warmup
        t0 = self.step_ends[warmup - 1] if warmup else 0.0
        wall = self.step_ends[-1] - t0
        s, gpus = self.setup, self.cfg.total_gpus
        tp = self.cfg.recipe.engine_tp
        engine_gpu_s = wall * s.engine_gpus
        res = Result(
            label=s.label(), mode=s.mode, engine_gpus=s.engine_gpus, trainer_gpus=s.trainer_gpus, k=s.k,
            partial=s.partial_label(),
            step_s=wall / measured, samples_per_s=c.trained_samples / wall,
            gen_tokens_per_s_per_gpu=c.generated_tokens / wall / gpus,
            trained_tokens_per_s_per_gpu=c.trained_tokens / wall / gpus,
            engine_busy=c.engine_busy_s * tp / engine_gpu_s, trainer_busy=c.trainer_busy_s / wall,
            stale_samples_per_step=c.stale_samples / measured,
            aborted_token_frac=c.aborted_tokens / max(1, c.generated_tokens),
            sync_s=self.sync_s, engine_cap=self.cap, steps=measured,
            counters={**dataclasses.asdict(self.totals()), "pending_samples": self.pending_samples()})
        if self.record:
            res.trained_groups = list(self.trained_groups)
            res.timeline = {"trainer": list(self.trainer_intervals),
                            "engines": [list(e.intervals or []) for e in self.engines]}
        return res


def broadcast_seconds(cfg: Config) -> float:
    """Trainer -> engines: the bf16 weights over the link, plus a latency per bucket."""
    hw, nbytes = cfg.hw, cfg.model.weight_bytes
    buckets = math.ceil(nbytes / cfg.recipe.bucket_bytes)
    return nbytes / (hw.link_gbps * 1e9 / 8 * hw.link_eff) + buckets * hw.bucket_latency_s


def simulate(setup: Setup, cfg: Config, steps: int = 10, warmup: int = 2, record: bool = False) -> Result:
    """Run one placement for ``steps`` training steps; the first ``warmup`` are not measured
    (colocated synchronous steps are independent: none are left out)."""
    sim = Simulation(setup, cfg, record)
    if setup.mode == "sync":
        sim.run_sync(steps)
        return sim.result(0)
    if setup.mode not in ("stream", "separate"):
        raise ValueError(f"unknown mode {setup.mode!r}")
    if setup.partial not in ("abort", "resume"):
        raise ValueError(f"unknown partial {setup.partial!r}")
    sim.run_stream(steps)
    return sim.result(warmup)


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def setups(total: int, splits: list[int], ks: list[int]) -> list[Setup]:
    """Colocated sync and streaming on every GPU, then each split at each k (abort and resume)."""
    out = [Setup("sync", total, total), Setup("stream", total, total)]
    for g in splits:
        for k in ks:
            for partial in (["abort"] if k == 0 else ["abort", "resume"]):
                out.append(Setup("separate", g, total - g, k, partial))
    return out


COLUMNS = [("mode", "{label}"), ("engines/trainer GPUs", "{engine_gpus}/{trainer_gpus}"),
           ("step s", "{step_s:.1f}"), ("samples/s", "{samples_per_s:.1f}"),
           ("gen tok/s/GPU", "{gen_tokens_per_s_per_gpu:.0f}"),
           ("trained tok/s/GPU", "{trained_tokens_per_s_per_gpu:.0f}"),
           ("engine busy", "{engine_busy:.2f}"), ("trainer busy", "{trainer_busy:.2f}"),
           ("stale samples/step", "{stale_samples_per_step:.0f}"), ("aborted tok", "{aborted_token_frac:.1%}"),
           ("sync s", "{sync_s:.2f}")]


def table(results: list[Result]) -> str:
    """A Markdown table, one row per placement."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        values = dataclasses.asdict(r)
        lines.append("| " + " | ".join(fmt.format(**values) for _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls``, its help the field's source or assumption."""
    for f in dataclasses.fields(cls):
        kind = {"float": float, "int": int, "Optional[float]": float}.get(str(f.type), float)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, metavar="X",
                            dest=f"{cls.__name__}.{f.name}", help=f"{f.metadata.get('help', '')} (default {f.default})")


def from_flags(args: argparse.Namespace, cls: type) -> Any:
    return cls(**{f.name: getattr(args, f"{cls.__name__}.{f.name}") for f in dataclasses.fields(cls)})


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(STAGES), default="8k", help="the recipe's stage (default 8k)")
    parser.add_argument("--recipe", default=str(RECIPE), help="recipe file (default recipes/prorl_1p5b.yaml)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--splits", default="8,12,16", help="engine GPUs of the separate placements (default 8,12,16)")
    parser.add_argument("--ks", default="0,1,2", help="staleness bounds k (default 0,1,2)")
    parser.add_argument("--gpus", type=int, default=32, help="GPUs in all (default 32: 4 nodes x 8)")
    parser.add_argument("--steps", type=int, default=10, help="training steps simulated per placement (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="of which not measured, streaming/separate (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt stream (default 0)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="recipe overrides, e.g. rollout.engine_tensor_parallel=2 train.prompts_per_step=128")
    for cls in (Hardware, Model, Training, Workload):
        add_flags(parser, cls)
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    recipe = load_recipe(args.recipe, args.overrides)
    stage = stage_recipe(recipe, STAGES[args.stage], args.overrides) if recipe.stages else recipe
    return Config(recipe=Recipe1p5b.read(stage), hw=from_flags(args, Hardware), model=from_flags(args, Model),
                  train=from_flags(args, Training), work=from_flags(args, Workload), total_gpus=args.gpus,
                  seed=args.seed)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cfg = config_from(args)
    splits = [int(s) for s in args.splits.split(",") if s]
    ks = [int(k) for k in args.ks.split(",") if k]
    results = [simulate(s, cfg, args.steps, args.warmup) for s in setups(args.gpus, splits, ks)]
    if args.json:
        print(json.dumps({"stage": args.stage, "config": dataclasses.asdict(cfg),
                          "results": [dataclasses.asdict(r) for r in results]}, indent=1))
        return 0
    r = cfg.recipe
    print(f"Projection (a model, not a measurement): {args.stage} stage, {args.gpus} x H100-80GB, "
          f"{r.prompts_per_step} prompts x {r.n} samples per step, responses up to {r.max_response} tokens, "
          f"engine TP {r.engine_tp}, {args.steps - args.warmup} measured steps (seed {args.seed})")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
