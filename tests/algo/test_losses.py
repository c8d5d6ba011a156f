import math

import pytest
import torch

from prorl_megatron.algo import losses as L
from tests.algo import reference as ref

MODES = list(L.AGGREGATIONS)


def random_tokens(seed: int, n: int = 6, t: int = 7, gap: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g) * 3
    old = logp + gap * torch.randn(n, t, generator=g)
    adv = torch.randn(n, t, generator=g)
    mask = torch.rand(n, t, generator=g) > 0.25
    mask[1] = False  # fully masked row
    return logp, old, adv, mask


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_kl_penalty_matches_loop_reference(estimator):
    logp, refp, _, _ = random_tokens(0, gap=2.0)
    got = L.kl_penalty(logp, refp, estimator)
    want = [[ref.kl(a, b, estimator) for a, b in zip(ra, rb)] for ra, rb in zip(logp.tolist(), refp.tolist())]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_kl_k3_clamps_huge_gaps():
    logp = torch.tensor([[0.0, -100.0, -1e4, 0.0]])
    refp = torch.tensor([[-100.0, 0.0, 0.0, -1e4]])
    k3 = L.kl_penalty(logp, refp, "k3")
    assert torch.isfinite(k3).all()
    # ref - logp = -100 -> d clamped to -20 -> exp(-20) + 19 -> clamped to 10
    assert k3.tolist()[0] == [10.0, 10.0, 10.0, 10.0]
    small = L.kl_penalty(torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), "k3")
    assert math.isclose(small.item(), math.exp(-0.5) + 0.5 - 1.0, rel_tol=1e-6)
    assert torch.equal(L.kl_penalty(logp, logp, "k3"), torch.zeros_like(logp))


def nemo_rl_calculate_kl(logprobs, ref, kl_type, input_clamp, output_clamp):
    """NeMo-RL's nemo_rl/algorithms/utils.py calculate_kl, restated: the reference to match."""
    logr = ref - logprobs
    if input_clamp is not None:
        logr = logr.clamp(min=-input_clamp, max=input_clamp)
    kl = {"k1": -logr, "k2": logr.square() / 2, "k3": logr.exp() - 1 - logr}[kl_type]
    return kl if output_clamp is None else kl.clamp(min=-output_clamp, max=output_clamp)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamps", [(20.0, 10.0), (5.0, None), (None, 3.0)])
def test_kl_clamps_as_nemo_rl_when_the_recipe_asks(estimator, clamps):
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 6, generator=g) * 4
    ref = logp + torch.tensor([-40.0, -25.0, -2.0, 0.0, 2.0, 30.0]) * torch.rand(3, 6, generator=g)
    got = L.kl_penalty(logp, ref, estimator, *clamps)
    defaults = L.DEFAULT_KL_CLAMPS[estimator]  # what a null in the recipe means (k3: 20 and 10)
    expected = [c if c is not None else d for c, d in zip(clamps, defaults)]
    assert torch.allclose(got, nemo_rl_calculate_kl(logp, ref, estimator, *expected), atol=1e-6, rtol=1e-6)
    if estimator == "k2":  # unclamped, a 30-nat gap is worth 450; the v2 recipe's 20 / 10 caps it at 10
        huge = torch.tensor([[-31.0]]), torch.tensor([[-1.0]])
        assert L.kl_penalty(*huge, "k2").item() == 450.0 and L.kl_penalty(*huge, "k2", 20.0, 10.0).item() == 10.0
    loss, _, kl, _ = L.policy_kl_loss(logp, logp, ref, torch.ones(3, 6), torch.ones(3, 6), kl_coef=0.5,
                                      kl_estimator=estimator, kl_input_clamp=clamps[0], kl_output_clamp=clamps[1])
    assert torch.allclose(kl, got.mean()) and torch.allclose(loss, 0.5 * got.mean() - 1.0)


def test_k3_keeps_its_own_clamps_when_the_recipe_sets_none():
    logp, ref = torch.full((1, 3), -1.0), torch.tensor([[-200.0, -1.5, 60.0]])
    assert torch.equal(L.kl_penalty(logp, ref, "k3"), L.kl_penalty(logp, ref, "k3", 20.0, 10.0))
    assert torch.equal(L.kl_penalty(logp, ref, "k2"), nemo_rl_calculate_kl(logp, ref, "k2", None, None))


