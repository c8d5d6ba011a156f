"""How a step's rows become micro-batches: the token-budget planner on four length regimes, and
the row-count plan against the token-budget plan on the CPU passes.

    python bench/batching.py plan [--json] [--dp 1 4 8 32 128 256] [--steps 5] [--repeats 5] [--modes packed padded]
    python bench/batching.py cpu [--budget 2048] [--repeats 3]    # wall time of the passes, 2 processes

``plan`` runs the real planner (``prorl_megatron.rollout.batch.training_plan``, called as
``train.train_step`` calls it, with the 1.5B recipe's budget and mini-batches, and the cost model
``prorl_megatron.plan.cost_model`` gives DeepSeek-R1-Distill-Qwen-1.5B's shape) on ``--steps``
seeded steps of 256 prompts x 16 responses (4 mini-batches of 1,024 rows each) for each length
regime of :data:`REGIMES`, each DP size, packed (what the recipe trains) and padded. Per
mini-batch, over the DP ranks' micro-batches: padding efficiency (real tokens / tokens held,
``micro_batch_tokens``), token imbalance (the slowest rank's tokens held / the mean) and FLOP
imbalance (the same in ``micro_batch_cost`` under the 1.5B cost model: forward FLOPs with causal
attention's quadratic term); the table gives their mean and worst over all mini-batches. Planning
time: one rank's ``training_plan`` call for a whole step, divided by its mini-batches; the median
and the best of ``--repeats`` timings per step, then the median over steps.

``cpu`` times the logprob pass (policy + reference) and the update (forward, backward, optimizer
step) of ``prorl_megatron.train`` on one long-tailed batch (16 prompts x 8 responses of 8 to
512 tokens) with the demo model's shape (2 layers, hidden 128), float32, on 2 processes (DP2,
gloo): the row-count plan (recipes/tiny_cpu.yaml's ``micro_batch_size`` 64) and the token-budget
plan, alternately, ``--repeats`` times each; the ratio of medians is new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS, SAMPLES, MINI_BATCH_PROMPTS = 256, 16, 64  # the 1.5B recipe's step: 4 mini-batches of 1,024 rows
REGIMES = {  # name: what a response's length is drawn from (prompts: 100-800 tokens)
    "r1-8k": "lognormal(median 4000, sigma 0.6), capped at 8192",
    "16k-capped": "lognormal(median 10000, sigma 0.8), capped at 16384 (27% at the cap)",
    "bimodal": "half lognormal(median 800, sigma 0.5), half lognormal(median 7000, sigma 0.15); capped at 8192",
    "near-uniform": "uniform 2300-2900 (rows of 2.4k-3.7k tokens)",
}


def step_lengths(regime: str, seed: int) -> tuple[list[int], list[list[int]]]:
    """Row lengths (prompt + response) of one seeded step in ``regime`` and each prompt group's rows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = rng.integers(100, 801, PROMPTS)[:, None]
    normal = rng.standard_normal((PROMPTS, SAMPLES))
    if regime == "r1-8k":
        response = np.minimum(4000 * np.exp(0.6 * normal), 8192)
    elif regime == "16k-capped":
        response = np.minimum(10000 * np.exp(0.8 * normal), 16384)
    elif regime == "bimodal":
        short = rng.random((PROMPTS, SAMPLES)) < 0.5
        response = np.minimum(np.where(short, 800 * np.exp(0.5 * normal), 7000 * np.exp(0.15 * normal)), 8192)
    elif regime == "near-uniform":
        response = rng.integers(2300, 2901, (PROMPTS, SAMPLES))
    else:
        raise ValueError(f"unknown regime {regime!r}; valid: {', '.join(REGIMES)}")
    lengths = (prompt + np.maximum(response, 1).astype(int)).flatten().tolist()
    return lengths, [list(range(g * SAMPLES, (g + 1) * SAMPLES)) for g in range(PROMPTS)]


def qwen_1p5b_cost():
    """The planner's cost model for DeepSeek-R1-Distill-Qwen-1.5B's shape (no packing multiples)."""
    from types import SimpleNamespace

    from bench.gpu_check import QWEN2_1P5B
    from prorl_megatron.models.architectures import model_dims
    from prorl_megatron.plan import cost_model

    return cost_model(model_dims(SimpleNamespace(**QWEN2_1P5B)))


