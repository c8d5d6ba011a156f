"""Dynamic sampling (DAPO) and the unbiased pass@k estimator (Chen et al., 2021)."""

from __future__ import annotations

import numbers

import torch

from prorl_megatron.algo._checks import as_float32, check_group_ids, check_ndim


def keep_informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dynamic-sampling filter: which sequences belong to a group that carries signal.

    A group whose rewards are all equal (all right or all wrong) has zero GRPO advantage
    everywhere and only dilutes the batch; DAPO drops it and samples more prompts.
    Singleton groups are all-equal by definition and are dropped too.

    Args:
        rewards: [N]; group_ids: int64 [N].
    Returns:
        bool [N]: False for every member of an all-equal group.
    """
    check_ndim("rewards", rewards, 1, "[N]")
    r = as_float32("rewards", rewards)
    inverse = check_group_ids(group_ids, r.shape[0])
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=r.device)
    num_groups = int(inverse.max().item()) + 1
    group_max = torch.full((num_groups,), float("-inf"), device=r.device).scatter_reduce(
        0, inverse, r, reduce="amax"
    )
    group_min = torch.full((num_groups,), float("inf"), device=r.device).scatter_reduce(
        0, inverse, r, reduce="amin"
    )
    return (group_max > group_min)[inverse]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k).

    Computed as ``1 - prod_{i=n-c+1..n} (1 - k / i)`` (Codex paper), which avoids huge
    binomials and is exact to float64 rounding for n in the thousands.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"n: expected n >= 1 samples, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c: expected 0 <= c <= n = {n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= n = {n}, got {k}")
    if n - c < k:
        return 1.0
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure
