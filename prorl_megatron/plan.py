"""Memory plan: what one process holds on its device, phase by phase, before anything is built.

    python -m prorl_megatron.plan --recipe recipes/prorl_1p5b.yaml [key.sub=value ...] \\
        [--world-size 32] [--gpu-mem-gib 79.6] [--attention te|local] [--hf-config DIR] [--cpu]

A ProRL step has two memory regimes on a GPU shared by Megatron and vLLM:

- **rollout**: vLLM is awake (weights + KV cache: ``rollout.gpu_memory_utilization`` of the
  device) next to everything the trainer keeps between steps (policy weights, DDP gradient
  buffer, optimizer state, reference weights);
- **training**: vLLM sleeps at level 2 (weights discarded, KV cache released) while the
  logprob pass (no grad) and the update (forward + backward + optimizer step) run; the larger of
  the two is the training phase's peak.

On a CPU the "device" is the host's RAM, shared by the processes of the host, and vLLM never
sleeps: its weights and ``rollout.cpu_kvcache_gib`` KV cache are held in every phase.

Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198) and megatron's ``megatron/training/theoretical_memory_usage.py``,
adapted tensor by tensor to our model (GQA, SwiGLU, RMSNorm, no dropout, RoPE) and to our
logprob head (the output layer is not in the model's forward: :mod:`prorl_megatron.models.logprobs`
runs it in checkpointed chunks of ``train.logprob_chunk_tokens`` tokens). The local-spec terms
were read off the tensors autograd saves (``saved_tensors_hooks``); the peaks are checked against
measured ones on CPU in ``tests/test_plan.py``. Two attention cores:

- Transformer Engine (the NGC image; flash/fused attention): O(S) per sequence: q, k, v, the
  output and the softmax statistics;
- megatron's local spec (no TE, e.g. CPU): the scores ``[B, heads, S, S]`` are materialised,
  the softmax is taken in float32 and its output kept (plus the bf16 copy the AV product keeps),
  and megatron's global buffer holds one more ``[B, heads, S, S]`` for good.

The trainer calls :func:`check_fits` at start; it raises :class:`~prorl_megatron.config.ConfigError`
with the table and the knobs to turn when the recipe cannot fit.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from prorl_megatron.config import ConfigError, Recipe, add_recipe_arguments, recipe_from_args
from prorl_megatron.models.architectures import ModelDims
from prorl_megatron.models.forward import packing_multiples
from prorl_megatron.rollout.batch import CostModel

GIB = 1 << 30
H100_80GB = 81559 * (1 << 20)  # what an H100-80GB reports: 79.6 GiB
PHASES = ("rollout", "logprobs", "update")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Assumptions that no CPU test can measure (stated in the table where used)
GPU_RUNTIME = 1 * GIB  # CUDA context + NCCL communicators, per process
GPU_FRAGMENTATION = 0.05  # torch allocator slack on what comes and goes (megatron's estimator: 5%)
VLLM_ASLEEP = 1 * GIB  # what a level-2-asleep vLLM keeps: CUDA graph pool, sampler buffers
CPU_RUNTIME = 1 * GIB  # a process's own: torch, megatron, vLLM, transformers imported and running

KNOBS = ("lower train.max_tokens_per_micro_batch (or train.micro_batch_size), set train.recompute=full "
         "(selective: the attention core only), set train.distributed_optimizer=true (Adam state sharded "
         "over data parallel), lower train.logprob_chunk_tokens, raise parallel.tensor, or lower "
         "rollout.gpu_memory_utilization (rollout.cpu_kvcache_gib on CPU)")


@dataclass(frozen=True)
class Row:
    """One line of the plan: bytes per phase (absent: not held then) and what it is."""

    what: str
    bytes: dict[str, int]


@dataclass
class MemoryPlan:
    """Per-process memory by phase; ``fits`` is None when no device size was given.

    ``training_bytes``: the trainer's own tensors at the training phase's peak (update or
    logprob pass; no vLLM, no runtime overhead): what ``torch.cuda.max_memory_allocated`` (or a
    CPU allocation profile) measures over those passes.
    """

    title: str
    context: list[str]
    rows: list[Row]
    totals: dict[str, int]
    own_bytes: dict[str, int]  # per phase, the process's own tensors (no vLLM, no runtime overhead)
    training_bytes: int
    device_bytes: Optional[int]
    peak_phase: str
    fits: Optional[bool]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.totals[self.peak_phase]

    def verdict(self) -> str:
        phase = "rollout" if self.peak_phase == "rollout" else f"training ({self.peak_phase})"
        if self.fits is None:
            return f"peak: {phase}, {_gib(self.peak_bytes)} GiB (no device size given)"
        spare = self.device_bytes - self.peak_bytes
        word = "fits" if self.fits else "DOES NOT FIT"
        return (f"{word}: peak {phase} {_gib(self.peak_bytes)} of {_gib(self.device_bytes)} GiB "
                f"({_gib(abs(spare))} GiB {'to spare' if spare >= 0 else 'over'})")

    def table(self) -> str:
        width = max(len(r.what) for r in self.rows) + 2
        head = f"  {'GiB per process':<{width}}" + "".join(f"{p:>10}" for p in PHASES)
        lines = [self.title, *self.context, "", head]
        for r in self.rows:
            cells = "".join(f"{_gib(r.bytes[p]) if p in r.bytes else '':>10}" for p in PHASES)
            lines.append(f"  {r.what:<{width}}{cells}")
        lines.append(f"  {'total':<{width}}" + "".join(f"{_gib(self.totals[p]):>10}" for p in PHASES))
        lines += ["", self.verdict(), *(f"  note: {n}" for n in self.notes)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"MemoryPlan(training_bytes={self.training_bytes}, totals={self.totals}, "
                f"peak_phase={self.peak_phase!r}, fits={self.fits}, rows="
                + ", ".join(f"{r.what.split(':')[0]}={ {k: _gib(v) for k, v in r.bytes.items()} }" for r in self.rows)
                + ")")


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def layer_params(dims: ModelDims, tp: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank (norms are replicated)."""
    h, d, a, g, f = dims.hidden_size, dims.head_dim, dims.num_heads, dims.num_kv_heads, dims.ffn_hidden_size
    qkv = h * (a + 2 * g) * d + ((a + 2 * g) * d if dims.qkv_bias else 0)
    matrices = qkv + a * d * h + 3 * h * f  # qkv, output projection, fc1 (gate + up), fc2
    return matrices // tp + 2 * h + (2 * d if dims.qk_norm else 0)