def test_kl_errors():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; valid: k1, abs, k2, k3"):
        L.kl_penalty(torch.zeros(2, 2), torch.zeros(2, 2), "k4")
    with pytest.raises(ValueError, match=r"ref_logprobs: expected shape \[N, T\] like logprobs = \[2, 2\], got \[2, 3\]"):
        L.kl_penalty(torch.zeros(2, 2), torch.zeros(2, 3), "k3")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_aggregate_matches_loop_reference(mode, seed):
    values, _, _, mask = random_tokens(seed)
    got = L.aggregate(values, mask, mode)
    want = ref.aggregate(values.tolist(), mask.int().tolist(), mode)
    assert math.isclose(got.item(), want, rel_tol=1e-5, abs_tol=1e-6)


def test_aggregate_hand_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert L.aggregate(values, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert L.aggregate(values, mask, "token-sum").item() == pytest.approx(7.0)
    assert L.aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    assert L.aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert L.aggregate(values, mask, "seq-mean-token-sum-norm").item() == pytest.approx(3.5 / 3)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_all_masked_is_zero_with_finite_grad(mode):
    values = torch.randn(3, 4, requires_grad=True)
    out = L.aggregate(values, torch.zeros(3, 4, dtype=torch.bool), mode)
    out.backward()
    assert out.item() == 0.0
    assert torch.isfinite(values.grad).all() and (values.grad == 0).all()


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown aggregation 'seq-mean'; valid: token-mean"):
        L.aggregate(torch.zeros(2, 2), torch.ones(2, 2), "seq-mean")
    with pytest.raises(ValueError, match=r"mask: expected shape \[N, T\] = \[2, 2\], got \[2\]"):
        L.aggregate(torch.zeros(2, 2), torch.ones(2), "token-mean")
    with pytest.raises(ValueError, match=r"values: expected shape \[N, T\], got \[4\]"):
        L.aggregate(torch.zeros(4), torch.ones(4), "token-mean")


@pytest.mark.parametrize("dual_clip_c", [3.0, None])
@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_policy_loss_matches_loop_reference(seed, agg, dual_clip_c):
    logp, old, adv, mask = random_tokens(seed, gap=1.0)
    loss, metrics = L.policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.4, dual_clip_c=dual_clip_c, agg=agg)
    per_token = [
        [ref.policy_token_loss(a, b, c, 0.2, 0.4, dual_clip_c) for a, b, c in zip(ra, rb, rc)]
        for ra, rb, rc in zip(logp.tolist(), old.tolist(), adv.tolist())
    ]
    want = ref.aggregate(per_token, mask.int().tolist(), agg)
    assert math.isclose(loss.item(), want, rel_tol=1e-5, abs_tol=1e-6)

    # metrics from a loop over the valid tokens
    valid = [(i, j) for i in range(logp.shape[0]) for j in range(logp.shape[1]) if mask[i, j]]
    ratios = {(i, j): math.exp(logp[i, j].item() - old[i, j].item()) for i, j in valid}
    high = sum(1 for i, j in valid if adv[i, j] > 0 and ratios[i, j] > 1.4) / len(valid)
    low = sum(1 for i, j in valid if adv[i, j] < 0 and ratios[i, j] < 0.8) / len(valid)
    dual = 0.0
    if dual_clip_c is not None:
        dual = sum(1 for i, j in valid if adv[i, j] < 0 and ratios[i, j] > dual_clip_c) / len(valid)
    kl = sum(r - 1 - math.log(r) for r in ratios.values()) / len(valid)
    assert metrics["clip_frac_high"] == pytest.approx(high)
    assert metrics["clip_frac_low"] == pytest.approx(low)
    assert metrics["clip_frac"] == pytest.approx(high + low)
    assert metrics["dual_clip_frac"] == pytest.approx(dual)
    assert metrics["approx_kl"] == pytest.approx(kl, rel=1e-4)
    assert metrics["ratio_max"] == pytest.approx(max(ratios.values()), rel=1e-5)
    assert all(isinstance(v, float) for v in metrics.values())


