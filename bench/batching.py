"""How a step's rows become micro-batches: the row-count plan against the token-budget plan.

    python bench/batching.py plan [--json]                        # the planner alone, R1-like lengths
    python bench/batching.py cpu [--budget 2048] [--repeats 3]    # wall time of the passes, 2 processes

``plan`` runs the real planner (``prorl_megatron.rollout.batch.training_plan``) for every DP
rank on a seeded R1-Distill-like step: 256 prompts x 16 responses, response lengths lognormal
(median 4,000 tokens, sigma 0.6, capped at 8,192), prompts of 100-800 tokens, mini-batches of 64
prompts, DP 32. The row-count plan uses ``micro_batch_size`` 4 (recipes/prorl_1p5b.yaml before
issue 13); the token-budget plan the recipe's ``train.max_tokens_per_micro_batch``. It prints
the padding efficiency (useful tokens / computed tokens, a micro-batch computing rows x its
longest row) and the slowest DP rank's load over the mean (computed tokens), averaged over the
mini-batches.

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


def r1_like_step(seed: int = 0, prompts: int = 256, n: int = 16) -> tuple[list[int], list[list[int]]]:
    """Row lengths (prompt + response) of one step and the rows of each prompt group."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = rng.integers(100, 801, prompts)
    response = np.minimum(np.exp(np.log(4000) + 0.6 * rng.standard_normal((prompts, n))), 8192).astype(int)
    lengths = [int(prompt[g] + response[g, j]) for g in range(prompts) for j in range(n)]
    return lengths, [list(range(g * n, (g + 1) * n)) for g in range(prompts)]


def plan_quality(row_lengths: list[int], groups: list[list[int]], dp: int, mini_batch_prompts: int,
                 **plan_args) -> dict:
    """Padding efficiency and slowest/mean DP load of the planner's micro-batches."""
    from prorl_megatron.rollout.batch import micro_batch_cost, training_plan

    packed = plan_args.get("packed", False)
    plans = [training_plan(groups, mini_batch_prompts, dp, rank, **plan_args) for rank in range(dp)]
    useful = computed = 0
    ratios = []
    for m in range(len(plans[0])):
        loads = [sum(micro_batch_cost([row_lengths[r] for r in mb], packed) for mb in plans[rank][m].micro)
                 for rank in range(dp)]
        useful += sum(row_lengths[r] for r in plans[0][m].rows)
        computed += sum(loads)
        ratios.append(max(loads) / (sum(loads) / dp))
    micro = [len(p[0].micro) for p in plans]
    return {"padding_efficiency": round(useful / computed, 4), "slowest_over_mean": round(sum(ratios) / len(ratios), 4),
            "micro_batches_per_rank": [min(micro), max(micro)]}


def plan(args: argparse.Namespace) -> dict:
    from prorl_megatron.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml")
    budget = args.budget or recipe.train.max_tokens_per_micro_batch
    lengths, groups = r1_like_step()
    return {
        "step": "256 prompts x 16, responses lognormal(median 4000, sigma 0.6) capped 8192, prompts 100-800, DP 32",
        "row_count": {"micro_batch_size": 4, **plan_quality(lengths, groups, 32, 64, micro_batch_size=4)},
        "token_budget": {"max_tokens_per_micro_batch": budget,
                         **plan_quality(lengths, groups, 32, 64, micro_batch_size=4, lengths=lengths,
                                        max_tokens=budget)},
    }


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-dir", default="")
    args = parser.parse_args()
    if args.mode == "cpu-worker":
        cpu_worker(args)
        return
    if args.mode == "cpu" and not args.budget:
        args.budget = 2048
    result = plan(args) if args.mode == "plan" else cpu(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
