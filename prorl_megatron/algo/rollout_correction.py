"""The gap between the rollout engine's logprobs and the trainer's, and its correction.

Both sides compute logprobs of the same sampled tokens under the same sampling distribution,
but with different kernels (vLLM vs Megatron), so they differ slightly — or a lot, when
something is wrong (stale weights, a temperature applied on one side only). The gap is
measured every step and optionally corrected by importance weights on the per-token
policy-gradient loss, with the token ratio ``r_t = exp(logp_train_old - logp_rollout)``:

- ``token_tis``: truncated IS (TIS, Yao et al., 2025), ``w_t = min(r_t, C)``;
- ``icepop``: token-level masking (IcePop, as in NVIDIA NeMo-RL's ProRL v2 recipe),
  ``w_t = r_t 1[low <= r_t <= high]``;
- ``seq_mask_tis``: sequence-level masking (as NeMo-RL's ProRL v2.1 recipe), a sequence whose
  geometric-mean ratio leaves ``[low, high]`` is dropped whole, the others keep raw ``r_t``.

Each is one function in :data:`CORRECTIONS`; :func:`correction_weights` picks one by name.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from prorl_megatron.algo._checks import as_float32, check_ndim, check_shape, mask_as_float


def logprob_mismatch(rollout_logprobs: torch.Tensor, train_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """Mean and max of |logp_rollout - logp_train| over the valid tokens of ``mask`` [N, T]."""
    check_ndim("rollout_logprobs", rollout_logprobs, 2, "[N, T]")
    shape = tuple(rollout_logprobs.shape)
    check_shape("train_logprobs", train_logprobs, shape, "[N, T] like rollout_logprobs")
    m = mask_as_float(mask, shape)
    gap = (as_float32("rollout_logprobs", rollout_logprobs) - as_float32("train_logprobs", train_logprobs)).abs()
    gap = gap.detach() * m
    n = m.sum().clamp_min(1.0)
    stats = torch.stack([gap.sum() / n, gap.max() if gap.numel() else gap.new_zeros(())]).tolist()
    return {"mismatch_mean": stats[0], "mismatch_max": stats[1]}


def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                cap: float) -> torch.Tensor:
    """Truncated importance weights [N, T]: ``min(exp(old - rollout), cap)``, 0 outside ``mask``.

    No gradient flows through them. ``cap`` > 0 (C in the TIS paper; 2 is common). They
    multiply the per-token policy-gradient loss (``policy_loss(..., is_weights=w)``), which
    is still aggregated over the 0/1 mask: they are not a mask (that would self-normalise
    token-mean by ``sum(w)``) and they do not weight the KL penalty.
    """
    if not cap > 0:
        raise ValueError(f"cap: expected a value > 0, got {cap}")
    check_ndim("old_logprobs", old_logprobs, 2, "[N, T]")
    shape = tuple(old_logprobs.shape)
    check_shape("rollout_logprobs", rollout_logprobs, shape, "[N, T] like old_logprobs")
    m = mask_as_float(mask, shape)
    log_ratio = (as_float32("old_logprobs", old_logprobs) - as_float32("rollout_logprobs", rollout_logprobs))
    return torch.exp(log_ratio.detach().clamp(max=20.0)).clamp(max=cap) * m


def _token_log_ratio(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log r, m)``: detached float32 ``old - rollout`` [N, T], clamped to [-20, 20]
    (exp stays finite), and the float 0/1 mask [N, T]."""
    check_ndim("old_logprobs", old_logprobs, 2, "[N, T]")
    shape = tuple(old_logprobs.shape)
    check_shape("rollout_logprobs", rollout_logprobs, shape, "[N, T] like old_logprobs")
    m = mask_as_float(mask, shape)
    log_ratio = as_float32("old_logprobs", old_logprobs) - as_float32("rollout_logprobs", rollout_logprobs)
    return log_ratio.detach().clamp(-20.0, 20.0), m


def _check_band(low: float, high: float) -> None:
    if not (0.0 <= low <= high and high > 0.0):
        raise ValueError(f"low, high: expected 0 <= low <= high and high > 0, got low={low}, high={high}")