def test_policy_loss_on_policy_is_minus_mean_advantage():
    logp, _, adv, mask = random_tokens(4)
    loss, metrics = L.policy_loss(logp, logp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-(adv[mask].mean().item()), rel=1e-5)
    assert metrics["clip_frac"] == 0.0 and metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_hand_values_and_clipping():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 5.0]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, -1.0, -1.0]])
    loss, m = L.policy_loss(logp, old, adv, torch.ones(1, 4), agg="token-sum")
    # A>0, r=1.5: min-objective clipped at 1.4 -> -1.4
    # A<0, r=1.5: max(1.5, 1.4) = 1.5
    # A<0, r=0.5: max(0.5, 0.8) = 0.8 (lower clip active)
    # A<0, r=5.0: max(5, 1.4)=5 -> dual clip min(5, 3) = 3
    assert loss.item() == pytest.approx(-1.4 + 1.5 + 0.8 + 3.0, rel=1e-5)
    assert m["clip_frac"] == pytest.approx(0.5)
    assert m["clip_frac_high"] == pytest.approx(0.25)
    assert m["clip_frac_low"] == pytest.approx(0.25)
    assert m["dual_clip_frac"] == pytest.approx(0.25)


def test_policy_loss_gradients_match_analytic():
    logp, old, adv, mask = random_tokens(7, gap=0.5)
    logp = logp.clone().requires_grad_(True)
    loss, _ = L.policy_loss(logp, old, adv, mask, dual_clip_c=3.0)
    loss.backward()
    n_valid = mask.sum().item()
    expected = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            if not mask[i, j]:
                continue
            r = math.exp(logp[i, j].item() - old[i, j].item())
            a = adv[i, j].item()
            unclipped, clipped = -a * r, -a * min(max(r, 0.8), 1.4)
            in_range = 0.8 <= r <= 1.4
            if a < 0 and max(unclipped, clipped) > -a * 3.0:
                continue  # dual clip: constant -A c, no gradient
            if clipped > unclipped and not in_range:
                continue  # clipped branch active: constant, no gradient
            expected[i, j] = -a * r / n_valid  # d(-A r)/dlogp = -A r, token-mean
    torch.testing.assert_close(logp.grad, expected, rtol=1e-4, atol=1e-7)


