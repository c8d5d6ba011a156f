"""Two processes (DP2, gloo): the token-budget plan trains on exactly what the row-count plan does.

    torchrun --nproc_per_node 2 tests/train/token_plan_worker.py HF_DIR

On one long-tailed batch, for each loss aggregation: the old and reference logprobs, the
entropy and KL statistics, the loss and the DP-reduced gradients of every mini-batch are
computed once under the row-count plan (``train.micro_batch_size`` rows, split in order) and
once under the token-budget plan as ``train_step`` makes it (rows balanced over ranks by the
model's cost model, grouped by length under the budget); they must agree in float32 to 1e-6.
Prints ``OK`` and the largest differences.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from prorl_megatron import train
from prorl_megatron.algo import compute_advantages
from prorl_megatron.config import Recipe
from prorl_megatron.metrics import TokenSums
from prorl_megatron.rollout.batch import Sample, make_batch, micro_batch_tokens, training_plan

GROUPS, N, BUDGET = 4, 6, 160


def long_tailed_samples(vocab: int) -> list[Sample]:
    """GROUPS prompts x N responses whose lengths run from 1 to ~100 tokens (lognormal)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for group in range(GROUPS):
        prompt = torch.randint(2, vocab, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g).tolist()
        for _ in range(N):
            n = int(min(max(torch.exp(torch.randn(1, generator=g) + 3.0).item(), 1), 100))
            response = torch.randint(2, vocab, (n,), generator=g).tolist()
            out.append(Sample(prompt, response, (-torch.rand(n, generator=g)).tolist(),
                              float(torch.rand(1, generator=g) > 0.5), False, "math", group))
    return out


def gathered(t: torch.Tensor) -> torch.Tensor:
    """Rows filled on one rank each (zeros elsewhere) -> every row everywhere."""
    t = t.clone()
    dist.all_reduce(t)
    return t


def logprob_pass(trainer, recipe, batch, plan) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Old/reference logprobs of every row (each rank fills its own), entropy and KL means."""
    sums = TokenSums()
    train.old_and_reference_logprobs(trainer, recipe, batch, plan, sums)
    logprobs = {k: gathered(batch[k]) for k in ("old_logprobs", "ref_logprobs")}
    return logprobs, sums.means(["entropy", "kl_ref", "mismatch_mean"], ["mismatch_max"])


def update_pass(trainer, recipe, batch, plan) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Each mini-batch's loss means and DP-reduced gradients (no optimizer step)."""
    stats, grads = {}, []
    for mini_batch in plan:
        sums = TokenSums()
        train.policy_gradients(trainer, recipe, batch, mini_batch, sums)
        stats.update({f"{k}/{len(grads)}": v for k, v in sums.means(["loss", "pg_loss", "kl_loss", "clip_frac"]).items()})
        grads.append(torch.cat([p.main_grad.flatten().clone() for p in trainer.policy.parameters()]))
    return stats, grads


def main(hf_dir: str) -> None:
    recipe = Recipe()
    overrides = {"model.hf_path": hf_dir, "precision.params_dtype": "float32", "rollout.n": N,
                 "rollout.max_prompt_tokens": 16, "rollout.max_response_tokens": 100, "train.prompts_per_step": GROUPS,
                 "train.mini_batch_prompts": 2, "train.micro_batch_size": 3, "algo.kl_coef": 0.05}
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(recipe, section), name, value)
    trainer = train.passes_only(recipe)
    rank, dp = trainer.layout.dp_rank, trainer.layout.data
    samples = long_tailed_samples(trainer.dims.vocab_size)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    groups = [[i for i, s in enumerate(samples) if s.group == k] for k in range(GROUPS)]
    by_count = training_plan(groups, 2, dp, rank, recipe.train.micro_batch_size)
    by_tokens = training_plan(groups, 2, dp, rank, recipe.train.micro_batch_size, lengths, BUDGET, trainer.packed,
                              trainer.cost)  # as train_step plans
    assert [m.micro for m in by_count] != [m.micro for m in by_tokens], "the two plans must group rows differently"
    assert all(micro_batch_tokens([lengths[r] for r in mb], trainer.packed, trainer.cost) <= BUDGET
               for m in by_tokens for mb in m.micro if len(mb) > 1)
    worst = {}
    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        recipe.algo.loss_agg = agg
        results = []
        for plan in (by_count, by_tokens):
            batch = make_batch(samples)
            batch["advantages"] = compute_advantages("grpo", batch["rewards"], batch["group_ids"], batch["mask"])
            logprobs, stats = logprob_pass(trainer, recipe, batch, plan)
            # both updates get the same inputs: the count plan's logprobs, the old ones moved off
            # the policy (ratios away from 1, so clipping acts) by noise drawn alike on every rank
            first = results[0][0] if results else logprobs
            noise = 0.3 * torch.randn(batch["mask"].shape, generator=torch.Generator().manual_seed(1))
            batch["old_logprobs"] = first["old_logprobs"] + noise
            batch["ref_logprobs"] = first["ref_logprobs"]
            update_stats, grads = update_pass(trainer, recipe, batch, plan)
            results.append((logprobs, {**stats, **update_stats}, grads))
        (lp_a, st_a, gr_a), (lp_b, st_b, gr_b) = results
        real = make_batch(samples)["mask"]  # padded positions hold whatever their micro-batch gave
        for k in lp_a:
            worst[f"{agg} {k}"] = float(((lp_a[k] - lp_b[k]) * real).abs().max())
        for k in st_a:
            worst[f"{agg} {k}"] = abs(st_a[k] - st_b[k]) / max(1.0, abs(st_a[k]))
        for i, (a, b) in enumerate(zip(gr_a, gr_b)):
            assert float(a.abs().max()) > 0, "no gradient"
            worst[f"{agg} grad/{i}"] = float((a - b).abs().max()) / max(1.0, float(a.abs().max()))
    bad = {k: v for k, v in worst.items() if not v <= 1e-6}
    if rank == 0:
        print("largest differences:", {k: f"{v:.1e}" for k, v in sorted(worst.items(), key=lambda kv: -kv[1])[:4]})
    assert not bad, f"the token-budget plan changed what is trained: {bad}"
    if rank == 0:
        print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
