"""The trainer's own step on one GPU, without generation (issues 13 and 28): restart exactness,
speed and memory of the 1.5B update, in bf16 and fp16.

    bash bench/gpu_check.sh                                   # a lent GPU: the one command (< 10 min)
    python3 bench/gpu_check.py [--out FILE] [--budget-s 450]  # the same, without the wheel install
    python bench/gpu_check.py --cpu-smoke                     # a dry run here: tiny model, 2 processes, gloo

What runs is the trainer's code, not a copy: the replay (prorl_megatron/replay.py) feeds a step's
samples to ``train.train_on_samples`` (advantages -> training plan -> old and reference logprobs
-> one update per mini-batch, the loss scaled over micro-batches and ranks), then the run
controller decides and ``control.apply.apply_actions`` carries it out (the scheduled reset: the
reference <- the policy, Adam afresh; the stage entry: a reset, then the stage's ``train.lr`` and
``algo.kl_coef``, no engine), then ``train.end_step`` (megatron's distributed checkpoint with the
optimizer every 2 steps, the metrics record, the stop-signal collective). The trainer is built by
``train.passes_only`` (the policy from an HF directory, the reference a copy, megatron's
optimizer), in processes started by torchrun: ``init_parallel`` makes the group
``cpu:gloo,cuda:nccl`` on a GPU (world size 1: one GPU), ``gloo`` with ``--cpu-smoke`` (2 processes,
data parallel with megatron's DistributedOptimizer).

The model: DeepSeek-R1-Distill-Qwen-1.5B's shape (:data:`QWEN2_1P5B`; random weights written as
an HF directory here, nothing downloaded); the recipe: recipes/prorl_1p5b.yaml with the check's
overrides (:func:`check_overrides`: a step of 2 prompts x 2 samples in 2 mini-batches, the
micro-batch token budget the memory plan lets fit, ``train.recompute=selective`` since no
Transformer Engine is on the lent machines, so megatron's local spec runs unfused attention;
``train.lr=3e-4``, so that bf16 weights move; ``reset.after_steps=2``; a second stage entered
after step 4 that changes ``train.lr`` and ``algo.kl_coef``). The samples:
:func:`prorl_megatron.replay.synthetic_steps` (R1-like lengths: responses lognormal, median
4,096, capped at 8,192; prompts up to 1,024; random token ids; every step has one response at
the cap), or a recorded file (``--samples``).

Per dtype (bfloat16, then float16), two launches:

1. **straight**: steps 1..5 (reset after step 2, checkpoint 2; stage entry after step 4, which
   absorbs the second scheduled reset, checkpoint 4; step 5 in the new stage);
2. **restart**: a fresh process restores step 2's checkpoint (models, optimizer, fp16 loss
   scale, RNG states, run controller) and replays steps 3..5. Compared with the straight run:
   every metric and event record of steps 3..5 but the wall times, ``tokens_per_s`` and the
   memory peaks. On CPU they must be equal bit for bit. On CUDA the processes run with
   ``torch.use_deterministic_algorithms(True, warn_only=True)`` and
   ``CUBLAS_WORKSPACE_CONFIG=:4096:8``; the check says whether the records are bitwise equal,
   and passes otherwise only with integers, strings and events equal and every float within a
   relative :data:`CUDA_RTOL` (the largest difference is reported).

Figures, from the same runs: per dtype, update tokens/s and MFU of the replayed steps (model
FLOPs 6 N S + 12 L h S^2 per sequence of S real tokens, over the 989 TFLOP/s dense bf16/fp16 peak
of H100/H200 SXM and over the matmul rate measured at the start), and the measured peaks
(``torch.cuda.max_memory_allocated``) of the logprob pass and the update against the memory plan
(``prorl_megatron.plan.estimate`` of the same recipe: its ``own_bytes``). In the first dtype's
straight run, after its steps, as far as ``--budget-s`` leaves time (the launches still to come
are reserved first): ``plans`` (the row plan, ``micro_batch_size`` rows per micro-batch, against
the token budget, on one batch of ``--plan-rows`` rows, through ``train_on_samples``),
``logprob_memory`` (the chunked logprob head against full logits) and ``recompute`` (one long row
with the attention core recomputed and not). The JSON (``--out``, default ``$OUT/gpu_check.json``)
is rewritten after every launch; the exit status is 1 when a restart check fails or a launch
fails.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from prorl_megatron.metrics import PhaseTimer  # noqa: E402
from prorl_megatron.plan import matmul_params  # noqa: E402

# DeepSeek-R1-Distill-Qwen-1.5B's config.json (the fields model_dims reads); random weights
QWEN2_1P5B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, rope_theta=10000.0,
    tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-6, hidden_act="silu",
    initializer_range=0.02, use_sliding_window=False,
)
# a few-layer toy of the same family for --cpu-smoke
TINY = dict(QWEN2_1P5B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, max_position_embeddings=4096)

# dense bf16/fp16 (no sparsity) datasheet peak of the SXM parts, FLOP/s
PEAK_16BIT = {"H200": 989e12, "H100": 989e12}
STEPS, RESTART_FROM = 5, 2  # steps replayed; the checkpoint the restart resumes
CUDA_RTOL = 1e-3  # a float metric's relative difference allowed on CUDA when the records are not bitwise equal
UNCOMPARED = ("time/", "memory/", "tokens_per_s")  # metric prefixes that differ between runs by nature
GIB = 2 ** 30
CUDA = torch.cuda.is_available()


def log(message: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # torchrun's workers: rank 0 speaks
        return
    print(f"[gpu_check {time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / GIB, 3)


def allocated() -> Optional[int]:
    """Bytes allocated on the GPU now, after its queued work (None on CPU)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def model_flops(dims: Any, lengths: list[int]) -> float:
    """Forward + backward model FLOPs of sequences of these real lengths (see the docstring)."""
    n = matmul_params(dims)
    attn_width = dims.num_heads * dims.head_dim
    return float(sum(6 * n * s + 12 * dims.num_layers * attn_width * s * s for s in lengths))


