"""When to hard-reset the reference policy (and the optimizer state) to the current policy.

ProRL keeps a KL penalty to a reference policy, and when the penalty starts to dominate or
validation stalls, it replaces the reference by the current policy and restarts the
optimizer ("reference policy reset"). This module only decides *when*; the training loop
does the copy. Triggers (any combination, each optional):

- periodic: ``every_n_steps`` steps since the previous reset;
- KL: the mean KL to the reference (``metrics["kl"]``) above ``kl_threshold`` for
  ``kl_window`` consecutive steps;
- plateau: the validation reward (``metrics["val_reward"]``, present on evaluation steps)
  not above the best so far by more than ``plateau_delta`` for ``plateau_window``
  consecutive evaluations;
- entropy floor: the policy's mean token entropy (``metrics["entropy"]``) below
  ``entropy_floor`` for ``entropy_window`` consecutive steps (a step without it, e.g. no
  update, breaks the streak) — the sign of a collapsing policy;

and ``min_gap_steps`` holds every trigger back until that many steps have passed since the
previous reset (a held-back trigger stays armed and fires as soon as the gap allows).
The same triggers decide when a staged run enters its next stage (``prorl_megatron/stages.py``),
counting from ``start_step``, the step the current stage was entered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class ResetEvent:
    """A decided reset: after step ``step``, for ``reason`` (from the ``triggers`` that fired)."""

    step: int
    reason: str
    triggers: tuple[str, ...]  # subset of ("periodic", "kl", "plateau", "entropy")


_STATE_KEYS = ("last_step", "last_reset_step", "kl_streak", "best_val", "stale_evals", "num_resets",
               "entropy_streak")
_OPTIONAL_KEYS = {"entropy_streak": 0}  # absent from the state of checkpoints older than the trigger


class ResetScheduler:
    """Decides reference resets from per-step metrics; resumable via ``state_dict``.

    Steps are the 1-based indices of completed training steps and must increase.
    """

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        kl_threshold: Optional[float] = None,
        kl_window: int = 1,
        plateau_window: Optional[int] = None,
        plateau_delta: float = 0.0,
        min_gap_steps: int = 0,
        kl_key: str = "kl",
        val_key: str = "val_reward",
        entropy_floor: Optional[float] = None,
        entropy_window: int = 1,
        entropy_key: str = "entropy",
        start_step: int = 0,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected >= 1 or None, got {every_n_steps}")
        if kl_threshold is not None and not kl_threshold > 0:
            raise ValueError(f"kl_threshold: expected > 0 or None, got {kl_threshold}")
        if kl_window < 1:
            raise ValueError(f"kl_window: expected >= 1, got {kl_window}")
        if plateau_window is not None and plateau_window < 1:
            raise ValueError(f"plateau_window: expected >= 1 or None, got {plateau_window}")
        if entropy_window < 1:
            raise ValueError(f"entropy_window: expected >= 1, got {entropy_window}")
        if min_gap_steps < 0:
            raise ValueError(f"min_gap_steps: expected >= 0, got {min_gap_steps}")
        self.every_n_steps = every_n_steps
        self.kl_threshold = kl_threshold
        self.kl_window = kl_window
        self.plateau_window = plateau_window
        self.plateau_delta = plateau_delta
        self.min_gap_steps = min_gap_steps
        self.kl_key = kl_key
        self.val_key = val_key
        self.entropy_floor = entropy_floor
        self.entropy_window = entropy_window
        self.entropy_key = entropy_key
        self.last_step = start_step
        self.last_reset_step = start_step
        self.entropy_streak = 0
        self.kl_streak = 0
        self.best_val: Optional[float] = None
        self.stale_evals = 0
        self.num_resets = 0

    def observe(self, step: int, metrics: Mapping[str, float]) -> Optional[ResetEvent]:
        """Record the metrics of completed step ``step``; return a reset to do now, or None."""
        if step <= self.last_step:
            raise ValueError(f"step: expected a step after {self.last_step}, got {step}")
        self.last_step = step
        fired: list[tuple[str, str]] = []

        since = step - self.last_reset_step
        if self.every_n_steps is not None and since >= self.every_n_steps:
            fired.append(("periodic", f"every {self.every_n_steps} steps ({since} since the last reset)"))

        if self.kl_threshold is not None:
            if self.kl_key not in metrics:
                raise ValueError(f"metrics: the KL trigger needs {self.kl_key!r}; got keys {sorted(metrics)}")
            kl = float(metrics[self.kl_key])
            self.kl_streak = self.kl_streak + 1 if kl > self.kl_threshold else 0  # NaN breaks a streak
            if self.kl_streak >= self.kl_window:
                fired.append(
                    ("kl", f"KL to the reference {kl:.4g} > {self.kl_threshold:g} "
                           f"for {self.kl_streak} consecutive steps")
                )

        if self.plateau_window is not None and self.val_key in metrics:
            val = float(metrics[self.val_key])
            if self.best_val is None or (math.isfinite(val) and val > self.best_val + self.plateau_delta):
                self.best_val = val if math.isfinite(val) else self.best_val
                self.stale_evals = 0
            else:
                self.stale_evals += 1
            if self.stale_evals >= self.plateau_window:
                fired.append(
                    ("plateau", f"validation reward {val:.4g} not above the best {self.best_val:.4g} "
                                f"by > {self.plateau_delta:g} for {self.stale_evals} evaluations")
                )

        if self.entropy_floor is not None:
            entropy = float(metrics.get(self.entropy_key, math.nan))
            self.entropy_streak = self.entropy_streak + 1 if entropy < self.entropy_floor else 0  # NaN breaks it
            if self.entropy_streak >= self.entropy_window:
                fired.append(
                    ("entropy", f"entropy {entropy:.4g} < {self.entropy_floor:g} "
                                f"for {self.entropy_streak} consecutive steps")
                )

        if not fired or since < self.min_gap_steps:
            return None
        self.restart(step)
        self.num_resets += 1
        return ResetEvent(step=step, reason="; ".join(text for _, text in fired),
                          triggers=tuple(name for name, _ in fired))

    def restart(self, step: int) -> None:
        """A reset after ``step`` (decided here, or elsewhere: a stage change resets the reference
        too): the periodic count, the streaks and the plateau's stale count start again."""
        self.last_reset_step = step
        self.kl_streak = 0
        self.stale_evals = 0
        self.entropy_streak = 0

    def state_dict(self) -> dict[str, Any]:
        """The counters that decide future resets (plain Python values)."""
        return {key: getattr(self, key) for key in _STATE_KEYS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters saved by :meth:`state_dict` (trigger settings come from the recipe)."""
        state = {**_OPTIONAL_KEYS, **state}
        missing = [key for key in _STATE_KEYS if key not in state]
        unexpected = [key for key in state if key not in _STATE_KEYS]
        if missing or unexpected:
            raise ValueError(f"state: missing keys {missing}, unexpected keys {unexpected}")
        for key in _STATE_KEYS:
            setattr(self, key, state[key])