def test_policy_loss_huge_gaps_stay_finite():
    logp = torch.tensor([[0.0, -500.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-500.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, metrics = L.policy_loss(logp, old, adv, torch.ones(1, 3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)  # clamp at 20


def test_policy_loss_bf16_inputs():
    logp, old, adv, mask = random_tokens(2)
    leaf = logp.bfloat16().requires_grad_(True)
    loss, _ = L.policy_loss(leaf, old.bfloat16(), adv.bfloat16(), mask)
    loss.backward()
    assert loss.dtype == torch.float32 and leaf.grad.dtype == torch.bfloat16
    want, _ = L.policy_loss(leaf.detach().float(), old.bfloat16().float(), adv.bfloat16().float(), mask)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_policy_loss_no_grad_into_old_or_advantages():
    logp, old, adv, mask = random_tokens(5)
    old.requires_grad_(True)
    adv.requires_grad_(True)
    loss, _ = L.policy_loss(logp.requires_grad_(True), old, adv, mask)
    loss.backward()
    assert old.grad is None and adv.grad is None and logp.grad is not None


def test_policy_loss_argument_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages: expected shape \[N, T\] like logprobs = \[2, 3\], got \[2\]"):
        L.policy_loss(x, x, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"eps_low: expected a value in \[0, 1\), got 1.5"):
        L.policy_loss(x, x, x, torch.ones(2, 3), eps_low=1.5)
    with pytest.raises(ValueError, match="dual_clip_c: expected a value > 1 or None, got 0.5"):
        L.policy_loss(x, x, x, torch.ones(2, 3), dual_clip_c=0.5)
    with pytest.raises(ValueError, match="agg: unknown aggregation 'mean'"):
        L.policy_loss(x, x, x, torch.ones(2, 3), agg="mean")


# ---- importance weights (truncated IS): a per-token multiplier, not a mask ----------------


def random_weights(seed: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.rand(shape, generator=g) * 2.5  # TIS weights in [0, cap=2.5)


@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_policy_loss_is_weights_multiply_the_token_loss(seed, agg):
    """agg over the 0/1 mask of w * l: token-mean = sum(m w l) / sum(m), not / sum(m w)."""
    logp, old, adv, mask = random_tokens(seed)
    w = random_weights(seed, logp.shape)
    loss, metrics = L.policy_loss(logp, old, adv, mask, agg=agg, is_weights=w)
    per_token = [
        [wt * ref.policy_token_loss(a, b, c, 0.2, 0.4, 3.0) for a, b, c, wt in zip(ra, rb, rc, rw)]
        for ra, rb, rc, rw in zip(logp.tolist(), old.tolist(), adv.tolist(), w.tolist())
    ]
    assert loss.item() == pytest.approx(ref.aggregate(per_token, mask.int().tolist(), agg), rel=1e-5, abs=1e-6)
    _, unweighted_metrics = L.policy_loss(logp, old, adv, mask, agg=agg)
    assert metrics == unweighted_metrics  # clip fractions and ratios count tokens, unweighted


def test_policy_loss_is_weights_token_mean_hand_values():
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 2.0, 4.0]])
    w = torch.tensor([[0.5, 2.0, 9.0]])
    loss, _ = L.policy_loss(old.clone(), old, adv, torch.tensor([[1, 1, 0]]), is_weights=w)
    assert loss.item() == pytest.approx(-(0.5 * 1.0 + 2.0 * 2.0) / 2)  # / 2 tokens, not / (0.5 + 2)


@pytest.mark.parametrize("agg", MODES)
def test_policy_loss_unit_is_weights_equal_no_weights(agg):
    logp, old, adv, mask = random_tokens(3)
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    loss_a, metrics_a = L.policy_loss(a, old, adv, mask, agg=agg)
    loss_b, metrics_b = L.policy_loss(b, old, adv, mask, agg=agg, is_weights=torch.ones_like(logp))
    (loss_a + loss_b).backward()
    assert loss_a.item() == loss_b.item() and metrics_a == metrics_b
    assert torch.equal(a.grad, b.grad)


def test_policy_loss_is_weights_scale_the_gradient_and_get_none():
    logp, old, adv, mask = random_tokens(8, gap=0.5)
    w = random_weights(8, logp.shape).requires_grad_(True)
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    L.policy_loss(a, old, adv, mask)[0].backward()
    L.policy_loss(b, old, adv, mask, is_weights=w)[0].backward()
    torch.testing.assert_close(b.grad, a.grad * w.detach(), rtol=1e-5, atol=1e-8)
    assert w.grad is None
    with pytest.raises(ValueError, match=r"is_weights: expected shape \[N, T\] like logprobs"):
        L.policy_loss(logp, old, adv, mask, is_weights=torch.ones(2))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("agg", MODES)
def test_policy_kl_loss_weights_the_policy_term_only(agg, estimator):
    """loss = agg(m, w l_pg) + beta agg(m, kl): the KL term ignores the importance weights."""
    logp, old, adv, mask = random_tokens(5)
    g = torch.Generator().manual_seed(9)
    ref_lp = logp + 0.3 * torch.randn(logp.shape, generator=g)
    w = random_weights(5, logp.shape)
    beta = 0.25
    loss, pg, kl, metrics = L.policy_kl_loss(logp, old, ref_lp, adv, mask, kl_coef=beta, kl_estimator=estimator,
                                             is_weights=w, agg=agg)
    m = mask.int().tolist()
    want_pg = ref.aggregate([[wt * ref.policy_token_loss(a, b, c, 0.2, 0.4, 3.0)
                              for a, b, c, wt in zip(ra, rb, rc, rw)]
                             for ra, rb, rc, rw in zip(logp.tolist(), old.tolist(), adv.tolist(), w.tolist())], m, agg)
    want_kl = ref.aggregate(L.kl_penalty(logp, ref_lp, estimator).tolist(), m, agg)
    assert pg.item() == pytest.approx(want_pg, rel=1e-5, abs=1e-6)
    assert kl.item() == pytest.approx(want_kl, rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(want_pg + beta * want_kl, rel=1e-5, abs=1e-6)
    _, _, kl_unweighted, _ = L.policy_kl_loss(logp, old, ref_lp, adv, mask, kl_coef=beta, kl_estimator=estimator,
                                              agg=agg)
    assert kl.item() == kl_unweighted.item()
    assert set(metrics) >= {"clip_frac", "ratio_mean"}
    with pytest.raises(ValueError, match="kl_coef: expected a value >= 0"):
        L.policy_kl_loss(logp, old, ref_lp, adv, mask, kl_coef=-1.0)
