"""Policy-gradient loss, KL estimators and loss aggregation (pure torch, float32 math).

Shapes: N sequences, T response tokens; ``mask`` bool/float [N, T] marks the tokens that
count (float masks act as 0/1 weights). Logprobs are those of the sampling distribution,
i.e. ``log_softmax(logits / temperature)`` at the rollout temperature.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from prorl_megatron.algo._checks import as_float32, check_ndim, check_shape, mask_as_float

_LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps the ratio finite for huge logprob gaps
_K3_CLAMP = 10.0


def _kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _kl_abs(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.abs()


def _kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    d = -log_ratio  # ref - logp
    return torch.exp(d) - d - 1.0


# Schulman's estimators of KL(pi || ref) from samples of pi (http://joschu.net/blog/kl-approx.html).
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": _kl_k1,  # logp - ref: unbiased, high variance, can be negative
    "abs": _kl_abs,  # |logp - ref|
    "k2": _kl_k2,  # 0.5 (logp - ref)^2: biased, low variance
    "k3": _kl_k3,  # exp(ref - logp) - (ref - logp) - 1: unbiased, non-negative (GRPO's choice)
}


# (input, output) clamps each estimator gets when the recipe sets none: k3's exp needs them
# (NeMo-RL's calculate_kl defaults, 20 and 10); the others are bounded by the logprobs themselves
DEFAULT_KL_CLAMPS: dict[str, tuple[Optional[float], Optional[float]]] = {
    "k1": (None, None), "abs": (None, None), "k2": (None, None), "k3": (_LOG_RATIO_CLAMP, _K3_CLAMP),
}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str,
               input_clamp: Optional[float] = None, output_clamp: Optional[float] = None) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate, clamped as NeMo-RL's ``calculate_kl`` does.

    Args:
        logprobs: [N, T] policy logprobs of the sampled tokens.
        ref_logprobs: [N, T] reference logprobs of the same tokens.
        estimator: ``k1`` | ``abs`` | ``k2`` | ``k3`` (see ``KL_ESTIMATORS``).
        input_clamp: ``ref - logp`` is clamped to ``[-input_clamp, input_clamp]`` first;
        output_clamp: the estimate to ``[-output_clamp, output_clamp]`` after. None: the
            estimator's default (:data:`DEFAULT_KL_CLAMPS`: k3 20 and 10, the others none).
    Returns:
        float32 [N, T] (no masking: aggregate with :func:`aggregate`).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator: unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    check_ndim("logprobs", logprobs, 2, "[N, T]")
    check_shape("ref_logprobs", ref_logprobs, tuple(logprobs.shape), "[N, T] like logprobs")
    default_in, default_out = DEFAULT_KL_CLAMPS[estimator]
    input_clamp = default_in if input_clamp is None else input_clamp
    output_clamp = default_out if output_clamp is None else output_clamp
    log_ratio = as_float32("logprobs", logprobs) - as_float32("ref_logprobs", ref_logprobs)
    if input_clamp is not None:
        log_ratio = log_ratio.clamp(-input_clamp, input_clamp)
    kl = KL_ESTIMATORS[estimator](log_ratio)
    return kl if output_clamp is None else kl.clamp(-output_clamp, output_clamp)


def _masked_row_stats(values: torch.Tensor, mask: torch.Tensor):
    row_sum = (values * mask).sum(dim=-1)  # [N]
    row_count = mask.sum(dim=-1)  # [N]
    return row_sum, row_count


def _mean_over_nonempty_rows(per_row: torch.Tensor, row_count: torch.Tensor) -> torch.Tensor:
    nonempty = (row_count > 0).to(per_row.dtype)
    return (per_row * nonempty).sum() / nonempty.sum().clamp_min(1.0)


def _agg_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total = mask.sum()
    safe = torch.where(total > 0, total, torch.ones_like(total))  # 0 valid tokens -> loss 0
    return (values * mask).sum() / safe


def _agg_token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def _agg_seq_mean_token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    row_sum, row_count = _masked_row_stats(values, mask)
    return _mean_over_nonempty_rows(row_sum, row_count)


def _agg_seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    row_sum, row_count = _masked_row_stats(values, mask)
    return _mean_over_nonempty_rows(row_sum / row_count.clamp_min(1e-8), row_count)


def _agg_seq_mean_token_sum_norm(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _agg_seq_mean_token_sum(values, mask) / values.shape[-1]


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token-mean": _agg_token_mean,  # DAPO/ProRL: every token weighs the same
    "token-sum": _agg_token_sum,
    "seq-mean-token-sum": _agg_seq_mean_token_sum,
    "seq-mean-token-mean": _agg_seq_mean_token_mean,  # original GRPO: every sequence weighs the same
    "seq-mean-token-sum-norm": _agg_seq_mean_token_sum_norm,  # Dr. GRPO: divided by T
}


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce per-token ``values`` [N, T] over the valid tokens of ``mask`` to a scalar.

    Modes: ``token-mean`` (sum / number of valid tokens), ``token-sum``,
    ``seq-mean-token-sum`` (mean over sequences of per-sequence sums),
    ``seq-mean-token-mean`` (mean over sequences of per-sequence means),
    ``seq-mean-token-sum-norm`` (seq-mean-token-sum / T). The seq-mean modes ignore
    fully-masked rows; with no valid token at all every mode returns 0.

    Returns:
        float32 scalar tensor (differentiable).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode: unknown aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")
    check_ndim("values", values, 2, "[N, T]")
    m = mask_as_float(mask, tuple(values.shape))
    return AGGREGATIONS[mode](as_float32("values", values), m)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.4,
    dual_clip_c: Optional[float] = 3.0,
    agg: str = "token-mean",
    is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with decoupled clip range (DAPO) and dual clip (Ye et al., 2020).

    Per token, with ``r = exp(clamp(logp - old, -20, 20))``::

        l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
        l = min(l, -A c)            where A < 0 (dual clip; dual_clip_c=None disables)
        l = w l                     with importance weights w (``is_weights``)

    then aggregated over ``mask`` by ``agg`` (see :func:`aggregate`). Gradients flow into
    ``logprobs`` only; ``old_logprobs``, ``advantages`` and ``is_weights`` are constants.

    Importance weights (truncated IS of the rollout/train mismatch, see
    :func:`~prorl_megatron.algo.rollout_correction.tis_weights`) multiply the per-token loss
    and are *not* a mask: the normaliser stays that of the 0/1 ``mask`` (token-mean is
    ``sum(m w l) / sum(m)``, as verl's ``pg_losses * rollout_is_weights`` then ``agg_loss``
    over the response mask), so the correction is not self-normalised. A KL penalty added
    to this loss is not weighted by them.

    Args:
        logprobs: [N, T] current policy logprobs of the sampled tokens.
        old_logprobs: [N, T] logprobs under the policy that generated the batch.
        advantages: [N, T] token advantages.
        mask: bool/float [N, T].
        is_weights: optional float [N, T] per-token multipliers of the loss (None: all 1).
    Returns:
        ``(loss, metrics)``: loss is a float32 scalar; metrics (Python floats, each a
        fraction or mean over valid tokens): ``clip_frac`` (tokens whose clipped term is
        active), ``clip_frac_high`` (A > 0 and r > 1 + eps_high), ``clip_frac_low``
        (A < 0 and r < 1 - eps_low), ``dual_clip_frac``, ``approx_kl`` (KL(old || new)
        estimated as mean of (r - 1) - log r), ``ratio_mean``, ``ratio_max``.
        Reading the metrics synchronises a GPU with the host once.
    """
    check_ndim("logprobs", logprobs, 2, "[N, T]")
    shape = tuple(logprobs.shape)
    check_shape("old_logprobs", old_logprobs, shape, "[N, T] like logprobs")
    check_shape("advantages", advantages, shape, "[N, T] like logprobs")
    if is_weights is not None:
        check_shape("is_weights", is_weights, shape, "[N, T] like logprobs")
    m = mask_as_float(mask, shape)
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low: expected a value in [0, 1), got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"eps_high: expected a value >= 0, got {eps_high}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c: expected a value > 1 or None, got {dual_clip_c}")
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg: unknown aggregation {agg!r}; valid: {', '.join(AGGREGATIONS)}")

    logp = as_float32("logprobs", logprobs)
    old = as_float32("old_logprobs", old_logprobs).detach()
    adv = as_float32("advantages", advantages).detach()

    log_ratio = (logp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # [N, T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip_c is not None:
        bound = -adv * dual_clip_c
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
    else:
        dual_active = torch.zeros_like(adv, dtype=torch.bool)
    if is_weights is not None:
        per_token = per_token * as_float32("is_weights", is_weights).detach()
    loss = AGGREGATIONS[agg](per_token, m)

    with torch.no_grad():
        valid = m > 0
        r = ratio.detach()
        stats = torch.stack(
            [
                valid.sum().float(),
                ((clipped > unclipped) & valid).sum().float(),
                ((adv > 0) & (r > 1.0 + eps_high) & valid).sum().float(),
                ((adv < 0) & (r < 1.0 - eps_low) & valid).sum().float(),
                (dual_active & valid).sum().float(),
                (((r - 1.0) - log_ratio.detach()) * valid).sum(),
                (r * valid).sum(),
                torch.where(valid, r, torch.zeros_like(r)).amax() if r.numel() else r.new_zeros(()),
            ]
        )
        n_valid, n_clip, n_high, n_low, n_dual, kl_sum, ratio_sum, ratio_max = stats.tolist()  # one sync
        n_valid = max(n_valid, 1.0)
        metrics = {
            "clip_frac": n_clip / n_valid,
            "clip_frac_high": n_high / n_valid,
            "clip_frac_low": n_low / n_valid,
            "dual_clip_frac": n_dual / n_valid,
            "approx_kl": kl_sum / n_valid,
            "ratio_mean": ratio_sum / n_valid,
            "ratio_max": ratio_max,
        }
    return loss, metrics


def policy_kl_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k3",
    is_weights: Optional[torch.Tensor] = None,
    eps_low: float = 0.2,
    eps_high: float = 0.4,
    dual_clip_c: Optional[float] = 3.0,
    agg: str = "token-mean",
    kl_input_clamp: Optional[float] = None,
    kl_output_clamp: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """The update's whole objective: ``pg + kl_coef * kl``.

    ``pg`` is :func:`policy_loss` (with the importance weights ``is_weights`` multiplying its
    per-token loss); ``kl`` is ``aggregate(kl_penalty(logprobs, ref_logprobs), mask, agg)``,
    *not* weighted: the KL penalty regularises the policy being trained and does not
    estimate an expectation under the rollout engine's distribution (as verl's ``kl_loss``).
    ``kl_input_clamp``/``kl_output_clamp``: :func:`kl_penalty`'s clamps.

    Returns:
        ``(loss, pg, kl, metrics)``: three float32 scalars and :func:`policy_loss`'s metrics.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef: expected a value >= 0, got {kl_coef}")
    pg, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                              dual_clip_c=dual_clip_c, agg=agg, is_weights=is_weights)
    kl = aggregate(kl_penalty(logprobs, ref_logprobs, kl_estimator, kl_input_clamp, kl_output_clamp), mask, agg)
    return pg + kl_coef * kl, pg, kl, metrics