def _fraction(outside: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float32 scalar: ``sum(outside & valid) / sum(valid)`` (0 with nothing valid)."""
    valid = valid.float()
    return (outside.float() * valid).sum() / valid.sum().clamp_min(1.0)


def icepop_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                   low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """IcePop: token ratios outside ``[low, high]`` are masked out, the rest kept as they are.

    Per token, with ``r_t = exp(clamp(old_t - rollout_t, -20, 20))``::

        w_t = r_t * 1[low <= r_t <= high] * m_t

    (NeMo-RL ``ClippedPGLossFn``, ``truncated_importance_sampling_type: icepop``: the kept
    weights are the raw ratios, not truncated; ProRL v2 uses ``[0.5, 5]``.)

    Args:
        old_logprobs: [N, T] trainer logprobs of the sampled tokens before the update.
        rollout_logprobs: [N, T] the rollout engine's logprobs of the same tokens.
        mask: bool/float [N, T], the tokens that count.
        low, high: the band, ``0 <= low <= high``, ``high > 0``.
    Returns:
        ``(weights, masked_frac)``: float32 [N, T] (no gradient; 0 outside ``mask``) and a
        float32 scalar, the fraction of valid tokens masked out.
    """
    _check_band(low, high)
    log_ratio, m = _token_log_ratio(old_logprobs, rollout_logprobs, mask)
    ratio = torch.exp(log_ratio)  # [N, T]
    kept = (ratio >= low) & (ratio <= high)
    return ratio * kept * m, _fraction(~kept, m > 0)


def seq_mask_tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                         low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-masked TIS: a sequence whose geometric-mean ratio leaves ``[low, high]`` is
    masked out entirely; the tokens of the others keep their raw (untruncated) ratios.

    With ``log r_t = clamp(old_t - rollout_t, -20, 20)`` and the valid tokens ``m`` of row i::

        g_i  = exp( sum_t m_it log r_it / sum_t m_it )      (geometric mean; 1 for an empty row)
        w_it = r_it * 1[low <= g_i <= high] * m_it

    (NeMo-RL ``ClippedPGLossFn``, ``truncated_importance_sampling_type: seq-mask-tis``;
    ProRL v2.1 uses ``[0.999, 1.002]``.)

    Args:
        as :func:`icepop_weights`.
    Returns:
        ``(weights, masked_frac)``: float32 [N, T] (no gradient) and a float32 scalar, the
        fraction of sequences with at least one valid token that are masked out.
    """
    _check_band(low, high)
    log_ratio, m = _token_log_ratio(old_logprobs, rollout_logprobs, mask)
    count = m.sum(dim=-1)  # [N]
    geo = torch.exp((log_ratio * m).sum(dim=-1) / count.clamp_min(1.0))  # [N]
    kept = (geo >= low) & (geo <= high)  # [N]
    return torch.exp(log_ratio) * kept[:, None] * m, _fraction(~kept, count > 0)


def _token_tis(old_logprobs, rollout_logprobs, mask, *, cap: float, **_):
    log_ratio, m = _token_log_ratio(old_logprobs, rollout_logprobs, mask)
    weights = tis_weights(old_logprobs, rollout_logprobs, mask, cap)
    return weights, _fraction(log_ratio > math.log(cap), m > 0)


def _icepop(old_logprobs, rollout_logprobs, mask, *, low: float, high: float, **_):
    return icepop_weights(old_logprobs, rollout_logprobs, mask, low, high)


def _seq_mask_tis(old_logprobs, rollout_logprobs, mask, *, low: float, high: float, **_):
    return seq_mask_tis_weights(old_logprobs, rollout_logprobs, mask, low, high)


# name -> (old, rollout, mask, *, cap, low, high) -> (weights [N, T], outside-band fraction)
CORRECTIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "token_tis": _token_tis,  # TIS: min(r, cap); fraction = tokens truncated
    "icepop": _icepop,  # r 1[low <= r <= high]; fraction = tokens masked
    "seq_mask_tis": _seq_mask_tis,  # r 1[low <= geomean_i <= high]; fraction = sequences masked
}


def correction_weights(name: str, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                       mask: torch.Tensor, *, cap: float | None = None, low: float | None = None,
                       high: float | None = None) -> tuple[torch.Tensor, float]:
    """Importance weights [N, T] of the correction ``name`` and its outside-band fraction.

    ``token_tis`` takes ``cap``; ``icepop`` and ``seq_mask_tis`` take ``low`` and ``high``.
    The fraction (a Python float: one host sync) is NeMo-RL's ``is_oob_ratio``: of tokens
    truncated (token_tis), of tokens masked (icepop), of sequences masked (seq_mask_tis).
    """
    if name not in CORRECTIONS:
        raise ValueError(f"correction: unknown rollout correction {name!r}; valid: {', '.join(CORRECTIONS)}")
    needs = ("cap",) if name == "token_tis" else ("low", "high")
    given = {"cap": cap, "low": low, "high": high}
    missing = [k for k in needs if given[k] is None]
    if missing:
        raise ValueError(f"{name}: needs {', '.join(missing)}")
    weights, frac = CORRECTIONS[name](old_logprobs, rollout_logprobs, mask, **given)
    return weights, float(frac)
