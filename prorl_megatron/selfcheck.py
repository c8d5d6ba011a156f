"""Algorithm self-check: the ProRL core (``algo/``) run end to end on a tabular policy.

What it does, with the recipe's ``rollout``/``algo``/``reset``/``train`` settings::

    python -m prorl_megatron.selfcheck --recipe recipes/tiny_cpu.yaml [--print-config] [key=value ...]

The "model" is a table of logits, one row per (prompt, answer position), and the task is
single-digit addition answered as two digits ("7+5=" -> "12"), rewarded 1 only for the exact
answer. Each step samples ``rollout.n`` answers per prompt at ``rollout.temperature``,
scores them, drops all-equal groups (dynamic sampling), computes advantages, and updates
the table with the clipped surrogate plus ``algo.kl_coef`` x KL to a reference table that the
reset scheduler hard-resets (optimizer state too). No Megatron, no vLLM: this checks the
algorithm, not the system; ``prorl_megatron.train`` is the real loop.

It exits non-zero unless (1) the on-policy importance ratio is exactly 1, (2) pass@1 at
least doubles, and (3) KL to the reference is exactly 0 right after every reset.
"""

from __future__ import annotations

import argparse
import sys

import torch

from prorl_megatron import algo
from prorl_megatron.config import ConfigError, Recipe, add_recipe_arguments, recipe_from_args

NUM_DIGITS = 10
ANSWER_LEN = 2
TABLE_LR = 0.05  # a logit table wants a far larger step than a transformer's recipe lr


