"""Rollouts -> training tensors, the DP training plan, and exact loss aggregation over shards."""

from pathlib import Path

import pytest
import torch

from prorl_megatron.algo import aggregate
from prorl_megatron.config import Recipe
from prorl_megatron.collect import shard_bounds
from prorl_megatron.rollout.batch import Sample, make_batch, response_values, training_plan
from prorl_megatron.train import aggregation_share


def sample(prompt, response, group=0, reward=1.0):
    return Sample(list(prompt), list(response), [-0.1 * (i + 1) for i in range(len(response))], reward,
                  truncated=False, domain="math", group=group)


def test_make_batch_pads_and_indexes_response_tokens():
    batch = make_batch([sample([5, 6, 7], [8, 9]), sample([5], [3, 4, 2, 1], group=1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 3, 4, 2, 1]]
    assert batch["mask"].tolist() == [[True, True, False, False], [True, True, True, True]]
    # position p of the per-position logprobs scores token p + 1
    per_position = torch.arange(4).float().expand(2, 4) * 10  # [B, S-1]
    got = response_values(per_position, batch["response_index"])
    assert got[0, :2].tolist() == [20.0, 30.0]  # tokens 8, 9 sit at positions 3, 4 -> scored at 2, 3
    assert got[1].tolist() == [0.0, 10.0, 20.0, 30.0]
    assert torch.allclose(batch["rollout_logprobs"][0], torch.tensor([-0.1, -0.2, 0.0, 0.0]))
    assert batch["group_ids"].tolist() == [0, 1]


def test_rows_trims_padding_and_keeps_indices_valid():
    batch = make_batch([sample([1, 2, 3, 4, 5, 6], [7]), sample([1], [2, 3])], pad_id=0)
    part = batch.rows([1])
    assert part["input_ids"].tolist() == [[1, 2, 3]]
    assert part["mask"].tolist() == [[True, True]]
    assert int(part["response_index"].max()) <= part["input_ids"].shape[1] - 2


def test_even_split_and_plan_cover_every_row_once():
    assert [list(range(7))[slice(*shard_bounds(7, 3, i))] for i in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    groups = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    plans = [training_plan(groups, mini_batch_groups=2, dp_size=2, dp_rank=r, micro_batch_size=3) for r in (0, 1)]
    assert [m.rows for m in plans[0]] == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]]
    assert [m.micro for m in plans[0]] == [[[0, 1, 2], [3]], [[8, 9]]]
    assert [m.micro for m in plans[1]] == [[[4, 5, 6], [7]], [[10, 11]]]


def test_sharded_losses_add_up_to_the_mini_batch_loss():
    """Per-micro-batch losses x share x (micro-batches x DP) / (micro-batches x DP) == the whole loss."""
    torch.manual_seed(0)
    values = torch.randn(10, 6)
    mask = torch.rand(10, 6) > 0.3
    mask[3] = False  # an empty row
    shards = [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]  # e.g. 2 DP ranks x 2 micro-batches
    for agg in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean"):
        recipe = Recipe()
        recipe.algo.loss_agg = agg
        total = sum(aggregate(values[s], mask[s], agg) * aggregation_share(recipe, mask[s], mask) for s in shards)
        assert torch.allclose(total, aggregate(values, mask, agg), atol=1e-6), agg


def test_length_penalty_shapes_the_kept_rewards_in_its_on_steps():
    from prorl_megatron.config import load_recipe
    from prorl_megatron.train import shape_rewards

    v2_recipe = Path(__file__).resolve().parents[2] / "recipes/prorl_v2_1p5b.yaml"

    cfg = load_recipe(v2_recipe, ["rollout.max_response_tokens=100",
                                                    "rewards.length_penalty.on_steps=2",
                                                    "rewards.length_penalty.off_steps=3"])
    fresh = lambda: [sample([1], [2] * 50, reward=1.0), sample([1], [2] * 100, reward=1.0),  # noqa: E731
                     sample([1], [2] * 50, reward=0.0)]
    samples = fresh()
    m = shape_rewards(cfg, samples, step=2)  # steps 1, 2 on; 3, 4, 5 off; 6, 7 on
    assert [s.reward for s in samples] == pytest.approx([0.75, 0.5, 0.0])
    assert [s.info["verifier_reward"] for s in samples] == [1.0, 1.0, 0.0]
    assert m == {"length_penalty/active": 1.0, "reward/shaped_mean": pytest.approx(1.25 / 3)}
    samples = fresh()
    assert shape_rewards(cfg, samples, step=4)["length_penalty/active"] == 0.0
    assert [s.reward for s in samples] == [1.0, 1.0, 0.0] and "verifier_reward" not in samples[0].info
    off = load_recipe(v2_recipe, ["rewards.length_penalty.kind=none"])
    assert shape_rewards(off, fresh(), step=2) == {}
