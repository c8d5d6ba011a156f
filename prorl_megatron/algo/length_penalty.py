"""ProRL v2's scheduled cosine length penalty on sequence rewards (pure torch).

ProRL v2 (NVIDIA blog "Scaling LLM Reinforcement Learning with Prolonged Training Using
ProRL v2", 2025) promotes concise outputs with a cosine function of the response length L
against the length limit L_max, between reward boundaries, and *cycles it on and off* ("for
example, 100 updates on, 500 off"). The blog's formula is an image; the form here is the
cosine length reward of Yeo et al. (2025, "Demystifying Long Chain-of-Thought Reasoning") as
implemented in NVIDIA research's verl ``LengthPenalty`` (``length_penalty_type: cosine``):
the reward of a correct (wrong) response is replaced by a value interpolated along a half
cosine from its value at length 0 to its value at L_max.

Shapes: N sequences. All arithmetic is float32.
"""

from __future__ import annotations

import math

import torch

from prorl_megatron.algo._checks import as_float32, check_ndim, check_shape


def cosine_length_rewards(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    max_length: int,
    *,
    correct: tuple[float, float] = (1.0, 0.5),
    wrong: tuple[float, float] = (0.0, 0.0),
    threshold: float = 0.5,
) -> torch.Tensor:
    """Cosine length-shaped rewards.

    With ``x = clamp(L / L_max, 0, 1)`` and ``(v0, v1)`` = ``correct`` where ``r > threshold``,
    else ``wrong``::

        r' = v1 + 0.5 (v0 - v1) (1 + cos(pi x))

    so ``r' = v0`` at L = 0 and ``v1`` at L >= L_max. ``correct = (1, 0.5)`` lets a correct
    answer lose up to half its reward as it grows to the limit; ``wrong = (0, 0)`` leaves
    wrong answers at 0 (Yeo et al. use ``wrong = (-10, 0)``: short wrong answers cost more).

    Args:
        rewards: [N] verifier rewards (only compared with ``threshold``).
        lengths: [N] response lengths in tokens.
        max_length: L_max > 0, the response-length limit.
    Returns:
        float32 [N].
    """
    check_ndim("rewards", rewards, 1, "[N]")
    check_shape("lengths", lengths, tuple(rewards.shape), "[N] like rewards")
    if max_length <= 0:
        raise ValueError(f"max_length: expected a value > 0, got {max_length}")
    r = as_float32("rewards", rewards).detach()
    x = (lengths.detach().to(torch.float32) / float(max_length)).clamp(0.0, 1.0)
    is_correct = r > threshold
    v0 = torch.where(is_correct, torch.tensor(float(correct[0])), torch.tensor(float(wrong[0])))
    v1 = torch.where(is_correct, torch.tensor(float(correct[1])), torch.tensor(float(wrong[1])))
    return v1 + 0.5 * (v0 - v1) * (1.0 + torch.cos(math.pi * x))


def length_penalty_active(step: int, *, on_steps: int, off_steps: int, start_step: int = 0) -> bool:
    """Whether the penalty applies at ``step``: from ``start_step`` on, cycles of ``on_steps``
    steps on then ``off_steps`` off (``off_steps = 0``: always on after ``start_step``)."""
    if on_steps < 1 or off_steps < 0:
        raise ValueError(f"on_steps, off_steps: expected >= 1 and >= 0, got {on_steps}, {off_steps}")
    if step < start_step:
        return False
    return (step - start_step) % (on_steps + off_steps) < on_steps


def scheduled_cosine_length_rewards(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    max_length: int,
    step: int,
    *,
    on_steps: int,
    off_steps: int,
    start_step: int = 0,
    correct: tuple[float, float] = (1.0, 0.5),
    wrong: tuple[float, float] = (0.0, 0.0),
    threshold: float = 0.5,
) -> tuple[torch.Tensor, bool]:
    """:func:`cosine_length_rewards` at the steps :func:`length_penalty_active` selects, the
    rewards unchanged (as float32) at the others. Returns ``(rewards [N], active)``."""
    active = length_penalty_active(step, on_steps=on_steps, off_steps=off_steps, start_step=start_step)
    if not active:
        check_ndim("rewards", rewards, 1, "[N]")
        return as_float32("rewards", rewards).detach().clone(), False
    return cosine_length_rewards(rewards, lengths, max_length, correct=correct, wrong=wrong,
                                 threshold=threshold), True
