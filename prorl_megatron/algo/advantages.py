"""Advantage estimators for group-sampled RL (one pure function each).

Shapes: N sequences, T response tokens; ``group_ids`` int64 [N] holds one id per prompt
(the n samples of a prompt share it). All arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

from prorl_megatron.algo._checks import as_float32, check_group_ids, check_ndim, group_sums, mask_as_float


def _group_mean_and_count(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-sequence group mean [N], group size [N] and the dense group index [N]."""
    inverse = check_group_ids(group_ids, rewards.shape[0])
    sums, counts = group_sums(rewards, inverse)
    return (sums / counts)[inverse], counts[inverse], inverse


def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al., 2024, DeepSeekMath).

    ``(r - mean_group) / (std_group + eps)`` with Bessel-corrected std; with
    ``scale_by_std=False`` just ``r - mean_group`` (Dr. GRPO, Liu et al., 2025).
    Groups of size 1 get 0.

    Args:
        rewards: [N] scalar reward per sequence.
        group_ids: int64 [N], the prompt each sequence answers.
    Returns:
        float32 [N].
    """
    check_ndim("rewards", rewards, 1, "[N]")
    r = as_float32("rewards", rewards)
    mean, count, inverse = _group_mean_and_count(r, group_ids)
    centered = r - mean
    if not scale_by_std:
        return torch.where(count > 1, centered, torch.zeros_like(centered))
    sq_sums, _ = group_sums(centered * centered, inverse)
    std = torch.sqrt(sq_sums[inverse] / (count - 1).clamp_min(1.0))  # [N]
    return torch.where(count > 1, centered / (std + eps), torch.zeros_like(centered))


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al., 2024): r minus the mean of the others.

    Groups of size 1 keep r unchanged (there is no other member to form a baseline).

    Args:
        rewards: [N]; group_ids: int64 [N].
    Returns:
        float32 [N].
    """
    check_ndim("rewards", rewards, 1, "[N]")
    r = as_float32("rewards", rewards)
    mean, count, _ = _group_mean_and_count(r, group_ids)
    others_mean = (mean * count - r) / (count - 1).clamp_min(1.0)
    return torch.where(count > 1, r - others_mean, r)


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++ with a group baseline (Hu et al., 2025), as in ProRL v2.

    Subtract the group mean (size-1 groups: mean 0), broadcast over the sequence's valid
    tokens, then whiten over all valid tokens of the batch: ``(x - mean) / sqrt(var + eps)``
    with the unbiased masked variance. Zero outside the mask.

    Args:
        rewards: [N]; group_ids: int64 [N]; mask: bool/float [N, T].
    Returns:
        float32 [N, T].
    """
    check_ndim("rewards", rewards, 1, "[N]")
    check_ndim("mask", mask, 2, "[N, T]")
    if mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask: expected shape [N, T] with N = {rewards.shape[0]}, got {list(mask.shape)}")
    r = as_float32("rewards", rewards)
    m = mask_as_float(mask, tuple(mask.shape))
    mean, count, _ = _group_mean_and_count(r, group_ids)
    x = torch.where(count > 1, r - mean, r)[:, None] * m  # [N, T]
    n_valid = m.sum()
    batch_mean = x.sum() / n_valid.clamp_min(1.0)
    centered = (x - batch_mean) * m
    var = (centered * centered).sum() / (n_valid - 1.0).clamp_min(1.0)
    return centered * torch.rsqrt(var + eps)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}
_TOKEN_LEVEL = {"reinforce_pp_baseline"}  # these take the mask and return [N, T]


def compute_advantages(
    name: str, rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Run the estimator ``name`` and return token-level advantages, float32 [N, T].

    Sequence-level estimators are broadcast over the valid tokens of ``mask`` [N, T].
    Extra keyword arguments go to the estimator (e.g. ``scale_by_std`` for GRPO).
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r} unknown; valid: {', '.join(ADVANTAGE_ESTIMATORS)}")
    check_ndim("mask", mask, 2, "[N, T]")
    if name in _TOKEN_LEVEL:
        return ADVANTAGE_ESTIMATORS[name](rewards, group_ids, mask, **kwargs)
    per_sequence = ADVANTAGE_ESTIMATORS[name](rewards, group_ids, **kwargs)  # [N]
    return per_sequence[:, None] * mask_as_float(mask, (rewards.shape[0], mask.shape[1]))