def rank_params(dims: ModelDims, tp: int = 1, pp: int = 1) -> int:
    """Parameters on the most loaded rank: its layers, plus embedding and/or output layer."""
    embedding = dims.padded_vocab_size * dims.hidden_size // tp
    layers = layer_params(dims, tp) * (dims.num_layers // pp)
    if pp == 1:
        return layers + embedding + dims.hidden_size + (0 if dims.tied_embeddings else embedding)
    return layers + embedding + dims.hidden_size  # first stage: embedding; last: final norm + output layer


def model_params(dims: ModelDims) -> int:
    """The whole model as vLLM loads it (unpadded vocabulary)."""
    embedding = dims.vocab_size * dims.hidden_size
    return layer_params(dims) * dims.num_layers + embedding * (1 if dims.tied_embeddings else 2) + dims.hidden_size


def matmul_params(dims: ModelDims) -> int:
    """Parameters that multiply every token: the layers' linear weights and the output layer."""
    h, hd = dims.hidden_size, dims.head_dim
    attention = h * hd * (dims.num_heads + 2 * dims.num_kv_heads) + dims.num_heads * hd * h
    mlp = 3 * h * dims.ffn_hidden_size  # gate, up, down
    return dims.num_layers * (attention + mlp) + dims.padded_vocab_size * h


# --------------------------------------------------------------------------------------
# Compute: what the training planner balances
# --------------------------------------------------------------------------------------


def cost_model(dims: ModelDims, config: Any = None) -> CostModel:
    """The training planner's cost model for ``dims``: forward FLOPs of one sequence of L tokens,
    ``2 N L`` for the N matmul parameters every token goes through (layers and output layer) and
    ``2 layers heads head_dim L^2`` for causal attention's QK^T and AV (half of the L x L scores,
    as flash attention computes them): for the 1.5B model attention adds L / 36k to each token's
    cost. The backward pass costs about twice the forward in both terms, so their ratio, all the
    plan sees, holds for the update too. Left out: norms, RoPE, the softmax, and what a
    micro-batch costs whatever its length (kernel launches). ``config``: megatron's
    ``TransformerConfig``, whose packing multiples (sequence parallelism, FP8) packed
    micro-batches need; None: none.

    Not calibrated: this is the seam where a fit of measured micro-batch times to ``a L + b L^2``
    per sequence would give ``CostModel(a, b, ...)`` instead.
    """
    multiples = packing_multiples(config) if config is not None else (1, 1)
    quadratic = 2 * dims.num_layers * dims.num_heads * dims.head_dim
    return CostModel(2 * matmul_params(dims), quadratic, *multiples)


# --------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """The largest micro-batch and the per-rank sizes the activation terms use."""

    tokens: int  # T: rows x padded length on one rank
    seq: int  # S: the longest row (max_prompt_tokens + max_response_tokens)
    rows: int  # B: T / S (attention's sum of B S^2 is bounded by T S)
    chunk: int  # tokens of one logprob chunk
    e: int  # bytes of the training dtype
    h: int
    d: int
    heads: int  # per TP rank
    groups: int  # KV heads per TP rank
    ffn: int  # per TP rank
    vocab: int  # padded vocabulary per TP rank
    layers: int  # on the most loaded pipeline stage
    sp: int  # divisor of the [T, h] terms: TP under sequence parallelism, else 1


def shapes(recipe: Recipe, dims: ModelDims) -> Shapes:
    t, pp = recipe.parallel.tensor, recipe.parallel.pipeline
    seq = recipe.rollout.max_prompt_tokens + recipe.rollout.max_response_tokens
    budget = recipe.train.max_tokens_per_micro_batch
    tokens = budget if budget is not None else recipe.train.micro_batch_size * seq
    return Shapes(
        tokens=tokens, seq=seq, rows=max(1, tokens // seq), chunk=min(tokens, recipe.train.logprob_chunk_tokens),
        e=BYTES[recipe.precision.params_dtype], h=dims.hidden_size, d=dims.head_dim,
        heads=dims.num_heads // t, groups=max(1, dims.num_kv_heads // t), ffn=dims.ffn_hidden_size // t,
        vocab=dims.padded_vocab_size // t, layers=dims.num_layers // pp,
        sp=t if recipe.parallel.sequence_parallel else 1,
    )


def layer_terms(s: Shapes, te: bool) -> dict[str, int]:
    """What one layer keeps for backward without recompute, over the whole micro-batch, in three
    parts by the order the forward makes them: ``pre`` (before the attention core), ``core``,
    ``post`` (projection input, second norm, MLP). Korthikanti's table 2 term by term for this
    model: no dropout masks (hidden and attention dropout are 0), GQA, SwiGLU, RMSNorm, RoPE.
    Also ``selective``: the core's inputs, kept instead of ``core`` when the core is recomputed.
    """
    T, h, e, d, a, g, f = s.tokens, s.h, s.e, s.d, s.heads, s.groups, s.ffn
    # TE's fused norm keeps its input and 1/rms; torch's RMSNorm (local spec) keeps the float32
    # upcast input and the normalised float32 product
    norm = ((h * e + 4) // s.sp if te else 8 * h + 4) * T
    norm_out = h // s.sp * e * T  # the QKV (fc1) input
    rope = 4 * s.seq * d * e  # cos and sin, for q and k, per position
    core_inputs = ((a + 2 * g) + a + g) * d * e * T  # fused QKV output (v is a view of it), rotated q and k
    mlp = (3 if te else 5) * f * e * T  # fc1 output [2f] + fc2 input [f]; local: + silu output, + (x_linear + 0)
    post = a * d * e * T + norm + norm_out + mlp
    if te:  # flash/fused attention keeps q, k, v, its output (the projection input) and softmax stats
        return dict(pre=norm + norm_out + rope + core_inputs, core=4 * a * T, post=post, selective=0)
    # local core: q, and k and v repeated to every head; the scores; the causal mask
    core = 3 * a * d * e * T + scores(s) * score_bytes(s) + s.seq * s.seq
    return dict(pre=norm + norm_out + rope, core=core, post=post, selective=core_inputs)


def scores(s: Shapes) -> int:
    """Elements of the local spec's attention scores [B, heads, S, S] (bounded by T x S)."""
    return s.rows * s.heads * s.seq * s.seq


def score_bytes(s: Shapes) -> int:
    """One score element as kept for backward: the float32 softmax output, plus its bf16/fp16
    copy that the AV product keeps (in float32 they are one tensor)."""
    return 4 + (s.e if s.e < 4 else 0)


def saved_per_layer(s: Shapes, recompute: str, te: bool) -> int:
    """Bytes one layer keeps for backward under ``train.recompute``."""
    if recompute == "full":  # only the layer's input
        return s.tokens * s.h * s.e // s.sp
    t = layer_terms(s, te)
    if recompute == "selective" and not te:  # the core runs again in backward: its inputs are kept
        return t["pre"] + t["selective"] + t["post"]
    return t["pre"] + t["core"] + t["post"]


def tail_saved(s: Shapes, te: bool) -> int:
    """What is kept after the layers: the final norm, the float32 hidden states the logprob
    chunks are cut from (Float16Module hands them over in float32), the token ids."""
    return ((s.h * s.e + 4) if te else (8 * s.h + 4)) * s.tokens + 4 * s.h * s.tokens + 8 * s.tokens


def chunk_transient(s: Shapes, with_entropy: bool = False) -> int:
    """The logprob head's peak over one chunk of ``c`` tokens x ``V/tp`` logits.

    Training (recomputed in backward): the output layer's bf16 logits, their float32 copy and
    the temperature-scaled float32 copy (which cross-entropy turns into its softmax in place)
    are alive together. No grad with the entropy (the old-policy pass): the float32 logits,
    the shifted logits, their exp, the product, zeros and the ``where`` output (+ its mask).
    """
    c, v = s.chunk, s.vocab
    training = 8 + (s.e if s.e < 4 else 0)
    return (max(4 * 6 + 1, training) if with_entropy else training) * c * v


def core_extra(s: Shapes, te: bool) -> tuple[int, int]:
    """``(forward, backward)``: what the attention core holds beyond what it keeps.

    Local spec, forward: the raw scores and their float32 copy next to the softmax output and
    its bf16 copy; backward: the float32 gradient into and out of the softmax next to its kept
    output (the bf16 copy is gone by then). In float32 the softmax input is a view of the raw
    scores (``.float()`` is a no-op), so the in-place causal mask makes autograd copy the whole
    gradient once more (CopySlices). Flash attention: O(S), left out.
    """
    if te:
        return 0, 0
    low = s.e if s.e < 4 else 0
    return (low + 4) * scores(s), (8 - low if low else 12) * scores(s)


def forward_transient(s: Shapes, te: bool) -> int:
    """One layer's forward without grad (the logprob pass): the largest set alive at once."""
    T, e = s.tokens, s.e
    mlp = 4 * s.ffn * e * T + 3 * s.h * e * T
    if te:
        return mlp
    return max(mlp, core_extra(s, te)[0] + scores(s) * score_bytes(s) + 9 * s.seq * s.seq)


def pipeline_in_flight(recipe: Recipe, dp: int) -> int:
    """Micro-batches in flight on the first pipeline stage under 1F1B: ``min(pp, micro-batches
    per mini-batch)``; under a token budget the count depends on the lengths: ``pp``, the most."""
    pp, cfg = recipe.parallel.pipeline, recipe.train
    if pp == 1 or cfg.max_tokens_per_micro_batch is not None:
        return pp
    rows = -(-cfg.mini_batch_prompts * recipe.rollout.n // dp)
    return min(pp, -(-rows // cfg.micro_batch_size))


def update_activations(s: Shapes, recompute: str, te: bool, in_flight: int = 1) -> tuple[int, int, str]:
    """``(kept, transient, what the transient is)`` at the update's peak.

    ``kept``: every layer's saved tensors and the tail, at the start of backward. The forward's
    own peak (the last layer's attention core, before its MLP and the tail exist) and each
    backward step's extra are expressed as a transient over ``kept``. ``in_flight``: the
    micro-batches whose activations the first pipeline stage holds at once under the 1F1B
    schedule (``min(pp, micro-batches)``, as Megatron-LM's ``theoretical_memory_usage`` counts
    them); the last stage holds one, and the tail.
    """
    t, L = layer_terms(s, te), s.layers
    fwd_core, bwd_core = core_extra(s, te)
    mlp_grads = (3 if te else 4) * s.ffn * s.e * s.tokens  # fc1 output [2f] and SwiGLU-half gradients
    layers = L * saved_per_layer(s, recompute, te)
    tail = tail_saved(s, te)
    kept = max(in_flight * layers, layers + tail)
    # backward starts at the logprob head: each chunk is recomputed while the gradient of the
    # hidden states [T, h] float32 accumulates; the output layer's backward holds the logits'
    # gradient and the whole weight gradient [V/tp, h] (added into the DDP buffer afterwards)
    wgrad = s.e * s.chunk * s.vocab + s.e * s.vocab * s.h
    head = 4 * s.h * s.tokens + max(chunk_transient(s), wgrad, 4 * s.h * s.tokens)
    whole = t["pre"] + t["core"] + t["post"]
    if recompute == "full":  # each layer's activations come back (forward again) for its backward
        options = {"one layer recomputed + backward": whole + max(bwd_core, mlp_grads),
                   "one layer's forward": t["pre"] + t["core"] + fwd_core}
    elif recompute == "selective" and not te:  # the core alone comes back
        options = {"attention core recomputed + backward": t["core"] + max(fwd_core, bwd_core),
                   "last layer's forward (attention core)": t["core"] + fwd_core - t["post"] - tail}
    else:
        options = {"layer backward": max(bwd_core, mlp_grads),
                   "last layer's forward (attention core)": fwd_core - t["post"] - tail}
    options["logprob chunk backward (fp32 logits, softmax)"] = head
    what = max(options, key=options.get)
    return kept, max(0, options[what]), what


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


def estimate(recipe: Recipe, dims: ModelDims, world_size: int, device_mem_bytes: Optional[int] = None,
             te: bool = True, on_gpu: bool = True) -> MemoryPlan:
    """The memory plan of ``recipe`` for ``dims`` at ``world_size`` processes (one per device).

    ``device_mem_bytes``: what one process may use (a GPU's total; on CPU the host's RAM over
    the processes of the host); None: no verdict. ``te``: Transformer Engine's attention
    (else megatron's local spec); ``on_gpu``: vLLM takes ``gpu_memory_utilization`` of the
    device and sleeps for training (else: CPU, weights + ``cpu_kvcache_gib``, always resident).
    """
    if te and not on_gpu:
        raise ValueError("Transformer Engine runs on GPUs only: te=True needs on_gpu=True")
    tp, pp, cfg = recipe.parallel.tensor, recipe.parallel.pipeline, recipe.train
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline = {tp * pp}")
    dp = world_size // (tp * pp)
    s = shapes(recipe, dims)
    dtype = recipe.precision.params_dtype
    n = rank_params(dims, tp, pp)
    low = s.e < 4
    grad_bytes = 4 if (recipe.precision.grad_reduce_in_fp32 or not low) else s.e
    shard = dp if cfg.distributed_optimizer else 1
    state = (12 if low else 8) * n // shard  # fp32 main weights (bf16/fp16 only) + Adam's two moments

    def row(what: str, nbytes: int, phases=PHASES) -> Row:
        return Row(what, {p: int(nbytes) for p in phases})

    rows = [
        row(f"policy weights ({n / 1e9:.3g}B params, {dtype})", n * s.e),
        row(f"gradients: DDP buffer ({'fp32' if grad_bytes == 4 else dtype})", n * grad_bytes),
        row("optimizer: " + ("fp32 main weights + " if low else "") + "Adam moments"
            + (f" / DP {dp} (distributed)" if shard > 1 else ""), state),
    ]
    if low and grad_bytes < 4:  # Float16Optimizer's fp32 copies of the grads, kept until zero_grad
        rows.append(row("optimizer: fp32 main grads (until zero_grad)", 4 * n // shard, ("rollout", "logprobs")))
    rows.append(row(f"reference weights ({dtype})", n * s.e))
    if not te:  # megatron's global buffer for baddbmm: allocated at the first micro-batch, kept
        rows.append(row("local attention: global [B, heads, S, S] buffer", s.rows * s.heads * s.seq ** 2 * s.e))

    engine_tp = recipe.rollout.engine_tensor_parallel
    if on_gpu:
        util = recipe.rollout.gpu_memory_utilization
        awake = int(util * device_mem_bytes) if device_mem_bytes else 0
        rows.append(row(f"vLLM awake: weights + KV cache ({util:g} x device)", awake, ("rollout",)))
        asleep = VLLM_ASLEEP if recipe.rollout.sleep_between_rollouts else awake
        rows.append(Row("vLLM asleep (level 2): graphs, buffers [assumed]" if recipe.rollout.sleep_between_rollouts
                        else "vLLM (sleep_between_rollouts=false: stays)", {"logprobs": asleep, "update": asleep}))
    else:
        kv = max(1, int(recipe.rollout.cpu_kvcache_gib)) * GIB  # as RolloutEngine sets VLLM_CPU_KVCACHE_SPACE
        rows.append(row(f"vLLM on CPU (no sleep): weights/TP{engine_tp} + KV cache",
                        model_params(dims) * s.e // engine_tp + kv))

    # the logprob pass (no grad): hidden states kept while chunks run; the largest intermediate
    hidden = 4 * s.h * s.tokens  # kept while the chunks run
    logprob_peak = max(hidden + chunk_transient(s, with_entropy=True), forward_transient(s, te))
    kept, transient, what = update_activations(s, cfg.recompute, te, in_flight := pipeline_in_flight(recipe, dp))
    # the optimizer step, after backward: each parameter's Adam temporaries (the largest, twice)
    largest = max(dims.padded_vocab_size * dims.hidden_size // tp, 3 * dims.hidden_size * dims.ffn_hidden_size // tp)
    step = 2 * 4 * largest + (4 * n // shard if low and grad_bytes < 4 else 0)
    if step > kept + transient:
        kept, transient, what = 0, step, "optimizer step temporaries"
    attention = "Transformer Engine (flash/fused, O(S))" if te else "local spec ([B, heads, S, S] scores, fp32 softmax)"
    rows += [
        Row(f"activations kept (recompute={cfg.recompute}" + (f", {in_flight} micro-batches in flight on the first "
                                                               "pipeline stage)" if pp > 1 else ")"), {"update": kept}),
        Row(f"update transient: {what}", {"update": transient}),
        Row("logprob pass transient: " + ("fp32 hidden + chunk with entropy"
                                if logprob_peak > forward_transient(s, te) else "one layer's forward"),
            {"logprobs": logprob_peak}),
    ]
    own = {p: sum(r.bytes.get(p, 0) for r in rows if not r.what.startswith("vLLM")) for p in PHASES}
    if on_gpu:
        rows.append(Row("CUDA context, NCCL, allocator slack [assumed]",
                        {"rollout": GPU_RUNTIME,
                         "logprobs": GPU_RUNTIME + int(GPU_FRAGMENTATION * logprob_peak),
                         "update": GPU_RUNTIME + int(GPU_FRAGMENTATION * (kept + transient))}))
    else:
        rows.append(row("the process's libraries [assumed]", CPU_RUNTIME))
    totals = {p: sum(r.bytes.get(p, 0) for r in rows) for p in PHASES}
    peak = max(PHASES, key=lambda p: totals[p])
    fits = None if device_mem_bytes is None else totals[peak] <= device_mem_bytes
    budget = cfg.max_tokens_per_micro_batch
    source = (f"train.max_tokens_per_micro_batch={budget}" if budget is not None
              else f"train.micro_batch_size {cfg.micro_batch_size} x {s.seq}")
    device = (f"{_gib(device_mem_bytes)} GiB" if device_mem_bytes else "size not given") + (" GPU" if on_gpu else
                                                                                              " of host RAM")
    context = [
        f"model: {dims.architecture}, {dims.num_layers} layers, hidden {dims.hidden_size}, heads {dims.num_heads}/"
        f"{dims.num_kv_heads} kv, ffn {dims.ffn_hidden_size}, vocab {dims.padded_vocab_size}; {dtype}",
        f"layout: {world_size} processes = TP {tp} x PP {pp} x DP {dp}; device: {device}",
        f"largest micro-batch: {s.tokens} tokens ({source}), rows of up to {s.seq} "
        f"(rollout.max_prompt_tokens + max_response_tokens); logprob chunk {s.chunk} tokens",
        f"attention: {attention} [{'assumed: TE present, as in the NGC image' if te else 'no TE'}]",
    ]
    notes = []
    if not te and s.seq > 4096:
        notes.append("the local spec is quadratic in the sequence: Transformer Engine (the NGC image) or "
                     "train.recompute=selective removes the kept [B, heads, S, S] terms")
    if fits is False:
        notes.append("to fit: " + KNOBS)
    return MemoryPlan(title=f"Memory plan for {recipe.name}: per process ({'GPU' if on_gpu else 'CPU'})",
                      context=context, rows=rows, totals=totals,
                      own_bytes=own, training_bytes=max(own["logprobs"], own["update"]),
                      device_bytes=device_mem_bytes, peak_phase=peak, fits=fits, notes=notes)


def plan_table(recipe: Recipe, dims: ModelDims, world_size: int, device_mem_bytes: Optional[int] = None,
               te: bool = True, on_gpu: bool = True) -> str:
    """The plan's table as text (what the CLI prints and the trainer logs)."""
    return estimate(recipe, dims, world_size, device_mem_bytes, te, on_gpu).table()


def check_fits(recipe: Recipe, dims: ModelDims, world_size: int, device_mem_bytes: Optional[int],
               te: bool, on_gpu: Optional[bool] = None) -> MemoryPlan:
    """The plan, or :class:`ConfigError` (the table and the knobs to turn) if it cannot fit.

    ``on_gpu`` None: whether this process sees a CUDA device. ``device_mem_bytes`` None: no check.
    """
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    plan = estimate(recipe, dims, world_size, device_mem_bytes, te=te and on_gpu, on_gpu=on_gpu)
    if plan.fits is False:
        raise ConfigError(f"the recipe does not fit the device memory:\n{plan.table()}")
    return plan


def local_processes(env: Optional[dict] = None) -> int:
    """Processes on this host: torchrun's LOCAL_WORLD_SIZE, Slurm's SLURM_TASKS_PER_NODE ("8(x4)"), else 1."""
    env = os.environ if env is None else env
    if env.get("LOCAL_WORLD_SIZE"):
        return int(env["LOCAL_WORLD_SIZE"])
    tasks = env.get("SLURM_TASKS_PER_NODE", "")
    digits = tasks.split("(")[0].split(",")[0]
    return int(digits) if digits.isdigit() else 1


def device_memory_bytes(processes: Optional[int] = None) -> tuple[int, bool]:
    """``(bytes one process may use, on_gpu)``: this process's GPU, or the host's RAM shared by
    ``processes`` (default :func:`local_processes`)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory), True
    import psutil

    return int(psutil.virtual_memory().total) // (processes or local_processes()), False


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _dims(recipe: Recipe, hf_config: Optional[str]) -> ModelDims:
    from prorl_megatron.models.architectures import model_dims, read_hf_config

    if hf_config:
        path = Path(hf_config)
        directory = path.parent if path.name == "config.json" else path
    elif recipe.model.mcore_ckpt and Path(recipe.model.mcore_ckpt).exists():
        from prorl_megatron.checkpoint.dist_ckpt import hf_config_dir

        directory = hf_config_dir(recipe.model.mcore_ckpt)
    else:
        directory = Path(recipe.model.hf_path)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory}/config.json not found: give the model's HF config with --hf-config DIR")
    return model_dims(read_hf_config(str(directory)))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Per-process memory plan of a ProRL recipe.")
    add_recipe_arguments(parser)
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes (one per device); default: parallel.tensor x parallel.pipeline")
    parser.add_argument("--gpu-mem-gib", type=float, default=H100_80GB / GIB,
                        help="memory of one GPU in GiB (default: an H100-80GB's 79.6)")
    parser.add_argument("--attention", choices=["te", "local"], default="te",
                        help="te: Transformer Engine present (NGC image); local: megatron's local spec")
    parser.add_argument("--cpu", action="store_true",
                        help="plan for this host's RAM (psutil), shared by --world-size processes")
    parser.add_argument("--hf-config", default=None,
                        help="directory (or config.json) of the model's HF config, if the recipe's is not here")
    args = parser.parse_args(argv)
    try:
        recipe = recipe_from_args(args)
        dims = _dims(recipe, args.hf_config)
        world = args.world_size or recipe.parallel.tensor * recipe.parallel.pipeline
        if args.cpu:
            import psutil

            device, on_gpu, te = int(psutil.virtual_memory().total) // world, False, False
        else:
            device, on_gpu, te = int(args.gpu_mem_gib * GIB), True, args.attention == "te"
        plan = estimate(recipe, dims, world, device, te=te, on_gpu=on_gpu)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.table())
    if not plan.fits:
        print(f"error: {recipe.name} does not fit: {KNOBS}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