class PeakTimer(PhaseTimer):
    """The trainer's phase timer, with the device synchronised at each phase's ends (so a phase's
    seconds are its GPU work) and each phase's peak allocated memory (``memory/<phase>_peak_gib``,
    the largest over its calls; CUDA only)."""

    def __init__(self) -> None:
        super().__init__()
        self.peaks: dict[str, int] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with super().__call__(phase):
            yield
            if CUDA:
                torch.cuda.synchronize()
        if CUDA:
            self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated())

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), **{f"memory/{k}_peak_gib": gib(v) for k, v in self.peaks.items()}}


# --------------------------------------------------------------------------------------
# What both sides build: the model directory, the samples, the recipe
# --------------------------------------------------------------------------------------


def write_random_hf(directory: Path, config: dict[str, Any], seed: int) -> Path:
    """An HF directory (config.json + bf16 safetensors) of ``config``'s shape: every tensor the
    mapping table reads (prorl_megatron/checkpoint/hf_mapping.py), normal(0, 0.02), norms 1,
    biases 0 (drawn on the GPU where there is one)."""
    from prorl_megatron.checkpoint import hf_mapping
    from prorl_megatron.checkpoint.hf_io import HFWriter
    from prorl_megatron.models.architectures import model_dims

    dims = model_dims(SimpleNamespace(**config))
    device = "cuda" if CUDA else "cpu"
    g = torch.Generator(device=device).manual_seed(seed)
    writer = HFWriter(directory)
    for rule in hf_mapping.rules(dims):
        for name, shape in zip(rule.hf, hf_mapping.hf_shapes(rule, dims), strict=True):
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape)
            elif name.endswith(".bias"):
                tensor = torch.zeros(shape)
            else:
                tensor = torch.empty(shape, device=device).normal_(0.0, 0.02, generator=g)
            writer.add(name, tensor.to(torch.bfloat16))
    writer.finish()
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2))
    return directory


def sizes(args: argparse.Namespace) -> dict[str, int]:
    """The samples' shape: the 1.5B recipe's budgets, or the smoke's."""
    if args.cpu_smoke:
        return {"max_prompt": 32, "max_response": 96, "prompt_median": 12, "response_median": 48, "prompts": 4,
                "group": 2, "mini_batch_prompts": 2, "chunk": 64}
    return {"max_prompt": 1024, "max_response": 8192, "prompt_median": 256, "response_median": 4096, "prompts": 2,
            "group": 2, "mini_batch_prompts": 1, "chunk": 4096}


def make_samples(args: argparse.Namespace, steps: int, prompts: int, seed: int) -> dict[int, list]:
    from prorl_megatron.replay import synthetic_steps

    s = sizes(args)
    config = TINY if args.cpu_smoke else QWEN2_1P5B
    return synthetic_steps(steps, prompts, s["group"], config["vocab_size"], response_median=s["response_median"],
                           max_response=s["max_response"], prompt_median=s["prompt_median"],
                           max_prompt=s["max_prompt"], seed=seed)


