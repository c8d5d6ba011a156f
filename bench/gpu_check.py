"""One-GPU check of the 1.5B training update (issue 13 item 6): speed, memory, and the planners.

    python3 bench/gpu_check.py [--out FILE] [--rows 32] [--rounds 2] [--budget-s 300]   # a lent GPU
    python bench/gpu_check.py --cpu-smoke                                             # tiny, gloo, CPU

Model: DeepSeek-R1-Distill-Qwen-1.5B's shape (:data:`QWEN2_1P5B`; random weights, nothing is
downloaded), bf16, built by the project's own code (``build_policy`` / ``build_optimizer``,
``train.recompute=selective``), world size 1 through ``init_parallel`` (NCCL + gloo). Without
Transformer Engine (not on the lent machines) megatron's local layer spec runs: unfused
attention that materialises the S x S scores, which is what ``train.recompute=selective``
(the attention core recomputed in the backward pass) exists for.

Batch: ``--rows`` sequences (GRPO groups of ``--group`` samples; 32 = the 1.5B recipe's 1024
rows per update over 32 ranks) whose lengths (prompt + response) are drawn from a seeded
lognormal (median ``--median`` 4096, sigma 0.6, capped at ``--cap`` 9216 = the recipe's 1024 +
8192), made into a ``TrainBatch`` by ``make_batch``, advantages by GRPO. On a GPU under 100 GiB
(an H100) the default lengths are scaled by 2/3: one 9216-token row of the local spec's update
does not fit there next to the optimizer state. The reference pass runs the policy's own
``Float16Module`` (the compute of ``build_reference``'s copy, without its 3.3 GiB).

Measured, each in the same run (a section that fails, e.g. out of memory, records its error and
the rest still runs; the JSON is rewritten after every section so a killed run still reports):

- ``plans``: the old plan (``training_plan`` with ``micro_batch_size`` rows in order, padded to
  each micro-batch's longest row) against the new token-budget plan (``max_tokens``: rows
  grouped by length, rows x longest <= budget). The budget is the old plan's worst case
  (``micro_batch_size x cap``), so both plans bound memory alike; ``micro_batch_size`` is the
  most rows of ``cap`` tokens (1 to 4) whose update the memory plan (``prorl_megatron.plan``)
  says fits this device (2 on an H200), one fewer after an out-of-memory warm-up. For each: wall time of the
  logprob phase (policy with entropy + reference, no grad, as ``train.old_and_reference_logprobs``)
  and of the update (forward + backward through ``run_microbatches`` with ``policy_kl_loss``,
  ``finalize_grads``, ``optimizer_step``), after one warm-up of each plan, ``--rounds`` rounds
  alternating old/new; ratio new/old of the summed times.
- ``update``: tokens/s and MFU of the new plan's timed updates. Model FLOPs per sequence of
  S real tokens: 6 N S (N: matmul parameters, layers + output layer) + 12 L h S^2 (attention
  QK^T and AV, forward + backward, over the full S x S as the local spec computes it; not
  counting the recompute). MFU is over the dense bf16 peak assumed below (989 TFLOP/s, H100 and
  H200 SXM datasheet) and also over the bf16 matmul rate measured at the start of the run.
- ``memory_plan``: the measured peaks (``torch.cuda.max_memory_allocated``) of the new plan's
  update and logprob pass against ``prorl_megatron.plan.estimate`` for the same settings (its
  trainer rows, less the reference copy not built here), with the plan's table.
- ``logprob_memory``: peak memory, over what was allocated before, of the logprob head on the
  new plan's costliest micro-batch: ``logprobs_from_hidden`` (chunked, default chunk) against
  full logits + ``log_softmax``, with backward (update) and without grad (logprob pass).
- ``recompute``: the same update on one long micro-batch (one row, the longest of a ladder
  whose unfused-attention memory should fit) with the attention core recomputed (selective)
  and not (none): time and peak memory. The switch is megatron's per-attention flag
  ``checkpoint_core_attention``, which ``train.recompute`` sets at build time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from prorl_megatron.plan import matmul_params  # noqa: E402

# DeepSeek-R1-Distill-Qwen-1.5B's config.json (the fields model_dims reads); random weights
QWEN2_1P5B = dict(
    architectures=["Qwen2ForCausalLM"], hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, rope_theta=10000.0,
    tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-6, hidden_act="silu",
    initializer_range=0.02, use_sliding_window=False,
)
# a few-layer toy of the same family for --cpu-smoke
TINY = dict(QWEN2_1P5B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, max_position_embeddings=4096)

# dense bf16 (no sparsity) datasheet peak of the SXM parts, FLOP/s
PEAK_BF16 = {"H200": 989e12, "H100": 989e12}
TEMPERATURE = 1.2  # ProRL's rollout temperature; the logprob and update passes use it


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------
# Device helpers (no-ops on CPU)
# --------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()
GIB = 2 ** 30


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def allocated() -> Optional[int]:
    return torch.cuda.memory_allocated() if CUDA else None


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak() -> Optional[int]:
    return torch.cuda.max_memory_allocated() if CUDA else None


def gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / GIB, 3)


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


# --------------------------------------------------------------------------------------
# FLOPs and memory estimates
# --------------------------------------------------------------------------------------


def model_flops(dims, lengths: list[int]) -> float:
    """Forward + backward model FLOPs of sequences of these real lengths (see the docstring)."""
    n = matmul_params(dims)
    attn_width = dims.num_heads * dims.head_dim
    return float(sum(6 * n * s + 12 * dims.num_layers * attn_width * s * s for s in lengths))


# --------------------------------------------------------------------------------------
# The memory plan (prorl_megatron/plan.py)
# --------------------------------------------------------------------------------------


def memory_plan(dims, seq: int, tokens: int, recompute: str, chunk_tokens: int,
                device_bytes: Optional[int]) -> Any:
    """``prorl_megatron.plan.estimate`` for one process holding rows of up to ``seq`` tokens in
    micro-batches of ``tokens`` (``train.max_tokens_per_micro_batch``), this machine's attention
    (local spec without Transformer Engine)."""
    from prorl_megatron import plan
    from prorl_megatron.config import Recipe
    from prorl_megatron.models.gpt import transformer_engine_available

    recipe = Recipe()
    recipe.precision.params_dtype = "bfloat16"
    recipe.rollout.max_prompt_tokens = seq // 9  # 1024 of the 1.5B recipe's 9216
    recipe.rollout.max_response_tokens = seq - seq // 9
    recipe.train.recompute = recompute
    recipe.train.max_tokens_per_micro_batch = tokens
    recipe.train.logprob_chunk_tokens = chunk_tokens
    return plan.estimate(recipe, dims, 1, device_bytes, te=transformer_engine_available(), on_gpu=CUDA)


def plan_row(memory, prefix: str) -> dict[str, int]:
    """The bytes per phase of the plan's row whose description starts with ``prefix``."""
    return next((r.bytes for r in memory.rows if r.what.startswith(prefix)), {})


