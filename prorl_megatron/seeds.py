"""Sampling seeds: one noise stream per (step, round, prompt, sample), whatever the engine layout.

vLLM (0.32, ``v1/engine/parallel_sampling.py``) expands a request of ``n`` samples with seed
``s`` into ``n`` child requests seeded ``s + j``. Seeding prompt ``i`` with ``base + i`` would
give neighbouring prompts ``n - 1`` common noise streams (identical prompts: shifted copies of
the same samples), so request seeds are spaced by ``n``: sample ``j`` of prompt ``i`` (its index
in the whole round, not in a replica's share) gets ``base + i * n + j``.

Seeds are distinct modulo ``2**32``, not only as integers: torch's CPU generator (mt19937)
keeps only the low 32 bits of a seed, and vLLM's CPU sampler draws its noise from a generator
seeded with the request's seed, so ``s`` and ``s + 2**32`` sample the same tokens there
(CUDA's Philox uses all 64 bits). All seeds are below ``2**32 + n``, well within what
``torch.Generator.manual_seed`` and vLLM accept (``[0, 2**64)``; vLLM's servers: int64).

Layout of the ``2**32`` residues for one run, counted from a 32-bit key hashed from the recipe
seed (so runs with neighbouring recipe seeds do not share shifted streams):

- training: ``key + (step * S + slot) * n + j`` for sample ``j`` of the prompt in seed slot
  ``slot`` of ``step``, with ``S`` slots per step (:func:`slots_per_step`: ``R * P``, or
  ``algo.max_prompts_per_step`` when larger) and ``n`` = samples per prompt. A wave of prompts
  (a round of dynamic sampling) ``w`` holds slots ``w * P + i``, so ``key + ((step * R + w) * P
  + i) * n + j`` with ``R`` = ``algo.max_sampling_rounds``, ``P`` = ``train.prompts_per_step``;
  prompts drawn ahead take the slots of their draw positions (prorl_megatron/rollout/stream.py).
  Distinct for every tuple as long as ``(steps + 1) * S * n <= 2**31`` (:data:`TRAINING_SPAN`;
  the recipe validation checks it: ProRL's 2,000 steps x 4 x 256 x 16 use 2**25);
- evaluation: the ``E = prompts * eval.n_samples`` residues just below the key (``key - E + i *
  n + j``), the same for every evaluation (comparable across steps), disjoint from training's
  while ``E <= 2**31``.

A resumed run that changes ``P``, ``n`` or ``R`` re-packs the layout: its steps stay distinct from
each other, but may reuse seeds that a *different* step used before the change.
"""

from __future__ import annotations

import hashlib

SEED_MODULUS = 2**32  # the seeds torch's CPU generator tells apart
TRAINING_SPAN = 2**31  # residues for training rollouts; the other half holds evaluation's


def run_key(recipe_seed: int) -> int:
    """The run's 32-bit offset in the seed space, hashed from the recipe seed."""
    digest = hashlib.blake2b(f"prorl-megatron sampling seed {int(recipe_seed)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def request_seed(base: int, prompt_index: int, n: int) -> int:
    """Seed of the request for prompt ``prompt_index`` of a round (its index in the whole round)
    with ``n`` samples: vLLM seeds its sample ``j`` with this + ``j``, i.e. ``base + prompt_index
    * n + j`` (mod 2**32)."""
    if n < 1 or prompt_index < 0:
        raise ValueError(f"request_seed: need n >= 1 and prompt_index >= 0, got n={n}, prompt_index={prompt_index}")
    return (base + prompt_index * n) % SEED_MODULUS


def slots_per_step(rounds_per_step: int, prompts_per_round: int, max_prompts: int = 0) -> int:
    """Seed slots (prompts) a step's layout holds: its waves' ``rounds x prompts``, or the most
    prompts it may draw when that is more."""
    return max(rounds_per_step * prompts_per_round, max_prompts)


def training_seeds_used(steps: int, rounds_per_step: int, prompts_per_round: int, n: int, max_prompts: int = 0) -> int:
    """How many residues a run of steps ``0..steps`` uses (compare with :data:`TRAINING_SPAN`)."""
    return (steps + 1) * slots_per_step(rounds_per_step, prompts_per_round, max_prompts) * n


def step_base_seed(recipe_seed: int, step: int, slots: int, n: int) -> int:
    """Base seed (for :func:`request_seed`, whose ``prompt_index`` is then the seed slot) of
    ``step``, whose layout holds ``slots`` prompts of ``n`` samples each."""
    if step < 0 or slots < 1 or n < 1:
        raise ValueError(f"need step >= 0, slots >= 1, n >= 1; got {step}, {slots}, {n}")
    if (step + 1) * slots * n > TRAINING_SPAN:
        raise ValueError(f"step {step}: {slots} prompts x {n} samples per step exhaust the {TRAINING_SPAN} distinct "
                         "training seeds")
    return (run_key(recipe_seed) + step * slots * n) % SEED_MODULUS


def rollout_base_seed(recipe_seed: int, step: int, round_index: int, *, rounds_per_step: int,
                      prompts_per_round: int, n: int) -> int:
    """Base seed (for :func:`request_seed`) of training generation round ``round_index`` (0-based,
    below ``rounds_per_step``) of ``step``, whose rounds hold at most ``prompts_per_round``
    prompts of ``n`` samples each."""
    if not 0 <= round_index < rounds_per_step:
        raise ValueError(f"round_index {round_index} outside [0, rounds_per_step={rounds_per_step})")
    if step < 0 or prompts_per_round < 1 or n < 1:
        raise ValueError(f"need step >= 0, prompts_per_round >= 1, n >= 1; got {step}, {prompts_per_round}, {n}")
    if training_seeds_used(step, rounds_per_step, prompts_per_round, n) > TRAINING_SPAN:
        raise ValueError(f"step {step}: {rounds_per_step} rounds x {prompts_per_round} prompts x {n} samples per "
                         f"step exhaust the {TRAINING_SPAN} distinct training seeds")
    offset = (step * rounds_per_step + round_index) * prompts_per_round * n
    return (run_key(recipe_seed) + offset) % SEED_MODULUS


def eval_base_seed(recipe_seed: int, prompts: int, n: int) -> int:
    """Base seed of an evaluation of ``prompts`` prompts x ``n`` samples: the residues just below
    the run's key, disjoint from every training seed of the run."""
    if prompts * n > SEED_MODULUS - TRAINING_SPAN:
        raise ValueError(f"evaluation of {prompts} prompts x {n} samples exceeds {SEED_MODULUS - TRAINING_SPAN} seeds")
    return (run_key(recipe_seed) - prompts * n) % SEED_MODULUS