def check_overrides(args: argparse.Namespace, dtype: str, run_dir: Path) -> list[str]:
    """recipes/prorl_1p5b.yaml's overrides for the check (see the docstring)."""
    s = sizes(args)
    # lr 3e-4 (not the paper's 2e-6): bf16 weights of ~0.02 move only by steps above their rounding
    # (~4e-3 relative), and a restart that lost state must show in the compared metrics
    stages = ("[{name: 8k}, {name: 8k-second, enter: {after_steps: 4}, "
              "overrides: {train.lr: 1.0e-4, algo.kl_coef: 1.0e-3}}]")
    return [f"model.hf_path={args.work}/hf", "model.mcore_ckpt=null", f"precision.params_dtype={dtype}",
            f"rollout.n={s['group']}", f"rollout.max_prompt_tokens={s['max_prompt']}",
            f"rollout.max_response_tokens={s['max_response']}", f"train.prompts_per_step={s['prompts']}",
            f"train.mini_batch_prompts={s['mini_batch_prompts']}", f"train.micro_batch_size={args.rows_per_micro}",
            f"train.max_tokens_per_micro_batch={args.rows_per_micro * (s['max_prompt'] + s['max_response'])}",
            "train.lr=3.0e-4", "train.recompute=selective",
            f"train.distributed_optimizer={str(args.distributed_optimizer).lower()}",
            f"train.logprob_chunk_tokens={s['chunk']}", "reset.after_steps=2", "reset.plateau_window=null",
            "reset.min_steps=0", f"checkpoint.dir={run_dir}/ckpt", "checkpoint.every_n_steps=2",
            "checkpoint.keep_last=2", f"logging.dir={run_dir}/logs", "logging.tensorboard=false",
            "eval.every_n_steps=0", f"stages={stages}"]


def check_recipe(args: argparse.Namespace, dtype: str, run_dir: Path) -> tuple[Any, tuple[str, ...]]:
    from prorl_megatron.config import load_recipe

    overrides = tuple(check_overrides(args, dtype, run_dir))
    return load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml", overrides), overrides


def memory_plan(args: argparse.Namespace, dtype: str, rows: Optional[int] = None) -> Any:
    """``prorl_megatron.plan.estimate`` of the check's recipe on this device (the local spec)."""
    from prorl_megatron import plan
    from prorl_megatron.models.architectures import model_dims

    a = copy.copy(args)
    a.rows_per_micro = rows or args.rows_per_micro
    recipe, _ = check_recipe(a, dtype, Path(args.work) / "plan")
    dims = model_dims(SimpleNamespace(**(TINY if args.cpu_smoke else QWEN2_1P5B)))
    total = torch.cuda.get_device_properties(0).total_memory if CUDA else None
    return plan.estimate(recipe, dims, args.nproc, total, te=False, on_gpu=CUDA)