def mini_batch_figures(ranks: list[list[list[int]]], lengths: list[int], packed: bool, cost) -> dict:
    """Real and held tokens, and the slowest rank over the mean in tokens held and in cost, of one
    mini-batch planned as ``ranks[rank][micro-batch][row]``."""
    from prorl_megatron.rollout.batch import micro_batch_cost, micro_batch_tokens

    def loads(measure) -> list[int]:
        return [sum(measure([lengths[r] for r in mb], packed, cost) for mb in micro) for micro in ranks]

    tokens, flops = loads(micro_batch_tokens), loads(micro_batch_cost)
    return {"real": sum(lengths[r] for micro in ranks for mb in micro for r in mb), "held": sum(tokens),
            "token_imbalance": max(tokens) * len(ranks) / sum(tokens),
            "flop_imbalance": max(flops) * len(ranks) / sum(flops),
            "micro_batches": [len(micro) for micro in ranks]}


def regime_figures(regime: str, dp: int, packed: bool, budget: int, cost, steps: int, repeats: int) -> dict:
    """The planner's figures over ``steps`` steps of ``regime`` at ``dp`` ranks (see the docstring)."""
    from prorl_megatron.rollout.batch import rank_micro_batches, training_plan

    per_mini_batch, times = [], []
    for seed in range(steps):
        lengths, groups = step_lengths(regime, seed)
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            mine = training_plan(groups, MINI_BATCH_PROMPTS, dp, 0, 4, lengths, budget, packed, cost)
            timings.append((time.perf_counter() - start) / len(mine))
        times.append((statistics.median(timings), min(timings)))
        for mini_batch in mine:
            ranks = rank_micro_batches(mini_batch.rows, lengths, dp, budget, packed, cost)
            assert ranks[0] == mini_batch.micro, "training_plan and rank_micro_batches disagree"
            per_mini_batch.append(mini_batch_figures(ranks, lengths, packed, cost))
    token, flop = ([m[k] for m in per_mini_batch] for k in ("token_imbalance", "flop_imbalance"))
    micro = [n for m in per_mini_batch for n in m["micro_batches"]]
    return {"efficiency": round(sum(m["real"] for m in per_mini_batch) / sum(m["held"] for m in per_mini_batch), 4),
            "token_imbalance_mean": round(statistics.mean(token), 4), "token_imbalance_max": round(max(token), 4),
            "flop_imbalance_mean": round(statistics.mean(flop), 4), "flop_imbalance_max": round(max(flop), 4),
            "micro_batches_per_rank": [min(micro), max(micro)], "mini_batches": len(per_mini_batch),
            "plan_ms_median": round(1e3 * statistics.median(t[0] for t in times), 2),
            "plan_ms_best": round(1e3 * min(t[1] for t in times), 2)}


def plan(args: argparse.Namespace) -> dict:
    from prorl_megatron.config import load_recipe

    budget = args.budget or load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml").train.max_tokens_per_micro_batch
    cost = qwen_1p5b_cost()
    table = []
    for mode in args.modes:
        for regime in args.regimes:
            for dp in args.dp:
                figures = regime_figures(regime, dp, mode == "packed", budget, cost, args.steps, args.repeats)
                table.append({"mode": mode, "regime": regime, "dp": dp, **figures})
                if not args.json:
                    print(json.dumps(table[-1]), file=sys.stderr)
    return {"budget": budget, "cost_model": {"linear": cost.linear, "quadratic": cost.quadratic},
            "step": f"{PROMPTS} prompts x {SAMPLES}, mini-batches of {MINI_BATCH_PROMPTS} prompts, prompts 100-800 "
                    "tokens", "regimes": {k: REGIMES[k] for k in args.regimes}, "steps": args.steps,
            "repeats": args.repeats, "table": table}


