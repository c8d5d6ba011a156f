"""Sampling seeds (prorl_megatron.seeds): one noise stream per (step, round, prompt,
sample), independent of the engine layout."""

import itertools

import pytest
import torch

from prorl_megatron.collect import shard_bounds
from prorl_megatron import seeds as S


def sample_seeds(base: int, prompts: int, n: int) -> list[int]:
    """The seed vLLM gives sample j of prompt i: request seed + j (v1/engine/parallel_sampling.py)."""
    return [S.request_seed(base, i, n) + j for i in range(prompts) for j in range(n)]


def test_vllm_child_seeds_are_request_seed_plus_j():
    """The premise, checked in vLLM's own code: sample j of an n>1 request seeded s uses s + j."""
    from vllm import SamplingParams
    from vllm.v1.engine.parallel_sampling import ParentRequest

    parent = ParentRequest.__new__(ParentRequest)
    parent.sampling_params = SamplingParams(n=4, seed=1000)
    parent.cached_child_sampling_params = None
    assert [parent._get_child_sampling_params(j).seed for j in range(4)] == [1000, 1001, 1002, 1003]


def test_torch_cpu_generator_keeps_only_32_bits():
    """Why seeds must differ modulo 2**32: vLLM's CPU sampler seeds a torch CPU generator."""
    draw = [torch.randint(0, 2**31, (4,), generator=torch.Generator().manual_seed(s)) for s in (5, 5 + 2**32)]
    assert torch.equal(*draw)


def test_old_scheme_shared_streams():
    """seed + i per request (the old scheme) gives prompt i+1 sample j the stream of prompt i sample j+1."""
    n, base = 16, 1234
    old = {(i, j): base + i + j for i in range(8) for j in range(n)}
    assert old[(1, 0)] == old[(0, 1)] and len(set(old.values())) < len(old)
    new = {(i, j): S.request_seed(base, i, n) + j for i in range(8) for j in range(n)}
    assert len(set(new.values())) == len(new)


@pytest.mark.parametrize("recipe_seed", [0, 1, 1234, 2**40 + 7])
def test_training_and_eval_seeds_are_all_distinct(recipe_seed):
    steps, rounds, prompts, n = 40, 4, 24, 16  # a grid of (step, round, prompt, sample)
    used = {}
    for step, r in itertools.product(range(steps + 1), range(rounds)):
        base = S.rollout_base_seed(recipe_seed, step, r, rounds_per_step=rounds, prompts_per_round=prompts, n=n)
        for i, j in itertools.product(range(prompts), range(n)):
            seed = S.request_seed(base, i, n) + j
            assert 0 <= seed < 2**32 + n  # torch and vLLM accept [0, 2**64)
            used[seed % 2**32] = (step, r, i, j)  # distinct modulo 2**32: also on the CPU generator
    assert len(used) == (steps + 1) * rounds * prompts * n
    # evaluation: its own residues, none of them a training seed
    evaluation = {s % 2**32 for s in sample_seeds(S.eval_base_seed(recipe_seed, 50, 8), 50, 8)}
    assert len(evaluation) == 50 * 8 and not evaluation & set(used)


def test_neighbouring_recipe_seeds_do_not_shift_streams():
    a = S.rollout_base_seed(1, 3, 0, rounds_per_step=4, prompts_per_round=256, n=16)
    b = S.rollout_base_seed(2, 3, 0, rounds_per_step=4, prompts_per_round=256, n=16)
    assert abs(a - b) > 256 * 16
    assert S.run_key(1234) == S.run_key(1234)  # deterministic across processes (no salted hash())


def test_the_seed_budget_bound():
    # ProRL's recipe: 2,000 steps x 4 rounds x 256 prompts x 16 samples use 2**25 of the 2**31
    assert S.training_seeds_used(2000, 4, 256, 16) < 2**26
    last = 2**31 // (4 * 256 * 16) - 1
    base = S.rollout_base_seed(0, last, 3, rounds_per_step=4, prompts_per_round=256, n=16)
    assert (S.request_seed(base, 255, 16) + 15 - S.run_key(0)) % 2**32 == 2**31 - 1  # the span's last seed
    with pytest.raises(ValueError, match="exhaust"):
        S.rollout_base_seed(0, last + 1, 0, rounds_per_step=4, prompts_per_round=256, n=16)
    with pytest.raises(ValueError, match="round_index 4 outside"):
        S.rollout_base_seed(0, 1, 4, rounds_per_step=4, prompts_per_round=256, n=16)


@pytest.mark.parametrize("count", [1, 5, 12])
def test_sharded_rounds_give_every_prompt_its_global_seed(count):
    """A replica seeds its share by the prompts' indices in the whole round (shard_bounds, as
    RolloutEngine.generate_global cuts it): the same seeds for every data-parallel size."""
    want = sample_seeds(777, count, 4)
    for dp in (1, 2, 3, 5):
        got = []
        for rank in range(dp):
            start, end = shard_bounds(count, dp, rank)
            got += [S.request_seed(777, start + i, 4) + j for i in range(end - start) for j in range(4)]
        assert got == want, dp