# --------------------------------------------------------------------------------------
# The worker: one torchrun launch (straight or restart)
# --------------------------------------------------------------------------------------


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: dict[str, Any] = {}
        self.run_dir = Path(args.work) / f"{args.dtype}-{args.worker}"

    def time_left(self) -> float:
        return self.args.deadline - time.time() - self.reserve

    def short_of(self, seconds: Optional[float]) -> bool:
        """Collective: whether any rank has less than ``seconds`` of the budget left (every rank
        then skips alike: the trainer's passes are collectives). None: nothing measured yet."""
        from prorl_megatron.collect import any_rank

        return any_rank(seconds is not None and self.time_left() < seconds)

    def main(self) -> None:
        from prorl_megatron.checkpoint.train_state import step_dir
        from prorl_megatron.replay import load_steps, replay, replay_run

        a = self.args
        if CUDA:
            torch.use_deterministic_algorithms(True, warn_only=True)
        start = time.time()
        recipe, overrides = check_recipe(a, a.dtype, self.run_dir)
        restart = step_dir(Path(a.work) / f"{a.dtype}-straight" / "ckpt", RESTART_FROM) if a.worker == "restart" \
            else None
        self.run = replay_run(recipe, overrides, restart)
        t = self.run.trainer
        self.out["build_s"] = round(time.time() - start, 1)
        self.out["setup"] = {"parameters": sum(p.numel() for p in t.policy.parameters()),
                             "optimizer": [type(o).__name__ for o in getattr(t.optimizer, "chained_optimizers",
                                                                             [t.optimizer])],
                             "world_size": t.layout.world_size, "data_parallel": t.layout.data,
                             "device": str(t.layout.device), "packed": t.packed,
                             "backend": torch.distributed.get_backend_config()}
        self.samples = load_steps(Path(a.work) / "samples.jsonl")
        replay(self.run, self.samples, STEPS, PeakTimer)
        self.core_s = time.time() - start
        # the launches still to come get their time first (a restart replays fewer steps: 0.8 of this one)
        self.reserve = 0.8 * a.launches_after * self.core_s
        if a.figures:
            for section in (self.plans, self.logprob_memory, self.recompute):
                self.section(section)
        self.run.writer.close()
        if torch.distributed.get_rank() == 0:
            (self.run_dir / "worker.json").write_text(json.dumps(self.out, indent=2) + "\n")

    def section(self, fn: Callable[[dict[str, Any]], None]) -> None:
        name = fn.__name__
        out = self.out.setdefault(name, {})
        log(f"--- {name} ({self.time_left():.0f} s left of the budget after the reserve)")
        try:
            fn(out)
        except Exception as e:  # recorded; the next section still runs (every rank fails alike)
            traceback.print_exc()
            out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            out["oom"] = is_oom(e)
        finally:
            from prorl_megatron.models.policy import zero_grads

            zero_grads(self.run.trainer.policy_ddp, self.run.trainer.optimizer)
            free_memory()

    def train(self, cfg: Any, samples: list) -> dict[str, Any]:
        """``train.train_on_samples`` on ``samples`` (a step past the replayed ones); its metrics."""
        from prorl_megatron.loop import fresh_counters
        from prorl_megatron.train import train_on_samples

        timer = PeakTimer()
        metrics = train_on_samples(self.run.trainer, cfg, samples, fresh_counters(), STEPS + 1, timer)
        return {**metrics, **timer.metrics()}

    def plans(self, out: dict[str, Any]) -> None:
        """The row plan (``micro_batch_size`` rows in order, padded to each micro-batch's longest)
        against the token budget (rows grouped by length, rows x longest <= the budget), on the
        same batch; the budget is the row plan's worst case (``micro_batch_size`` x the longest
        row), so both bound memory alike."""
        from prorl_megatron.rollout.batch import micro_batch_cost, training_plan

        a, cfg = self.args, self.run.recipe
        samples = make_samples(a, 1, a.plan_rows // sizes(a)["group"], seed=a.seed + 100)[1]
        old = copy.deepcopy(cfg)
        old.train.max_tokens_per_micro_batch = None
        cfg = copy.deepcopy(cfg)
        cfg.train.mini_batch_prompts = old.train.mini_batch_prompts = len({s.group for s in samples})  # one update
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        layout = self.run.trainer.layout
        for name, c in (("old", old), ("new", cfg)):
            groups = [[i for i, s in enumerate(samples) if s.group == g] for g in range(samples[-1].group + 1)]
            micro = training_plan(groups, len(groups), layout.data, layout.dp_rank, c.train.micro_batch_size, lengths,
                                  c.train.max_tokens_per_micro_batch, self.run.trainer.packed,
                                  self.run.trainer.cost)[0].micro
            costs = [micro_batch_cost([lengths[i] for i in m]) for m in micro]
            out[f"{name}_plan"] = {"micro_batches_rank0": len(micro), "padded_tokens_rank0": sum(costs),
                                   "max_micro_batch_tokens": max(costs),
                                   "padding_fraction_rank0": round(1 - sum(lengths[i] for m in micro for i in m)
                                                                   / sum(costs), 4)}
        out["batch"] = {"rows": len(samples), "real_tokens": sum(lengths),
                        "length_min_median_max": [min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)]}
        rounds: list[dict[str, Any]] = []
        per_round = None
        for i in range(a.rounds + 1):  # round 0 is the warm-up of the old plan's shapes
            if self.short_of(per_round):
                out["rounds_skipped"] = a.rounds + 1 - i
                break
            start = time.time()
            row = {}
            for name, c in (("old", old), ("new", cfg)):
                m = self.train(c, samples)
                row[name] = {"logprob_s": round(m["time/logprob"], 3), "update_s": round(m["time/update"], 3),
                             "logprob_peak_gib": m.get("memory/logprob_peak_gib"),
                             "update_peak_gib": m.get("memory/update_peak_gib"), "loss": m["loss"]}
            per_round = time.time() - start
            log(f"plans round {i}: {row}")
            rounds.append(row)
        out["warm_up"], out["rounds"] = rounds[0], rounds[1:]
        timed = rounds[1:] or rounds[:1]
        out["timings_from"] = "timed rounds" if rounds[1:] else "the warm-up only (no timed round fitted the budget)"
        for phase in ("logprob_s", "update_s"):
            out[f"ratio_new_over_old/{phase[:-2]}"] = round(
                sum(r["new"][phase] for r in timed) / sum(r["old"][phase] for r in timed), 4)
        both = {n: sum(r[n]["logprob_s"] + r[n]["update_s"] for r in timed) for n in ("old", "new")}
        out["ratio_new_over_old/logprob_plus_update"] = round(both["new"] / both["old"], 4)

    def logprob_memory(self, out: dict[str, Any]) -> None:
        """Peak memory, over what was allocated before, of the logprob head on the batch's longest
        row at the cap: ``logprobs_from_hidden`` (chunked) against full logits + ``log_softmax``,
        with backward (update) and without grad (logprob pass)."""
        from prorl_megatron.models.logprobs import hidden_states_output, logprobs_from_hidden, next_token_labels
        from prorl_megatron.rollout.batch import make_batch, micro_batches

        if self.short_of(30):
            out["skipped"] = f"{self.time_left():.0f} s left of the budget"
            return
        t, cfg = self.run.trainer, self.run.recipe
        temperature, chunk = cfg.rollout.temperature, cfg.train.logprob_chunk_tokens
        (mb,) = micro_batches(make_batch(self.samples[1][:1]), [[0]], t.layout.device, [])  # the row at the cap
        ids, vocab, gpt = mb.input_ids, t.dims.vocab_size, t.policy
        labels = next_token_labels(ids)
        with torch.no_grad(), hidden_states_output(t.reference_module):
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            hidden0 = t.reference_module(ids, positions, None)  # [S, B, H], fp32 from Float16Module, as in training
        out["micro_batch"] = {"rows": int(ids.shape[0]), "seq": int(ids.shape[1]), "chunk_tokens": chunk}

        def full(h: torch.Tensor, entropy: bool = False) -> torch.Tensor:
            weight = gpt.output_layer.weight
            logits, _ = gpt.output_layer(h.to(weight.dtype))  # [S, B, V]
            logits = logits.float()[..., :vocab] / temperature
            return torch.log_softmax(logits, -1).gather(-1, labels.t().unsqueeze(-1)).squeeze(-1).t()

        def chunked(h: torch.Tensor, entropy: bool = False) -> Any:
            return logprobs_from_hidden(gpt, h, labels, vocab, temperature, chunk, entropy)

        for grad, name, fn, entropy in ((True, "chunked", chunked, False), (True, "full_logits", full, False),
                                        (False, "chunked", chunked, False), (False, "chunked_with_entropy", chunked,
                                                                            True), (False, "full_logits", full, False)):
            key = f"{name}/{'forward_backward' if grad else 'no_grad'}"
            try:
                free_memory()
                hidden = hidden0.detach().clone().requires_grad_(grad)
                base = allocated()
                if CUDA:
                    torch.cuda.reset_peak_memory_stats()
                with torch.set_grad_enabled(grad):
                    lp = fn(hidden, entropy)
                    lp = lp[0] if isinstance(lp, tuple) else lp
                    if grad:
                        lp[:, :-1].sum().backward()
                if CUDA:
                    torch.cuda.synchronize()
                out[key] = {"peak_over_start_gib": gib(torch.cuda.max_memory_allocated() - base) if CUDA else None}
                del lp, hidden
            except Exception as e:
                if not is_oom(e):
                    raise
                out[key] = {"error": f"out of memory: {str(e)[:200]}"}
            log(f"logprob head {key}: {out[key]}")
        for mode in ("forward_backward", "no_grad"):
            c = out.get(f"chunked/{mode}", {}).get("peak_over_start_gib")
            f = out.get(f"full_logits/{mode}", {}).get("peak_over_start_gib")
            if c and f:
                out[f"ratio_full_over_chunked/{mode}"] = round(f / c, 2)

    def recompute(self, out: dict[str, Any]) -> None:
        """One long row trained with the attention core recomputed (``selective``, as built) and
        not (``none``: megatron's per-attention ``checkpoint_core_attention`` switched off):
        the update's time and peak; the second pass of each is the measurement."""
        from prorl_megatron.rollout.batch import Sample

        a = self.args
        seq = a.recompute_seq or (sizes(a)["max_response"] // 2)
        out["seq"] = seq
        ids = torch.randint(1, self.run.trainer.dims.vocab_size, (seq,), generator=torch.Generator().manual_seed(3))
        ids = ids.tolist()
        prompt = seq // 8
        samples = [Sample(ids[:prompt], ids[prompt:], [-0.5] * (seq - prompt), 1.0, False, "math", 0)]
        attention = [m for m in self.run.trainer.policy.modules() if hasattr(m, "checkpoint_core_attention")]
        per_pass = None
        try:
            for i in range(2):
                for mode in ("selective", "none"):
                    if self.short_of(per_pass) or "error" in out.get(mode, {}):
                        out.setdefault("skipped", f"pass {i + 1} {mode}: {self.time_left():.0f} s left")
                        continue
                    for m in attention:
                        m.checkpoint_core_attention = mode == "selective"
                    start = time.time()
                    try:
                        metrics = self.train(self.run.recipe, samples)
                        out[mode] = {"update_s": round(metrics["time/update"], 3),
                                     "update_peak_gib": metrics.get("memory/update_peak_gib"), "pass": i + 1}
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        out[mode] = {"error": f"out of memory: {str(e)[:200]}"}
                    per_pass = time.time() - start
                    free_memory()
                    log(f"recompute {mode}, one row of {seq}: {out[mode]}")
        finally:
            for m in attention:
                m.checkpoint_core_attention = True
        s, n = out.get("selective", {}), out.get("none", {})
        if "update_s" in s and "update_s" in n:
            out["time_ratio_selective_over_none"] = round(s["update_s"] / n["update_s"], 3)


# --------------------------------------------------------------------------------------
# The parent: the launches, the comparisons, the report
# --------------------------------------------------------------------------------------


def records(run_dir: Path, compared: bool) -> dict[tuple[int, str], dict[str, Any]]:
    """(step, event or "") -> the metrics record (``compared``: less what differs between runs by nature)."""
    from prorl_megatron.metrics import read_jsonl

    return {(r["step"], r.get("event", "")): {k: v for k, v in r.items() if not (compared and k.startswith(UNCOMPARED))}
            for r in read_jsonl(run_dir / "logs" / "metrics.jsonl")}


def compare(straight: dict, restarted: dict, exact: bool) -> dict[str, Any]:
    """The restart check over steps 3..5 (see the docstring)."""
    keys = sorted(k for k in straight if k[0] > RESTART_FROM)
    out: dict[str, Any] = {"records": [f"{s}{'/' + e if e else ''}" for s, e in keys],
                           "bitwise": keys == sorted(restarted) and all(straight[k] == restarted[k] for k in keys)}
    worst, problems = 0.0, []
    for k in keys:
        a, b = straight[k], restarted.get(k, {})
        for name in sorted(set(a) | set(b)):
            x, y = a.get(name), b.get(name)
            if isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y):
                rel = abs(x - y) / max(abs(x), abs(y), 1e-12)
                worst = max(worst, rel)
                if rel > (0.0 if exact else CUDA_RTOL):
                    problems.append(f"step {k[0]} {k[1] or 'metrics'} {name}: {x!r} vs {y!r}")
            elif x != y:
                problems.append(f"step {k[0]} {k[1] or 'metrics'} {name}: {x!r} vs {y!r}")
    out["max_relative_difference"] = worst
    out["rule"] = "bitwise (CPU)" if exact else f"bitwise, else floats within relative {CUDA_RTOL} (CUDA)"
    out["passed"] = out["bitwise"] or (not exact and not problems and sorted(restarted) == keys)
    out["differences"] = problems[:20]
    return out