def cpu(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), "cpu-worker", "--budget", str(args.budget), "--repeats",
               str(args.repeats), "--hf-dir", f"{tmp}/hf"]
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit((done.stdout + done.stderr)[-4000:])
        return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def demo_shaped_model(directory: str) -> None:
    """The demo model's shape (prorl_megatron.demo.tiny_base), random weights, positions up to 1024."""
    import torch
    import transformers

    from prorl_megatron.demo.tiny_base import VOCAB_SIZE

    config = transformers.Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory, safe_serialization=True)


def cpu_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from prorl_megatron import train
    from prorl_megatron.algo import compute_advantages
    from prorl_megatron.config import load_recipe
    from prorl_megatron.loop import fresh_counters
    from prorl_megatron.metrics import TokenSums
    from prorl_megatron.rollout.batch import Sample, make_batch, training_plan

    if int(os.environ["RANK"]) == 0:
        demo_shaped_model(args.hf_dir)
    dist.init_process_group("gloo")  # init_parallel below reuses it
    dist.barrier()
    recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml")
    recipe.model.hf_path = args.hf_dir
    recipe.parallel.tensor = 1
    recipe.rollout.max_response_tokens = 512
    trainer = train.passes_only(recipe)
    g = torch.Generator().manual_seed(0)
    samples = []
    for group in range(16):
        prompt = torch.randint(2, 14, (12,), generator=g).tolist()
        for _ in range(8):  # long-tailed: median ~40 tokens, a few near 512
            n = int(min(max(torch.exp(torch.randn(1, generator=g) * 1.0 + 3.7).item(), 8), 512))
            samples.append(Sample(prompt, torch.randint(2, 14, (n,), generator=g).tolist(), [-1.0] * n,
                                  float(torch.rand(1, generator=g) > 0.5), False, "math", group))
    batch = make_batch(samples)
    batch["advantages"] = compute_advantages("grpo", batch["rewards"], batch["group_ids"], batch["mask"])
    lengths = (batch["prompt_len"] + batch["response_len"]).tolist()
    groups = [list(range(k * 8, k * 8 + 8)) for k in range(16)]
    mb = recipe.train.micro_batch_size
    plans = {"row_count": training_plan(groups, 8, 2, trainer.layout.dp_rank, mb),
             "token_budget": training_plan(groups, 8, 2, trainer.layout.dp_rank, mb, lengths, args.budget)}
    times: dict[str, list[float]] = {k: [] for k in plans}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, plan_ in plans.items():
            dist.barrier()
            start = time.perf_counter()
            sums, counters = TokenSums(), fresh_counters()
            train.old_and_reference_logprobs(trainer, recipe, batch, plan_, sums)
            for mini_batch in plan_:
                train.update_policy(trainer, recipe, batch, mini_batch, sums, counters, repeat)
            dist.barrier()
            if repeat:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    if dist.get_rank() == 0:
        print(json.dumps({
            "batch": "16 prompts x 8 responses, 8-512 tokens (median %d), DP2 float32" % statistics.median(lengths),
            "budget": args.budget, "repeats": args.repeats,
            "seconds": {k: round(v, 3) for k, v in med.items()},
            "token_budget_over_row_count": round(med["token_budget"] / med["row_count"], 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["plan", "cpu", "cpu-worker"])
    parser.add_argument("--json", action="store_true", help="plan: print one JSON line only")
    parser.add_argument("--budget", type=int, default=0, help="token budget (plan: the 1.5B recipe's; cpu: 2048)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per step (plan: 5) or rounds (cpu: 3)")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 4, 8, 32, 128, 256], help="plan: DP sizes")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES), help="plan: regimes")
    parser.add_argument("--steps", type=int, default=5, help="plan: seeded steps per regime")
    parser.add_argument("--modes", nargs="+", default=["packed", "padded"], choices=["packed", "padded"],
                        help="plan: micro-batches as packed sequences (the recipe's) or right-padded rows")
    parser.add_argument("--hf-dir", default="")
    args = parser.parse_args()
    if args.mode == "cpu-worker":
        cpu_worker(args)
        return
    if args.mode == "cpu" and not args.budget:
        args.budget = 2048
    if args.repeats is None:
        args.repeats = 5 if args.mode == "plan" else 3
    result = plan(args) if args.mode == "plan" else cpu(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
