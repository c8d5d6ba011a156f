import math

import pytest
import torch

from prorl_megatron.algo.sampling import keep_informative_groups, pass_at_k
from tests.algo import reference as ref


def test_keep_informative_groups_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    group_ids = torch.randint(0, 12, (60,), generator=g) * 7
    rewards = torch.randint(0, 2, (60,), generator=g).float()
    got = keep_informative_groups(rewards, group_ids)
    groups = ref.groups_of(group_ids.tolist())
    want = [len({rewards[j].item() for j in groups[gid]}) > 1 for gid in group_ids.tolist()]
    assert got.dtype == torch.bool and got.tolist() == want


def test_keep_informative_groups_edge_cases():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.25, 0.5])
    group_ids = torch.tensor([3, 3, 9, 9, 4, 4, 8, 1])
    # all-right, all-wrong, mixed, singletons
    assert keep_informative_groups(rewards, group_ids).tolist() == [False, False, False, False, True, True, False, False]
    assert keep_informative_groups(rewards.bfloat16(), group_ids).tolist()[4:6] == [True, True]
    assert keep_informative_groups(torch.zeros(0), torch.zeros(0, dtype=torch.int64)).tolist() == []
    with pytest.raises(ValueError, match=r"group_ids: expected shape \[N\] = \[8\], got \[3\]"):
        keep_informative_groups(rewards, group_ids[:3])


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64, 200])
def test_pass_at_k_matches_exact_binomials(n):
    for c in range(0, n + 1, max(1, n // 9)):
        for k in range(1, n + 1, max(1, n // 7)):
            assert pass_at_k(n, c, k) == pytest.approx(ref.binomial_pass_at_k(n, c, k), rel=1e-12, abs=1e-15)


def test_pass_at_k_large_n_is_stable():
    # binomials of this size overflow floats; the product form stays exact to rounding
    n, c, k = 5000, 37, 100
    exact = ref.binomial_pass_at_k(n, c, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10)
    assert pass_at_k(n, 0, 100) == 0.0
    assert pass_at_k(n, n - 99, 100) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)  # pass@1 is the fraction correct
    assert math.isfinite(pass_at_k(4000, 2000, 2000))


def test_pass_at_k_argument_errors():
    with pytest.raises(ValueError, match="c: expected 0 <= c <= n = 4, got 5"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= n = 4, got 0"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="n: expected an int, got float 4.0"):
        pass_at_k(4.0, 1, 1)