def step_figures(args: argparse.Namespace, dtype: str, recs: dict, samples: dict, matmul_tflops: Optional[float]
                 ) -> dict[str, Any]:
    """Update tokens/s and MFU of the replayed steps 2..5 (step 1 includes first-call costs), and
    the measured phase peaks against the memory plan."""
    from prorl_megatron.models.architectures import model_dims

    dims = model_dims(SimpleNamespace(**(TINY if args.cpu_smoke else QWEN2_1P5B)))
    steps = [s for s in range(2, STEPS + 1) if (s, "") in recs]
    lengths = {s: [len(x.prompt_ids) + len(x.response_ids) for x in samples[s]] for s in steps}
    seconds = sum(recs[(s, "")]["time/update"] for s in steps)
    tokens = sum(sum(lengths[s]) for s in steps)
    flops = sum(model_flops(dims, lengths[s]) for s in steps)
    out: dict[str, Any] = {"steps": steps, "real_tokens": tokens, "update_s": round(seconds, 3),
                           "update_tokens_per_s": round(tokens / seconds, 1),
                           "logprob_tokens_per_s": round(tokens / sum(recs[(s, "")]["time/logprob"] for s in steps), 1),
                           "model_tflops_per_s": round(flops / seconds / 1e12, 3),
                           "flops_formula": "sum over rows of 6*N*S + 12*L*(heads*head_dim)*S^2 (N = matmul "
                                            "parameters, S = real row length; padding and recompute not counted)"}
    if CUDA:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_16BIT.items() if k in name), 989e12)
        out["mfu"] = round(flops / seconds / peak, 4)
        out["peak_assumed_tflops"] = peak / 1e12
        if matmul_tflops:
            out["fraction_of_measured_matmul_rate"] = round(flops / seconds / (matmul_tflops * 1e12), 4)
        memory = memory_plan(args, dtype)
        for phase, key in (("logprobs", "logprob"), ("update", "update")):
            measured = max(recs[(s, "")].get(f"memory/{key}_peak_gib", 0.0) for s in range(1, STEPS + 1))
            planned = gib(memory.own_bytes[phase])
            out[f"memory/{phase}"] = {"measured_peak_gib": measured, "plan_gib": planned,
                                      "measured_over_plan": round(measured / planned, 3)}
        out["memory_plan_table"] = memory.table().splitlines()
    return out


