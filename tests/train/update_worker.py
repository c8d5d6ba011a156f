"""One process (torchrun, world of 1): the trainer's own update on a batch, finite then not.

    torchrun --nproc_per_node 1 tests/train/update_worker.py HF_DIR DTYPE

``train.update_policy`` on a tiny batch: a finite update steps and logs its gradient norm; an
update whose gradients are NaN (NaN advantages) is skipped, counted, and its norm is logged as
it was measured (non-finite, so the step's mean is non-finite and the run controller's
``nonfinite`` check sees it), not as 0. Reports ``OK rank 0``.
"""

from __future__ import annotations

import math
import sys

import torch

from prorl_megatron import train
from prorl_megatron.config import Recipe
from prorl_megatron.control.decide import Controller, Warn
from prorl_megatron.loop import fresh_counters
from prorl_megatron.metrics import TokenSums
from prorl_megatron.rollout.batch import Sample, make_batch, training_plan
from tests.procs import report_rank


def check(ok: bool, message: str) -> None:
    if not ok:
        sys.exit(f"FAIL: {message}")


def main(hf_dir: str, dtype: str) -> None:
    recipe = Recipe()
    recipe.model.hf_path, recipe.precision.params_dtype = hf_dir, dtype
    recipe.rollout.n, recipe.train.prompts_per_step, recipe.train.mini_batch_prompts = 4, 2, 2
    recipe.train.micro_batch_size, recipe.train.lr, recipe.algo.kl_coef = 8, 1e-3, 0.05
    trainer = train.passes_only(recipe)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(2, 90, (6,), generator=g).tolist(), torch.randint(2, 90, (5 + i,), generator=g)
                      .tolist(), [-1.0] * (5 + i), float(i % 2), False, "math", group)
               for group in range(2) for i in range(4)]
    batch = make_batch(samples)
    train.with_advantages(recipe, batch)
    plan = training_plan([list(range(4)), list(range(4, 8))], 2, 1, 0, 8)
    train.old_and_reference_logprobs(trainer, recipe, batch, plan, TokenSums())
    counters = fresh_counters()

    sums = TokenSums()
    train.update_policy(trainer, recipe, batch, plan[0], sums, counters, 1)
    first = train.step_means(recipe, sums)["grad_norm"]
    check(math.isfinite(first) and first > 0 and counters["skipped_updates"] == 0, f"finite update: {first} {counters}")

    batch["advantages"] = torch.full_like(batch["advantages"], math.nan)
    sums = TokenSums()
    train.update_policy(trainer, recipe, batch, plan[0], sums, counters, 2)
    metrics = train.step_means(recipe, sums)
    check(not math.isfinite(metrics["grad_norm"]), f"a skipped non-finite update logged grad_norm {metrics['grad_norm']}")
    check(counters["skipped_updates"] == 1 and counters["nonfinite_in_row"] == 1, f"counters {counters}")
    recipe.health.nonfinite = "warn"
    (warn,) = Controller([recipe]).decide(2, metrics, lambda since: (None, ""))
    check(isinstance(warn, Warn) and "grad_norm=nan" in warn.alarm.message, f"the health watch saw {warn}")
    report_rank("OK", 0, dtype)


if __name__ == "__main__":
    main(*sys.argv[1:3])
