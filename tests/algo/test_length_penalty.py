import math

import pytest
import torch

from prorl_megatron.algo.length_penalty import (
    cosine_length_rewards, length_penalty_active, scheduled_cosine_length_rewards,
)


def loop_cosine(rewards, lengths, max_length, correct, wrong, threshold):
    out = []
    for r, n in zip(rewards, lengths):
        v0, v1 = correct if r > threshold else wrong
        x = min(max(n / max_length, 0.0), 1.0)
        out.append(v1 + 0.5 * (v0 - v1) * (1 + math.cos(math.pi * x)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_length_rewards_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(40, generator=g) > 0.5).float() * torch.rand(40, generator=g).round()
    lengths = torch.randint(0, 1200, (40,), generator=g)  # some beyond the limit
    correct, wrong = (2.0, 1.0), (-10.0, 0.0)  # Yeo et al.'s values
    got = cosine_length_rewards(rewards, lengths, 1000, correct=correct, wrong=wrong, threshold=0.5)
    want = loop_cosine(rewards.tolist(), lengths.tolist(), 1000, correct, wrong, 0.5)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32


def test_cosine_length_rewards_hand_values():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    lengths = torch.tensor([0, 500, 1000, 5000, 0, 1000])
    got = cosine_length_rewards(rewards, lengths, 1000, correct=(1.0, 0.5), wrong=(-1.0, 0.0))
    torch.testing.assert_close(got, torch.tensor([1.0, 0.75, 0.5, 0.5, -1.0, 0.0]))
    with pytest.raises(ValueError, match="max_length: expected a value > 0"):
        cosine_length_rewards(rewards, lengths, 0)
    with pytest.raises(ValueError, match="lengths: expected shape"):
        cosine_length_rewards(rewards, lengths[:3], 10)


def test_schedule_cycles_on_and_off():
    on = [s for s in range(1, 1400) if length_penalty_active(s, on_steps=100, off_steps=500, start_step=1)]
    assert on == list(range(1, 101)) + list(range(601, 701)) + list(range(1201, 1301))
    assert all(length_penalty_active(s, on_steps=5, off_steps=0, start_step=3) == (s >= 3) for s in range(10))
    with pytest.raises(ValueError):
        length_penalty_active(1, on_steps=0, off_steps=5)


def test_scheduled_rewards_unchanged_when_off():
    rewards, lengths = torch.tensor([1.0, 0.0]), torch.tensor([800, 10])
    off, active = scheduled_cosine_length_rewards(rewards, lengths, 1000, 150, on_steps=100, off_steps=500,
                                                  start_step=1)
    assert not active and off.tolist() == [1.0, 0.0]
    on, active = scheduled_cosine_length_rewards(rewards, lengths, 1000, 50, on_steps=100, off_steps=500,
                                                 start_step=1)
    assert active
    torch.testing.assert_close(on, cosine_length_rewards(rewards, lengths, 1000))
