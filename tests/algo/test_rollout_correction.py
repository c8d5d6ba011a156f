import math

import pytest
import torch

from prorl_megatron.algo.rollout_correction import logprob_mismatch, tis_weights


def test_mismatch_over_valid_tokens_only():
    rollout = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    train = torch.tensor([[-1.1, -2.0, -5.0], [-0.5, -0.7, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    m = logprob_mismatch(rollout, train, mask)
    assert m["mismatch_mean"] == pytest.approx((0.1 + 0 + 0 + 0.2) / 4, rel=1e-5)
    assert m["mismatch_max"] == pytest.approx(0.2, rel=1e-5)
    assert logprob_mismatch(rollout, rollout.bfloat16(), mask)["mismatch_max"] < 0.05


def test_tis_weights_are_truncated_ratios():
    old = torch.tensor([[-1.0, -1.0, 0.0, -50.0]])
    rollout = torch.tensor([[-1.0, -2.0, -5.0, 0.0]])
    w = tis_weights(old, rollout, torch.tensor([[1, 1, 1, 0]]), cap=2.0)
    assert w.tolist()[0][0] == pytest.approx(1.0)
    assert w.tolist()[0][1] == pytest.approx(2.0)  # e^1 = 2.718 truncated to 2
    assert w.tolist()[0][2] == pytest.approx(2.0)
    assert w.tolist()[0][3] == 0.0  # masked
    small = tis_weights(torch.tensor([[-3.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1), cap=2.0)
    assert small.item() == pytest.approx(math.exp(-2.0))
    leaf = old.clone().requires_grad_(True)
    assert not tis_weights(leaf, rollout, torch.ones(1, 4), 2.0).requires_grad
    with pytest.raises(ValueError, match="cap: expected a value > 0, got 0"):
        tis_weights(old, rollout, torch.ones(1, 4), cap=0)
