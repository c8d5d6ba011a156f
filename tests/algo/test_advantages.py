import pytest
import torch

from prorl_megatron.algo import advantages as A
from tests.algo import reference as ref


def random_batch(seed: int, n_groups: int = 7, max_size: int = 5):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_size + 1, (n_groups,), generator=g).tolist()
    ids = [gid * 3 + 11 for gid, size in enumerate(sizes) for _ in range(size)]  # sparse, unsorted ids
    perm = torch.randperm(len(ids), generator=g)
    group_ids = torch.tensor(ids, dtype=torch.int64)[perm]
    rewards = torch.randint(0, 2, (len(ids),), generator=g).float()
    rewards[::3] = torch.rand(len(rewards[::3]), generator=g)  # some non-binary rewards too
    return rewards, group_ids


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_loop_reference(seed, scale_by_std):
    rewards, group_ids = random_batch(seed)
    got = A.grpo_advantages(rewards, group_ids, eps=1e-6, scale_by_std=scale_by_std)
    want = ref.grpo(rewards.tolist(), group_ids.tolist(), 1e-6, scale_by_std)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_grpo_edge_cases():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0, 1.0])
    group_ids = torch.tensor([0, 0, 0, 1, 2, 2])
    adv = A.grpo_advantages(rewards, group_ids)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]  # all-equal group
    assert adv[3].item() == 0.0  # singleton
    # two members 0 and 1: mean 0.5, Bessel std sqrt(0.5)
    expected = 0.5 / (0.5**0.5 + 1e-6)
    torch.testing.assert_close(adv[4:], torch.tensor([-expected, expected]))
    # Dr. GRPO: no scaling
    torch.testing.assert_close(
        A.grpo_advantages(rewards, group_ids, scale_by_std=False), torch.tensor([0, 0, 0, 0, -0.5, 0.5])
    )


@pytest.mark.parametrize("seed", range(5))
def test_rloo_matches_loop_reference(seed):
    rewards, group_ids = random_batch(seed)
    got = A.rloo_advantages(rewards, group_ids)
    torch.testing.assert_close(got, torch.tensor(ref.rloo(rewards.tolist(), group_ids.tolist())))


def test_rloo_singleton_keeps_reward():
    adv = A.rloo_advantages(torch.tensor([0.7, 1.0, 0.0, 0.0]), torch.tensor([5, 1, 1, 1]))
    torch.testing.assert_close(adv, torch.tensor([0.7, 1.0, -0.5, -0.5]))


@pytest.mark.parametrize("seed", range(5))
def test_reinforce_pp_matches_loop_reference(seed):
    rewards, group_ids = random_batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    mask = torch.rand(len(rewards), 9, generator=g) > 0.3
    mask[0] = False  # a fully masked row
    got = A.reinforce_pp_baseline_advantages(rewards, group_ids, mask)
    want = ref.reinforce_pp(rewards.tolist(), group_ids.tolist(), mask.int().tolist(), 1e-8)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert (got[~mask] == 0).all()
    # whitened over the valid tokens: mean 0, unbiased variance 1
    valid = got[mask]
    assert abs(valid.mean().item()) < 1e-5
    assert abs(valid.var(unbiased=True).item() - 1.0) < 1e-4


def test_reinforce_pp_degenerate_masks():
    rewards, group_ids = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    none = A.reinforce_pp_baseline_advantages(rewards, group_ids, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(2, 3))
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 2] = True
    single = A.reinforce_pp_baseline_advantages(rewards, group_ids, one)
    assert torch.isfinite(single).all() and torch.equal(single, torch.zeros(2, 3))


def test_bf16_inputs_are_computed_in_float32():
    rewards, group_ids = random_batch(3)
    mask = torch.ones(len(rewards), 4)
    for fn in (lambda r: A.grpo_advantages(r, group_ids), lambda r: A.rloo_advantages(r, group_ids),
               lambda r: A.reinforce_pp_baseline_advantages(r, group_ids, mask)):
        got = fn(rewards.bfloat16())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, fn(rewards.bfloat16().float()))


def test_compute_advantages_broadcasts_over_mask():
    rewards, group_ids = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    got = A.compute_advantages("rloo", rewards, group_ids, mask)
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    got = A.compute_advantages("grpo", rewards, group_ids, mask, scale_by_std=False)
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="'gpro' unknown; valid: grpo, rloo, reinforce_pp_baseline"):
        A.compute_advantages("gpro", rewards, group_ids, mask)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"rewards: expected shape \[N\], got \[2, 2\]"):
        A.grpo_advantages(torch.zeros(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"group_ids: expected shape \[N\] = \[3\], got \[2\]"):
        A.rloo_advantages(torch.zeros(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="group_ids: expected an integer tensor"):
        A.grpo_advantages(torch.zeros(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"mask: expected shape \[N, T\]"):
        A.reinforce_pp_baseline_advantages(torch.zeros(3), torch.tensor([0, 0, 1]), torch.ones(2, 4))