def make_task() -> torch.Tensor:
    """Targets [100, 2]: the two answer digits of a+b for every prompt (a, b) in 0..9."""
    a, b = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    total = (a + b).flatten()
    return torch.stack([total // 10, total % 10], dim=1)


def initial_table(targets: torch.Tensor, seed: int) -> torch.Tensor:
    """Logits [100, 2, 10] of a weakly warmed-up policy: noisy, leaning to the right digits."""
    g = torch.Generator().manual_seed(seed)
    logits = 1.2 * torch.randn(targets.shape[0], ANSWER_LEN, NUM_DIGITS, generator=g)
    logits.scatter_add_(2, targets[..., None], torch.full(targets[..., None].shape, 1.2))
    return logits


def token_logprobs(table: torch.Tensor, prompts: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """Logprobs [N, 2] of ``tokens`` under the sampling distribution log_softmax(logits / T)."""
    logp = torch.log_softmax(table[prompts] / temperature, dim=-1)  # [N, 2, 10]
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def pass_rates(table: torch.Tensor, targets: torch.Tensor, n: int, ks: list[int], temperature: float,
               seed: int) -> dict[int, float]:
    """Mean unbiased pass@k over all prompts from ``n`` samples each."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(table / temperature, dim=-1)  # [P, 2, 10]
    samples = torch.multinomial(probs.reshape(-1, NUM_DIGITS), n, replacement=True, generator=g)
    correct = (samples.reshape(-1, ANSWER_LEN, n) == targets[..., None]).all(dim=1).sum(dim=1)  # [P]
    return {k: sum(algo.pass_at_k(n, int(c), k) for c in correct) / len(correct) for k in ks}


def run(recipe: Recipe, log=print) -> dict[str, float]:
    """Train the table with the recipe's algorithm; return before/after figures and check flags."""
    torch.manual_seed(recipe.seed)
    ro, al, tr = recipe.rollout, recipe.algo, recipe.train
    targets = make_task()
    policy = initial_table(targets, recipe.seed).requires_grad_(True)
    reference = policy.detach().clone()
    new_optimizer = lambda: torch.optim.AdamW([policy], lr=TABLE_LR, weight_decay=0.0)  # noqa: E731
    optimizer = new_optimizer()
    scheduler = algo.Trigger(recipe.reset.spec())  # the recipe's reset schedule
    ks = sorted(set(recipe.eval.ks))
    n_eval = recipe.eval.n_samples
    before = pass_rates(policy.detach(), targets, n_eval, ks, ro.temperature, recipe.seed)
    on_policy_ratio_exact, kl_zero_after_reset = True, True
    prompts_per_step = min(tr.prompts_per_step, targets.shape[0])
    updates_per_step = tr.prompts_per_step // tr.mini_batch_prompts

    for step in range(1, tr.steps + 1):
        # rollout: n samples per prompt at the rollout temperature
        prompt_ids = torch.randperm(targets.shape[0])[:prompts_per_step]
        prompts = prompt_ids.repeat_interleave(ro.n)  # [N]
        group_ids = prompts.clone()
        with torch.no_grad():
            probs = torch.softmax(policy[prompts] / ro.temperature, dim=-1)  # [N, 2, 10]
            tokens = torch.multinomial(probs.reshape(-1, NUM_DIGITS), 1).reshape(-1, ANSWER_LEN)  # [N, 2]
        rewards = (tokens == targets[prompts]).all(dim=1).float()  # [N]

        # dynamic sampling: keep groups that carry signal
        keep = algo.keep_informative_groups(rewards, group_ids) if al.dynamic_sampling else torch.ones_like(rewards, dtype=torch.bool)
        kept_frac = keep.float().mean().item()
        prompts, tokens, group_ids, rewards_kept = prompts[keep], tokens[keep], group_ids[keep], rewards[keep]
        mask = torch.ones_like(tokens, dtype=torch.bool)  # [N', 2]
        metrics = {"reward": rewards.mean().item(), "kept": kept_frac}
        if keep.any():
            adv_kwargs = {"scale_by_std": al.scale_by_std} if al.advantage == "grpo" else {}
            advantages = algo.compute_advantages(al.advantage, rewards_kept, group_ids, mask, **adv_kwargs)
            with torch.no_grad():
                old = token_logprobs(policy, prompts, tokens, ro.temperature)
                ref = token_logprobs(reference, prompts, tokens, ro.temperature)
            # policy update, mini-batch by mini-batch
            for chunk in torch.arange(len(prompts)).chunk(updates_per_step):
                logp = token_logprobs(policy, prompts[chunk], tokens[chunk], ro.temperature)
                pg_loss, pg = algo.policy_loss(
                    logp, old[chunk], advantages[chunk], mask[chunk], eps_low=al.eps_low,
                    eps_high=al.eps_high, dual_clip_c=al.dual_clip_c, agg=al.loss_agg,
                )
                kl = algo.aggregate(algo.kl_penalty(logp, ref[chunk], al.kl_estimator), mask[chunk], al.loss_agg)
                if step == 1 and chunk[0] == 0:
                    on_policy_ratio_exact = pg["ratio_mean"] == 1.0 and pg["ratio_max"] == 1.0
                optimizer.zero_grad()
                (pg_loss + al.kl_coef * kl).backward()
                optimizer.step()
            metrics.update(kl_ref=kl.item(), clip_frac=pg["clip_frac"])

        event = scheduler.observe(step, metrics)
        if event is not None:  # hard reset: reference <- policy, fresh optimizer state
            reference = policy.detach().clone()
            optimizer = new_optimizer()
            with torch.no_grad():
                probe = token_logprobs(policy, prompts, tokens, ro.temperature)
                kl_now = algo.aggregate(algo.kl_penalty(probe, token_logprobs(reference, prompts, tokens, ro.temperature),
                                                        al.kl_estimator), mask, al.loss_agg).item()
            kl_zero_after_reset &= kl_now == 0.0
            log(f"step {step:4d}  reset: {event.reason} (KL to the reference now {kl_now:g})")
        if step == 1 or step % 10 == 0 or step == tr.steps:
            log(f"step {step:4d}  reward {metrics['reward']:.3f}  kept {kept_frac:.2f}  "
                f"KL {metrics.get('kl_ref', 0.0):.4f}  clip {metrics.get('clip_frac', 0.0):.3f}")

    after = pass_rates(policy.detach(), targets, n_eval, ks, ro.temperature, recipe.seed + 1)
    result = {f"pass@{k}_before": before[k] for k in ks} | {f"pass@{k}_after": after[k] for k in ks}
    result |= {
        "resets": float(scheduler.fired),
        "on_policy_ratio_exact": float(on_policy_ratio_exact),
        "kl_zero_after_reset": float(kl_zero_after_reset),
        "reward_doubled": float(after[1] >= 2 * before[1]) if 1 in after else float("nan"),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(parser, default_recipe="recipes/tiny_cpu.yaml")
    args = parser.parse_args(argv)
    try:
        recipe = recipe_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if 1 not in recipe.eval.ks:
        print("error: the self-check reports pass@1: eval.ks must include 1", file=sys.stderr)
        return 2
    print(f"\n# algorithm self-check: {recipe.algo.advantage}, clip {recipe.algo.eps_low}/{recipe.algo.eps_high}, "
          f"{recipe.algo.loss_agg}, KL {recipe.algo.kl_estimator} x {recipe.algo.kl_coef:g}")
    result = run(recipe)
    ks = sorted(set(recipe.eval.ks))
    for k in ks:
        print(f"pass@{k}: {result[f'pass@{k}_before']:.3f} -> {result[f'pass@{k}_after']:.3f}")
    checks = {
        "on-policy importance ratio is exactly 1": result["on_policy_ratio_exact"] == 1.0,
        "pass@1 at least doubled": result["reward_doubled"] == 1.0,
        "KL to the reference is 0 right after every reset": result["kl_zero_after_reset"] == 1.0,
    }
    for name, ok in checks.items():
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
    print(f"resets: {int(result['resets'])}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
