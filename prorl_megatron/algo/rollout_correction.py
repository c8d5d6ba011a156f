"""The gap between the rollout engine's logprobs and the trainer's, and its correction.

Both sides compute logprobs of the same sampled tokens under the same sampling distribution,
but with different kernels (vLLM vs Megatron), so they differ slightly — or a lot, when
something is wrong (stale weights, a temperature applied on one side only). The gap is
measured every step; truncated importance sampling (TIS, Yao et al., 2025) optionally
multiplies each token's policy-gradient loss by ``min(exp(logp_train_old - logp_rollout), C)``.
"""

from __future__ import annotations

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