class Parent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, Any] = {"status": "running"}
        self.out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
        self.deadline = time.time() + args.budget_s

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - T0, 1)
        if self.out:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(self.results, indent=2) + "\n")

    def launch(self, phase: str, dtype: str, figures: bool, launches_after: int) -> float:
        """One torchrun launch of the worker; its seconds. Raises on failure (its output is shown)."""
        a = self.args
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
               str(Path(__file__).resolve()), "--worker", phase, "--dtype", dtype, "--work", str(a.work),
               "--deadline", str(self.deadline), "--launches-after", str(launches_after), "--rounds", str(a.rounds),
               "--plan-rows", str(a.plan_rows), "--rows-per-micro", str(a.rows_per_micro), "--seed", str(a.seed),
               "--distributed-optimizer", str(a.distributed_optimizer)]
        cmd += ["--figures"] if figures else []
        cmd += ["--cpu-smoke"] if a.cpu_smoke else []
        cmd += ["--recompute-seq", str(a.recompute_seq)] if a.recompute_seq else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "CUBLAS_WORKSPACE_CONFIG": ":4096:8", **({} if CUDA else {"OMP_NUM_THREADS": "1"})}
        log(f"launch: {dtype} {phase}{' + figures' if figures else ''}")
        start = time.time()
        child = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            code = child.wait(timeout=max(60.0, self.deadline - time.time() + 120))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)
            child.wait()
            raise RuntimeError(f"{dtype} {phase}: killed past the budget") from None
        except BaseException:
            os.killpg(child.pid, 9)
            raise
        if code != 0:
            raise RuntimeError(f"{dtype} {phase}: exit status {code}")
        return time.time() - start

    def prepare(self) -> None:
        from prorl_megatron.replay import save_steps

        a, r = self.args, self.results
        r["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                        "device": torch.cuda.get_device_name() if CUDA else "cpu",
                        "device_memory_gib": gib(torch.cuda.get_device_properties(0).total_memory) if CUDA else None,
                        "work_dir": str(a.work), "work_dir_free_gib": gib(shutil.disk_usage(a.work).free)}
        try:
            import megatron.core

            r["machine"]["megatron_core"] = megatron.core.__version__
        except ImportError as e:
            raise RuntimeError(f"megatron-core is not importable here ({e}): bash bench/gpu_check.sh installs the "
                               "carried wheel") from None
        if CUDA:
            r["matmul_ceiling_tflops"] = round(matmul_rate() / 1e12, 1)
            log(f"bf16 8192^3 matmul: {r['matmul_ceiling_tflops']} TFLOP/s")
        start = time.time()
        write_random_hf(Path(a.work) / "hf", TINY if a.cpu_smoke else QWEN2_1P5B, a.seed)
        if a.samples:
            shutil.copy(a.samples, Path(a.work) / "samples.jsonl")
        else:
            save_steps(Path(a.work) / "samples.jsonl", make_samples(a, STEPS, sizes(a)["prompts"], a.seed),
                       f"bench/gpu_check.py synthetic_steps (seed {a.seed})")
        r["prepare_s"] = round(time.time() - start, 1)
        free_memory()  # what this process drew the weights with goes back before the workers start
        self.check_disk()
        r["recipe"] = {"base": "recipes/prorl_1p5b.yaml", "overrides": check_overrides(a, "DTYPE", Path("RUN_DIR")),
                       "rows_per_micro_batch_at_the_cap": a.rows_per_micro}
        self.save()

    def check_disk(self) -> None:
        """Two checkpoints are on disk at once (the straight run's steps 2 and 4; then step 2 and
        the restart's step 4): policy + reference (2 x 2 B per parameter) + fp32 main weights
        (4 B) + Adam's moments (8 B: megatron's DistributedOptimizer saves zeros for an empty
        optimizer; the plain one saves none right after a reset, as at steps 2 and 4). Without
        room for the distributed optimizer's, the plain optimizer is used and the reason said."""
        from prorl_megatron.models.architectures import model_dims
        from prorl_megatron.plan import model_params

        a = self.args
        n = model_params(model_dims(SimpleNamespace(**(TINY if a.cpu_smoke else QWEN2_1P5B))))
        free = shutil.disk_usage(a.work).free
        need = {True: 2 * 16 * n * 1.1, False: 2 * 8 * n * 1.1}
        if a.distributed_optimizer and need[True] > free:
            a.distributed_optimizer = False
            self.results["distributed_optimizer_off"] = (f"{gib(free)} GiB free in {a.work}: two checkpoints with "
                                                         f"the distributed optimizer's zero moments need "
                                                         f"{gib(need[True])}")
        if need[a.distributed_optimizer] > free:
            raise RuntimeError(f"{gib(free)} GiB free in {a.work}; two checkpoints need {gib(need[False])}: "
                               "give --work a larger directory")
        self.results["checkpoint_gib_each"] = gib(need[a.distributed_optimizer] / 2.2)

    def run(self) -> int:
        a, r = self.args, self.results
        self.prepare()
        from prorl_megatron.replay import load_steps

        samples = load_steps(Path(a.work) / "samples.jsonl")
        failed = False
        durations: list[float] = []
        for i, dtype in enumerate(a.dtypes):
            out = r.setdefault("replay", {}).setdefault(dtype, {})
            remaining = 2 * (len(a.dtypes) - i)
            if durations and time.time() + max(durations) * remaining > self.deadline:
                out["skipped"] = f"{self.deadline - time.time():.0f} s left of --budget-s {a.budget_s}"
                continue
            straight, restarted = (Path(a.work) / f"{dtype}-{p}" for p in ("straight", "restart"))
            try:
                durations.append(self.launch("straight", dtype, figures=i == 0, launches_after=remaining - 1))
                out["straight_s"] = round(durations[-1], 1)
                worker = json.loads((straight / "worker.json").read_text())
                r.update({k: v for k, v in worker.items() if k in ("plans", "logprob_memory", "recompute")})
                out["setup"], out["build_s"] = worker["setup"], worker["build_s"]
                later = [p for p in (straight / "ckpt").glob("step_*") if p.name != f"step_{RESTART_FROM:08d}"]
                for p in later:  # disk: the restart needs step 2 alone
                    shutil.rmtree(p)
                durations.append(self.launch("restart", dtype, figures=False, launches_after=remaining - 2))
                out["restart_s"] = round(durations[-1], 1)
                out["restart_check"] = compare(records(straight, True), records(restarted, True), exact=not CUDA)
                failed |= not out["restart_check"]["passed"]
                out["steps"] = step_figures(a, dtype, records(straight, False), samples,
                                            r.get("matmul_ceiling_tflops"))
                log(f"{dtype}: restart check {'passed' if out['restart_check']['passed'] else 'FAILED'} "
                    f"(bitwise {out['restart_check']['bitwise']}); update {out['steps']['update_tokens_per_s']} "
                    f"tokens/s")
            except Exception as e:
                traceback.print_exc()
                out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                failed = True
            finally:
                for p in (straight, restarted):
                    shutil.rmtree(p / "ckpt", ignore_errors=True)
                self.save()
        r["status"] = "failed" if failed else "done"
        self.save()
        return 1 if failed else 0


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """bf16 n^3 matmuls per second on the GPU, in FLOP/s."""
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        x @ y
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def auto_rows_per_micro(args: argparse.Namespace) -> int:
    """The most rows at the length cap (1 to 4) per micro-batch whose training phase fits this
    GPU by the memory plan (2 on an H200); 2 on CPU."""
    if not CUDA:
        return 2
    total = torch.cuda.get_device_properties(0).total_memory
    return next((rows for rows in (4, 3, 2) if memory_plan(args, "bfloat16", rows).training_bytes <= 0.95 * total), 1)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 processes, gloo, CPU: the code path only")
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu_check.json when OUT is set)")
    p.add_argument("--work", default=None, help="scratch directory for the model and checkpoints (default: a "
                                                "temporary one, removed at the end)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    p.add_argument("--samples", default=None, help="a replay file (prorl_megatron/replay.py) instead of the "
                                                   "synthetic steps; needs steps 1..5")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall seconds for everything; figures that would "
                                                                "not fit are skipped, the restart checks first")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds of the plans figure after its warm-up")
    p.add_argument("--plan-rows", type=int, default=8, help="rows of the plans figure's batch")
    p.add_argument("--rows-per-micro", type=int, default=0, help="rows at the length cap per micro-batch (0: the "
                                                                 "memory plan's choice)")
    p.add_argument("--recompute-seq", type=int, default=0, help="the recompute figure's row (0: half the cap)")
    p.add_argument("--distributed-optimizer", type=lambda s: s.lower() == "true", default=True)
    p.add_argument("--seed", type=int, default=0)
    # the worker's own (set by the parent)
    p.add_argument("--worker", choices=["straight", "restart"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--launches-after", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--figures", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cpu_smoke and CUDA:
        p.error("--cpu-smoke is for a machine without CUDA")
    args.nproc = 2 if args.cpu_smoke else 1
    if args.cpu_smoke:
        args.plan_rows, args.recompute_seq = 8, args.recompute_seq or 64
    if args.worker:
        Worker(args).main()
        from prorl_megatron.parallel import destroy_parallel

        destroy_parallel()
        return 0
    temporary = args.work is None
    args.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    args.work.mkdir(parents=True, exist_ok=True)
    args.rows_per_micro = args.rows_per_micro or auto_rows_per_micro(args)
    parent = Parent(args)
    try:
        code = parent.run()
    except BaseException as e:
        traceback.print_exc()
        parent.results["status"] = f"failed: {type(e).__name__}: {str(e)[:500]}"
        parent.save()
        code = 1
    finally:
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(parent.results, indent=2), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