def plan_update_bytes_here(memory) -> int:
    """The plan's update-phase total for this script, which builds no separate reference copy
    (its reference pass runs the policy's own Float16Module: the same compute)."""
    return memory.totals["update"] - plan_row(memory, "reference weights").get("update", 0)


# --------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, Any] = {"status": "running"}
        self.out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)

    # ---- bookkeeping --------------------------------------------------------------

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - T0, 1)
        if self.out:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(self.results, indent=2) + "\n")

    def time_left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - T0)

    @contextlib.contextmanager
    def section(self, name: str):
        log(f"--- {name}")
        self.results.setdefault(name, {})
        try:
            yield self.results[name]
        except Exception as e:  # recorded; the next section still runs
            traceback.print_exc()
            sys.stdout.flush()
            self.results[name]["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            self.results[name]["oom"] = is_oom(e)
            e = None  # noqa: F841  (drop the traceback's frames before freeing memory)
        finally:
            try:
                self.zero()
            except Exception:
                pass
            free_memory()
            self.save()

    def zero(self) -> None:
        if hasattr(self, "ddp"):
            from prorl_megatron.models.policy import zero_grads

            zero_grads(self.ddp, self.optimizer)

    # ---- set-up -------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        r = self.results
        r["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                        "device": torch.cuda.get_device_name() if CUDA else "cpu",
                        "device_memory_gib": gib(torch.cuda.get_device_properties(0).total_memory) if CUDA else None}
        if CUDA:
            r["matmul_ceiling_tflops"] = round(self.matmul_rate() / 1e12, 1)
            log(f"bf16 8192^3 matmul: {r['matmul_ceiling_tflops']} TFLOP/s")
        log("importing megatron-core and prorl_megatron")
        import megatron.core

        from prorl_megatron.config import PrecisionConfig, TrainConfig
        from prorl_megatron.models.architectures import model_dims
        from prorl_megatron.models.gpt import transformer_engine_available
        from prorl_megatron.models.policy import build_optimizer, build_policy
        from prorl_megatron.parallel import init_parallel

        r["machine"]["megatron_core"] = megatron.core.__version__
        r["machine"]["transformer_engine"] = transformer_engine_available()
        r["machine"]["layer_spec"] = "transformer_engine" if r["machine"]["transformer_engine"] else \
            "local (megatron-core only: no Transformer Engine here; unfused attention)"
        log(f"imported ({r['machine']['layer_spec']})")

        self.dims = dims = model_dims(SimpleNamespace(**(TINY if a.cpu_smoke else QWEN2_1P5B)))
        self.layout = init_parallel(1, 1, seed=a.seed)
        self.device = self.layout.device
        self.precision = PrecisionConfig(params_dtype="bfloat16")
        # as recipes/prorl_1p5b.yaml: selective recompute, megatron's DistributedOptimizer (at DP1
        # its shard is the whole model; its CUDA path runs here)
        self.train_cfg = TrainConfig(lr=1e-6, recompute="selective", distributed_optimizer=True,
                                     logprob_chunk_tokens=a.chunk_tokens)
        start = time.perf_counter()
        self.gpt, self.ddp = build_policy(dims, self.precision, self.train_cfg)  # train.recompute=selective
        cfg = self.gpt.config
        attention = [m for m in self.gpt.modules() if hasattr(m, "checkpoint_core_attention")]
        built = {"recompute_granularity": cfg.recompute_granularity, "recompute_modules": cfg.recompute_modules,
                 "attention_core_checkpointed": all(m.checkpoint_core_attention for m in attention)}
        if not built["attention_core_checkpointed"]:  # the measurements below assume it
            raise RuntimeError(f"build_policy with train.recompute=selective gave {built}")
        with torch.no_grad():
            for p in self.gpt.parameters():
                p.normal_(0.0, 0.02)
        self.optimizer = build_optimizer(self.ddp, self.train_cfg, self.precision)
        self.reference = self.ddp.module  # the Float16Module under DDP: the reference pass's compute, no 2nd copy
        n_params = sum(p.numel() for p in self.gpt.parameters())
        r["model"] = {"config": TINY if a.cpu_smoke else QWEN2_1P5B, "parameters": n_params,
                      "matmul_parameters": matmul_params(dims), "dtype": "bfloat16",
                      "recompute": "selective", "recompute_as_built": built,
                      "optimizer": [type(o).__name__ for o in self.optimizer.chained_optimizers],
                      "reference_pass": "the policy's Float16Module (same compute as build_reference's copy)",
                      "build_s": round(time.perf_counter() - start, 1)}
        log(f"model built: {n_params / 1e9:.3f}B parameters in {r['model']['build_s']} s")

    @staticmethod
    def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        seconds, _ = timed(lambda: [a @ b for _ in range(repeats)])
        del a, b
        return 2 * n ** 3 * repeats / seconds

    # ---- the batch and the two plans ----------------------------------------------------

    def make_batch(self) -> None:
        from prorl_megatron.algo import compute_advantages
        from prorl_megatron.rollout.batch import Sample, make_batch

        a, r = self.args, self.results
        rng = random.Random(a.seed)
        vocab = self.dims.vocab_size
        samples = []
        for i in range(a.rows):
            total = int(min(a.cap, max(a.min_len, round(rng.lognormvariate(math.log(a.median), a.sigma)))))
            prompt = min(rng.randint(a.min_len // 2, a.cap // 9), total // 2)
            ids = torch.randint(1, vocab, (total,), generator=torch.Generator().manual_seed(a.seed + i)).tolist()
            response = total - prompt
            samples.append(Sample(prompt_ids=ids[:prompt], response_ids=ids[prompt:],
                                  rollout_logprobs=[-rng.random() * 2 for _ in range(response)],
                                  reward=float((i % a.group) % 2), truncated=total >= a.cap, domain="math",
                                  group=i // a.group))
        self.batch = batch = make_batch(samples, pad_id=0)
        batch["advantages"] = compute_advantages("grpo", batch["rewards"], batch["group_ids"], batch["mask"],
                                                 scale_by_std=True)
        self.lengths = lengths = (batch["prompt_len"] + batch["response_len"]).tolist()

        self.groups = [[i for i, s in enumerate(samples) if s.group == g] for g in range(samples[-1].group + 1)]
        s = sorted(lengths)
        r["batch"] = {"rows": len(lengths), "group_size": a.group, "real_tokens": sum(lengths),
                      "lengths_scaled_2_3_for_a_small_device": a.scaled_for_device,
                      "length_distribution": f"lognormal(median {a.median}, sigma {a.sigma}, seed {a.seed}), "
                                             f"clamped to [{a.min_len}, {a.cap}]",
                      "length_min_median_max": [s[0], s[len(s) // 2], s[-1]],
                      "rows_at_cap": sum(n >= a.cap for n in lengths)}
        self.set_plans(a.old_micro_batch_size or self.auto_micro_batch_size())

    def set_plans(self, old_mbs: int) -> None:
        """The old plan (``old_mbs`` rows per micro-batch, in order) and the new one (token budget
        ``--max-tokens``, by default ``old_mbs x cap``: the same worst case)."""
        from prorl_megatron.rollout.batch import micro_batch_cost, training_plan

        a, r, lengths, groups = self.args, self.results, self.lengths, self.groups
        max_tokens = a.max_tokens or old_mbs * a.cap
        self.plans = {
            "old": training_plan(groups, len(groups), 1, 0, old_mbs),
            "new": training_plan(groups, len(groups), 1, 0, old_mbs, lengths, max_tokens, False),
        }
        r["plans_config"] = {"old_micro_batch_size": old_mbs, "new_max_tokens": max_tokens,
                             "why": "token budget = old micro_batch_size x longest possible row: the same "
                                    "worst-case memory for both plans",
                             **({"oom_fallbacks": r["plans_config"]["oom_fallbacks"]}
                                if "oom_fallbacks" in r.get("plans_config", {}) else {})}
        for name, plan in self.plans.items():
            micro = plan[0].micro
            costs = [micro_batch_cost([lengths[i] for i in m]) for m in micro]
            r["plans_config"][name] = {"micro_batches": len(micro), "rows_per_micro_batch": [len(m) for m in micro],
                                       "padded_tokens": sum(costs), "max_micro_batch_tokens": max(costs),
                                       "padding_fraction": round(1 - sum(lengths) / sum(costs), 4)}
        log(f"batch: {len(lengths)} rows, {sum(lengths)} tokens, lengths min/median/max "
            f"{r['batch']['length_min_median_max']}; old plan {r['plans_config']['old']['micro_batches']} "
            f"micro-batches ({old_mbs} rows), new plan {r['plans_config']['new']['micro_batches']} "
            f"(<= {max_tokens} tokens)")

    def auto_micro_batch_size(self) -> int:
        """The most rows of the longest length (1 to 4, the recipe's) per micro-batch whose update
        fits this device by the memory plan (``prorl_megatron.plan``, less the reference copy this
        script does not build). On CPU: 2. An out-of-memory warm-up steps down."""
        if not CUDA:
            return 2
        a = self.args
        total = torch.cuda.get_device_properties(0).total_memory
        for rows in (4, 3, 2, 1):
            memory = memory_plan(self.dims, a.cap, rows * a.cap, "selective", a.chunk_tokens, total)
            if plan_update_bytes_here(memory) <= total:
                return rows
        return 1

    # ---- the two phases, as prorl_megatron.train runs them --------------------------------

    def logprob_phase(self, plan) -> None:
        from prorl_megatron.models.forward import run_microbatches
        from prorl_megatron.rollout.batch import micro_batches, response_values

        batch, chunk = self.batch, self.args.chunk_tokens
        n, width = batch["mask"].shape
        batch["old_logprobs"] = torch.zeros(n, width)
        batch["ref_logprobs"] = torch.zeros(n, width)
        for mini in plan:
            mbs = micro_batches(batch, mini.micro, self.device, ["response_index", "mask", "rollout_logprobs"])
            with torch.no_grad():
                policy = run_microbatches(self.ddp, mbs, vocab_size=self.dims.vocab_size, with_entropy=True,
                                          temperature=TEMPERATURE, chunk_tokens=chunk)
                reference = run_microbatches(self.reference, mbs, vocab_size=self.dims.vocab_size,
                                             temperature=TEMPERATURE, chunk_tokens=chunk)
            for rows, mb, both, ref in zip(mini.micro, mbs, policy, reference):
                index = mb.extras["response_index"]
                old = response_values(both[0], index)
                ref_lp = response_values(ref, index)
                batch["old_logprobs"][rows, :old.shape[1]] = old.float().cpu()
                batch["ref_logprobs"][rows, :old.shape[1]] = ref_lp.float().cpu()

    def update_phase(self, plan, batch=None) -> dict:
        """One optimizer update per mini-batch: ``train.update_policy``'s calls and loss."""
        from prorl_megatron.algo import policy_kl_loss
        from prorl_megatron.models.forward import run_microbatches
        from prorl_megatron.models.policy import finalize_grads, optimizer_step, zero_grads
        from prorl_megatron.rollout.batch import micro_batches, response_values

        batch = self.batch if batch is None else batch
        fields = ["response_index", "mask", "old_logprobs", "ref_logprobs", "advantages", "rollout_logprobs"]
        report = {}
        for mini in plan:
            mini_tokens = float(batch["mask"][mini.rows].sum())
            mbs = micro_batches(batch, mini.micro, self.device, fields)
            scale = len(mbs)  # megatron divides each loss by the micro-batch count (DP size 1)

            def loss_fn(logprobs, mb):
                x = mb.extras
                lp = response_values(logprobs, x["response_index"])
                loss, pg, kl, stats = policy_kl_loss(lp, x["old_logprobs"], x["ref_logprobs"], x["advantages"],
                                                     x["mask"], kl_coef=1e-4, kl_estimator="k3", eps_low=0.2,
                                                     eps_high=0.4, dual_clip_c=3.0, agg="token-mean")
                share = float(x["mask"].sum()) / max(mini_tokens, 1.0)  # token-mean over the mini-batch
                return loss * (share * scale), {"loss": float(loss.detach()) * share}

            zero_grads(self.ddp, self.optimizer)
            reports = run_microbatches(self.ddp, mbs, vocab_size=self.dims.vocab_size, loss_fn=loss_fn,
                                       temperature=TEMPERATURE, chunk_tokens=self.args.chunk_tokens)
            finalize_grads(self.ddp)
            stepped, norm = optimizer_step(self.optimizer)
            report = {"stepped": stepped, "grad_norm": round(norm, 4),
                      "loss": round(sum(x["loss"] for x in reports), 6)}  # the mini-batch's token-mean loss
        return report

    # ---- sections ---------------------------------------------------------------------

    def plans_and_update(self) -> None:
        a = self.args
        with self.section("plans") as out:
            while True:
                log("warm-up: new plan (logprob pass + update), then old plan")
                warm, failed = {}, None
                try:
                    for name in ("new", "old"):
                        t_lp, _ = timed(lambda: self.logprob_phase(self.plans[name]))
                        t_up, rep = timed(lambda: self.update_phase(self.plans[name]))
                        warm[name] = {"logprob_s": round(t_lp, 3), "update_s": round(t_up, 3)}
                        log(f"warm-up {name}: logprob {t_lp:.2f} s, update {t_up:.2f} s ({rep})")
                except Exception as e:
                    mbs = self.results["plans_config"]["old_micro_batch_size"]
                    if not is_oom(e) or mbs == 1 or a.max_tokens:
                        raise
                    failed = f"{type(e).__name__} at old_micro_batch_size {mbs}: {str(e)[:200]}"
                if failed is None:
                    break
                self.zero()
                free_memory()
                log(f"out of memory in the warm-up; one row fewer per micro-batch ({failed})")
                fallbacks = self.results["plans_config"].get("oom_fallbacks", []) + [failed]
                self.results["plans_config"]["oom_fallbacks"] = fallbacks
                self.set_plans(mbs - 1)
            out["warm_up"] = warm
            # weights, grad buffer, main weights, Adam, megatron's attention buffer, cached causal masks
            self.results["allocated_after_warm_up_gib"] = gib(allocated())
            round_s = sum(v["logprob_s"] + v["update_s"] for v in warm.values())
            rounds, updates, peaks = [], [], []
            for i in range(a.rounds):
                if self.time_left() < round_s + a.reserve_s:
                    log(f"round {i + 1} skipped: {self.time_left():.0f} s left of the budget")
                    out["rounds_skipped"] = a.rounds - i
                    break
                row = {}
                for name in ("old", "new"):
                    free_memory()
                    reset_peak()
                    t_lp, _ = timed(lambda: self.logprob_phase(self.plans[name]))
                    lp_peak = peak()
                    free_memory()
                    reset_peak()
                    base = allocated()
                    t_up, rep = timed(lambda: self.update_phase(self.plans[name]))
                    row[name] = {"logprob_s": round(t_lp, 3), "update_s": round(t_up, 3),
                                 "logprob_peak_gib": gib(lp_peak), "update_peak_gib": gib(peak()),
                                 "update_peak_over_start_gib": gib(None if base is None else peak() - base)}
                    if name == "new":
                        updates.append(t_up)
                        peaks.append(peak())
                    log(f"round {i + 1} {name}: logprob {t_lp:.2f} s, update {t_up:.2f} s, "
                        f"peak {row[name]['update_peak_gib']} GiB ({rep})")
                rounds.append(row)
                out["rounds"] = rounds
                self.save()
            if not rounds:  # out of time: the warm-ups are all there is (they include first-call costs)
                out["timings_from"] = "warm-up only (no timed round fitted the budget)"
                rounds = [warm]
                updates = [warm["new"]["update_s"]]
                peaks = [None]
            total = {n: sum(x[n]["logprob_s"] + x[n]["update_s"] for x in rounds) for n in ("old", "new")}
            out["logprob_plus_update_s"] = {n: round(v, 3) for n, v in total.items()}
            for phase in ("logprob_s", "update_s"):
                out[f"ratio_new_over_old/{phase[:-2]}"] = round(
                    sum(x["new"][phase] for x in rounds) / sum(x["old"][phase] for x in rounds), 4)
            out["ratio_new_over_old/logprob_plus_update"] = round(total["new"] / total["old"], 4)

            tokens = sum(self.lengths)
            flops = model_flops(self.dims, self.lengths)
            best = min(updates)
            upd: dict[str, Any] = {
                "plan": "new (token budget)", "timed_updates": len(updates), "update_s": [round(t, 3) for t in updates],
                "real_tokens": tokens, "padded_tokens": self.results["plans_config"]["new"]["padded_tokens"],
                "tokens_per_s_mean": round(tokens * len(updates) / sum(updates), 1),
                "tokens_per_s_best": round(tokens / best, 1),
                "model_tflop_per_update": round(flops / 1e12, 2),
                "model_tflops_per_s_mean": round(flops * len(updates) / sum(updates) / 1e12, 1),
                "flops_formula": "sum over rows of 6*N*S + 12*L*(heads*head_dim)*S^2 (N = matmul parameters, "
                                 "S = real row length; padding and recompute not counted)",
                "update_peak_gib": gib(max(peaks)) if CUDA and None not in peaks else None,
                "logprob_pass_tokens_per_s": round(
                    tokens * len(rounds) / sum(x["new"]["logprob_s"] for x in rounds), 1),
            }
            if CUDA:
                name = torch.cuda.get_device_name()
                assumed = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
                upd["peak_assumed_tflops"] = assumed / 1e12
                upd["peak_assumed_note"] = ("dense bf16 datasheet peak of H100/H200 SXM (989 TFLOP/s); local "
                                            "layer spec (no Transformer Engine here), so no fused attention, "
                                            "RMSNorm or RoPE kernels")
                upd["mfu"] = round(flops * len(updates) / sum(updates) / assumed, 4)
                upd["fraction_of_measured_matmul_rate"] = round(
                    flops * len(updates) / sum(updates) / (self.results["matmul_ceiling_tflops"] * 1e12), 4)
            self.results["update"] = upd
            log(f"update: {upd['tokens_per_s_mean']} tokens/s, MFU {upd.get('mfu')}; "
                f"new/old (logprob+update) {out['ratio_new_over_old/logprob_plus_update']}")

    def logprob_memory(self) -> None:
        from prorl_megatron.models.logprobs import hidden_states_output, logprobs_from_hidden, next_token_labels
        from prorl_megatron.rollout.batch import micro_batch_cost, micro_batches

        with self.section("logprob_memory") as out:
            micro = max(self.plans["new"][0].micro, key=lambda m: micro_batch_cost([self.lengths[i] for i in m]))
            (mb,) = micro_batches(self.batch, [micro], self.device, [])
            ids = mb.input_ids
            labels = next_token_labels(ids)
            gpt, vocab = self.gpt, self.dims.vocab_size
            with torch.no_grad(), hidden_states_output(self.reference):
                positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
                hidden0 = self.reference(ids, positions, None)  # [S, B, H], fp32 from Float16Module, as in training
            out["micro_batch"] = {"rows": int(ids.shape[0]), "seq": int(ids.shape[1]),
                                  "tokens": int(ids.numel()), "hidden_dtype": str(hidden0.dtype).replace("torch.", ""),
                                  "chunk_tokens": self.args.chunk_tokens}

            def chunked(h):
                return logprobs_from_hidden(gpt, h, labels, vocab, TEMPERATURE, self.args.chunk_tokens)

            def full(h):
                weight = gpt.output_layer.weight
                logits, _ = gpt.output_layer(h.to(weight.dtype))  # [S, B, V]
                logits = logits.float()[..., :vocab] / TEMPERATURE
                return torch.log_softmax(logits, -1).gather(-1, labels.t().unsqueeze(-1)).squeeze(-1).t()

            def chunked_entropy(h):  # the old-policy pass: logprobs and the entropy
                return logprobs_from_hidden(gpt, h, labels, vocab, TEMPERATURE, self.args.chunk_tokens, True)

            for grad, name, fn in ((True, "chunked", chunked), (True, "full_logits", full),
                                   (False, "chunked", chunked), (False, "chunked_with_entropy", chunked_entropy),
                                   (False, "full_logits", full)):
                key = f"{name}/{'forward_backward' if grad else 'no_grad'}"
                try:
                    free_memory()
                    hidden = hidden0.detach().clone().requires_grad_(grad)
                    reset_peak()
                    base = allocated()
                    start = time.perf_counter()
                    with torch.set_grad_enabled(grad):
                        lp = fn(hidden)
                        if grad:
                            lp[:, :-1].sum().backward()
                    sync()
                    out[key] = {"peak_over_start_gib": gib(None if base is None else peak() - base),
                                "s": round(time.perf_counter() - start, 3)}
                    del lp, hidden
                except Exception as e:
                    if not is_oom(e):
                        raise
                    out[key] = {"error": f"out of memory: {str(e)[:200]}"}
                self.zero()
                log(f"logprob head {key}: {out[key]}")
            for mode in ("forward_backward", "no_grad"):
                c = out.get(f"chunked/{mode}", {}).get("peak_over_start_gib")
                f = out.get(f"full_logits/{mode}", {}).get("peak_over_start_gib")
                if c and f:
                    out[f"ratio_full_over_chunked/{mode}"] = round(f / c, 2)

    def recompute(self) -> None:
        from prorl_megatron.rollout.batch import Sample, make_batch

        a = self.args
        with self.section("recompute") as out:
            if self.time_left() < a.reserve_s:
                out["skipped"] = f"{self.time_left():.0f} s left of the budget"
                return
            ladder = [n for n in a.recompute_ladder if n <= a.cap] or [min(a.recompute_ladder)]
            seq = ladder[-1]
            if CUDA:  # the longest of the ladder that the plan says fits without recompute
                total = torch.cuda.get_device_properties(0).total_memory
                for n in ladder:
                    need = plan_update_bytes_here(memory_plan(self.dims, n, n, "none", a.chunk_tokens, total))
                    if need <= 0.95 * total:
                        seq = n
                        break
                out["plan_update_gib"] = {
                    mode: gib(plan_update_bytes_here(memory_plan(self.dims, seq, seq, mode, a.chunk_tokens, total)))
                    for mode in ("none", "selective")}
            out["seq"] = seq
            rng = random.Random(a.seed + 1)
            ids = [rng.randrange(1, self.dims.vocab_size) for _ in range(seq)]
            prompt = min(256, seq // 4)
            one = make_batch([Sample(ids[:prompt], ids[prompt:], [-1.0] * (seq - prompt), 1.0, False, "math", 0)])
            for name in ("advantages", "old_logprobs", "ref_logprobs"):
                one[name] = torch.where(one["mask"], -0.5 if name != "advantages" else 1.0, 0.0)
            plan = [SimpleNamespace(rows=[0], micro=[[0]])]
            attn = [m for m in self.gpt.modules() if hasattr(m, "checkpoint_core_attention")]
            try:
                for i in range(2):  # the second pass of each is the measurement (first: new shapes)
                    for mode in ("selective", "none"):
                        if mode in out and "error" in out[mode]:
                            continue
                        for m in attn:
                            m.checkpoint_core_attention = mode == "selective"
                        try:
                            free_memory()
                            reset_peak()
                            base = allocated()
                            t, _ = timed(lambda: self.update_phase(plan, one))
                            out[mode] = {"update_s": round(t, 3), "peak_gib": gib(peak()),
                                         "peak_over_start_gib": gib(None if base is None else peak() - base),
                                         "pass": i + 1}
                        except Exception as e:
                            if not is_oom(e):
                                raise
                            out[mode] = {"error": f"out of memory: {str(e)[:200]}"}
                        self.zero()
                        free_memory()
                        log(f"recompute {mode}, one row of {seq}: {out[mode]}")
            finally:
                for m in attn:
                    m.checkpoint_core_attention = True
            s, n = out.get("selective", {}), out.get("none", {})
            if "update_s" in s and "update_s" in n:
                out["time_ratio_selective_over_none"] = round(s["update_s"] / n["update_s"], 3)
                if s.get("peak_over_start_gib"):
                    out["peak_over_start_ratio_none_over_selective"] = round(
                        n["peak_over_start_gib"] / s["peak_over_start_gib"], 3)

    def memory_plan(self) -> None:
        with self.section("memory_plan") as out:
            a, cfg = self.args, self.results["plans_config"]
            total = torch.cuda.get_device_properties(0).total_memory if CUDA else None
            memory = memory_plan(self.dims, a.cap, cfg["new_max_tokens"], "selective", a.chunk_tokens, total)
            reference = plan_row(memory, "reference weights")
            trainer = {p: sum(r.bytes.get(p, 0) for r in memory.rows if not r.what.startswith(("vLLM", "runtime")))
                       for p in ("logprobs", "update")}
            out["settings"] = {"seq": a.cap, "max_tokens_per_micro_batch": cfg["new_max_tokens"],
                               "recompute": "selective", "logprob_chunk_tokens": a.chunk_tokens,
                               "largest_micro_batch_here": cfg["new"]["max_micro_batch_tokens"]}
            out["plan_training_phase_gib"] = gib(memory.training_bytes)
            out["plan_training_phase_gib_less_reference"] = {
                p: gib(trainer[p] - reference.get(p, 0)) for p in trainer}
            out["why_less_reference"] = ("this script builds no reference copy (its reference pass runs the "
                                         "policy's own Float16Module); the plan counts one")
            rounds = (self.results.get("plans") or {}).get("rounds", [])
            measured = {phase: max((x["new"][f"{key}_peak_gib"] for x in rounds), default=None) if CUDA else None
                        for phase, key in (("update", "update"), ("logprobs", "logprob"))}
            out["measured_peak_gib"] = measured
            for phase in ("update", "logprobs"):
                est = out["plan_training_phase_gib_less_reference"][phase]
                if measured[phase] and est:
                    out[f"measured_over_plan/{phase}"] = round(measured[phase] / est, 3)
            out["plan_table"] = memory.table().splitlines()
            log(f"memory plan: update {out['plan_training_phase_gib_less_reference']} GiB (less reference) "
                f"vs measured {measured}")

    def run(self) -> dict:
        self.setup()
        self.save()
        self.make_batch()
        self.save()
        self.plans_and_update()
        self.logprob_memory()
        self.recompute()
        self.memory_plan()
        self.results["status"] = "done"
        self.save()
        return self.results


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, gloo, CPU: the code path only")
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu_check.json when OUT is set)")
    p.add_argument("--rows", type=int, default=32, help="sequences in the mini-batch (the recipe: 1024 / 32 ranks)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group)")
    p.add_argument("--median", type=int, default=None, help="default 4096 (2731 on a GPU under 100 GiB)")
    p.add_argument("--sigma", type=float, default=0.6)
    p.add_argument("--cap", type=int, default=None,
                   help="longest sequence; default 9216 = max_prompt 1024 + max_response 8192 (6144 under 100 GiB)")
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--old-micro-batch-size", type=int, default=0, help="0: from the device memory (1-4)")
    p.add_argument("--max-tokens", type=int, default=0, help="0: old micro_batch_size x cap")
    p.add_argument("--chunk-tokens", type=int, default=None, help="default: train.logprob_chunk_tokens")
    p.add_argument("--rounds", type=int, default=2, help="timed old/new rounds after the warm-ups")
    p.add_argument("--recompute-ladder", type=int, nargs="+", default=[8192, 6144, 4096, 3072, 2048])
    p.add_argument("--budget-s", type=float, default=300.0, help="skip optional work past this many seconds")
    p.add_argument("--reserve-s", type=float, default=40.0, help="seconds kept for the last sections")
    args = p.parse_args(argv)
    if args.chunk_tokens is None:
        from prorl_megatron.config import TrainConfig

        args.chunk_tokens = TrainConfig().logprob_chunk_tokens
    if args.cpu_smoke:
        if CUDA:
            p.error("--cpu-smoke is for a machine without CUDA")
        args.rows, args.group, args.median, args.cap, args.min_len = 12, 4, 48, 128, 16
        args.chunk_tokens, args.recompute_ladder, args.rounds = 64, [96, 64], 2
    # an 80 GB card cannot hold one 9216-token row of the local spec's update next to the
    # optimizer state (the memory plan: ~78 GiB): there the lengths are scaled by 2/3
    small = CUDA and torch.cuda.get_device_properties(0).total_memory < 100 * GIB
    args.scaled_for_device = small and args.cap is None and args.median is None
    args.cap = args.cap or (6144 if small else 9216)
    args.median = args.median or (2731 if small else 4096)
    check = Check(args)
    try:
        results = check.run()
    except BaseException as e:
        traceback.print_exc()
        check.results["status"] = f"failed: {type(e).__name__}: {str(e)[:500]}"
        check.save()
        print(json.dumps(check.results, indent=2), flush=True)
        return 1
    finally:
        try:
            from prorl_megatron.parallel import destroy_parallel

            destroy_parallel()
        except Exception:
            pass
    print(json.dumps(results, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
