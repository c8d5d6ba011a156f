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


# --------------------------------------------------------------------------------------
# IcePop and sequence-masked TIS (NeMo-RL's "icepop" / "seq-mask-tis"), against plain loops
# --------------------------------------------------------------------------------------

from prorl_megatron.algo import losses as L  # noqa: E402
from prorl_megatron.algo.rollout_correction import (  # noqa: E402
    CORRECTIONS, correction_weights, icepop_weights, seq_mask_tis_weights,
)


def random_pair(seed: int, n: int = 6, t: int = 9, gap: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g) * 3
    rollout = old + (torch.rand(n, t, generator=g) - 0.5) * 2 * gap
    mask = torch.rand(n, t, generator=g) > 0.25
    mask[0] = False  # an empty row
    mask[1, 0] = True
    return old, rollout, mask


def loop_icepop(old, rollout, mask, low, high):
    w, out_count, valid = [], 0, 0
    for o_row, r_row, m_row in zip(old.tolist(), rollout.tolist(), mask.tolist()):
        row = []
        for o, r, m in zip(o_row, r_row, m_row):
            ratio = math.exp(o - r)
            inside = low <= ratio <= high
            row.append(ratio if (m and inside) else 0.0)
            valid += bool(m)
            out_count += bool(m) and not inside
        w.append(row)
    return w, out_count / max(valid, 1)


def loop_seq_mask_tis(old, rollout, mask, low, high):
    w, masked, rows = [], 0, 0
    for o_row, r_row, m_row in zip(old.tolist(), rollout.tolist(), mask.tolist()):
        logs = [o - r for o, r, m in zip(o_row, r_row, m_row) if m]
        geo = math.exp(sum(logs) / len(logs)) if logs else 1.0
        keep = low <= geo <= high
        rows += bool(logs)
        masked += bool(logs) and not keep
        w.append([math.exp(o - r) if (m and keep) else 0.0 for o, r, m in zip(o_row, r_row, m_row)])
    return w, masked / max(rows, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_icepop_matches_loop(seed):
    old, rollout, mask = random_pair(seed)
    w, frac = icepop_weights(old, rollout, mask, 0.7, 1.4)
    ref_w, ref_frac = loop_icepop(old, rollout, mask, 0.7, 1.4)
    torch.testing.assert_close(w, torch.tensor(ref_w), rtol=1e-5, atol=1e-6)
    assert float(frac) == pytest.approx(ref_frac)
    assert 0.0 < ref_frac < 1.0  # both kept and masked tokens occur
    assert not w.requires_grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seq_mask_tis_matches_loop(seed):
    old, rollout, mask = random_pair(seed, gap=0.3)
    w, frac = seq_mask_tis_weights(old, rollout, mask, 0.95, 1.05)
    ref_w, ref_frac = loop_seq_mask_tis(old, rollout, mask, 0.95, 1.05)
    torch.testing.assert_close(w, torch.tensor(ref_w), rtol=1e-5, atol=1e-6)
    assert float(frac) == pytest.approx(ref_frac)
    kept_rows = (w.sum(1) > 0).sum().item()
    assert 0 < kept_rows < mask.any(1).sum().item()  # both kept and masked sequences occur


def test_seq_mask_tis_uses_the_geometric_mean_and_raw_token_ratios():
    # row 0: log ratios +ln3, -ln3 -> geometric mean 1 (kept) though each token is far from 1;
    # row 1: +0.1, +0.1 -> 1.105 (masked by the band [0.95, 1.05]); the padding token is ignored
    old = torch.tensor([[math.log(3.0), -math.log(3.0), 0.0], [0.1, 0.1, 9.0]])
    rollout = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    w, frac = seq_mask_tis_weights(old, rollout, mask, 0.95, 1.05)
    torch.testing.assert_close(w, torch.tensor([[3.0, 1 / 3, 0.0], [0.0, 0.0, 0.0]]))
    assert float(frac) == 0.5
    # icepop on the same tokens: only the row-1 tokens (1.105) are inside [0.5, 2]
    w2, frac2 = icepop_weights(old, rollout, mask, 0.5, 2.0)
    torch.testing.assert_close(w2, torch.tensor([[0.0, 0.0, 0.0], [math.exp(0.1), math.exp(0.1), 0.0]]))
    assert float(frac2) == 0.5


def test_correction_registry_and_errors():
    old, rollout, mask = random_pair(3)
    w, frac = correction_weights("token_tis", old, rollout, mask, cap=1.2)
    torch.testing.assert_close(w, tis_weights(old, rollout, mask, 1.2))
    log_r = (old - rollout)[mask]
    assert frac == pytest.approx(float((log_r > math.log(1.2)).float().mean()))
    for name in ("icepop", "seq_mask_tis"):
        w, frac = correction_weights(name, old, rollout, mask, low=0.9, high=1.1)
        torch.testing.assert_close(w, CORRECTIONS[name](old, rollout, mask, low=0.9, high=1.1)[0])
        assert isinstance(frac, float)
    with pytest.raises(ValueError, match="unknown rollout correction 'pop'; valid: token_tis, icepop, seq_mask_tis"):
        correction_weights("pop", old, rollout, mask)
    with pytest.raises(ValueError, match="icepop: needs low, high"):
        correction_weights("icepop", old, rollout, mask, cap=2.0)
    with pytest.raises(ValueError, match="expected 0 <= low <= high"):
        icepop_weights(old, rollout, mask, 2.0, 1.0)


@pytest.mark.parametrize("name", ["icepop", "seq_mask_tis"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_masked_tokens_get_no_policy_gradient_and_kept_ones_are_weighted(name, kl_coef):
    """Through policy_kl_loss: a masked token's gradient is the KL term's alone (0 with
    kl_coef=0); a kept token's is the unweighted loss's pg gradient times its ratio, plus KL."""
    old, rollout, mask = random_pair(7, gap=0.3)
    low, high = (0.8, 1.25) if name == "icepop" else (0.97, 1.03)
    w, _ = correction_weights(name, old, rollout, mask, low=low, high=high)
    g = torch.Generator().manual_seed(11)
    adv = torch.randn(mask.shape, generator=g)
    ref_lp = old + 0.1 * torch.randn(mask.shape, generator=g)
    logp0 = old + 0.05 * torch.randn(mask.shape, generator=g)  # near old: some tokens clip, most do not

    def grad(weights, coef):
        logp = logp0.clone().requires_grad_(True)
        loss, *_ = L.policy_kl_loss(logp, old, ref_lp, adv, mask, kl_coef=coef, kl_estimator="k2",
                                    is_weights=weights, eps_low=0.2, eps_high=0.27, dual_clip_c=None)
        loss.backward()
        return logp.grad

    full = grad(w, kl_coef)
    pg_unweighted = grad(None, 0.0)
    kl_only = full - grad(w, 0.0)  # the KL term's part (not weighted by the correction)
    masked = mask & (w == 0)
    kept = mask & (w > 0)
    assert masked.any() and kept.any()
    torch.testing.assert_close(full[masked], kl_only[masked])
    if kl_coef == 0.0:
        assert torch.all(full[masked] == 0)
    torch.testing.assert_close(full[kept], (pg_unweighted * w)[kept] + kl_only[kept], rtol=1e-5, atol=1e-7)
    assert torch.all(full[~mask] == 0)
