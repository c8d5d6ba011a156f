"""A run that watches its own health: per-step checks on the step's metrics, each with an action.

Long RL runs fail slowly: the policy's entropy collapses, it drifts away from the reference or
from the policy that sampled its batch, the engine's logprobs part from the trainer's, responses
run into the length limit, the reward falls to zero everywhere, a loss turns NaN. Each check
below compares one metric of the completed step with a threshold from the recipe's ``health:``
section (off while the threshold is null) and raises an :class:`Alarm` once the metric has been
beyond it for ``window`` consecutive steps:

- ``entropy_floor``: ``entropy`` (mean per response token) below the threshold: collapse;
- ``kl_ref_ceiling``: ``kl_ref`` (KL to the reference) above it;
- ``approx_kl_ceiling``: ``approx_kl`` (to the policy that sampled the batch) above it;
- ``mismatch_ceiling``: ``mismatch_mean`` (train/rollout logprob mismatch) above it. A fixed
  ceiling, not a multiple of a running median: the mismatch of a healthy run is ~0 in float32
  and noise-sized in bf16, where a ratio to a near-zero median trips on noise; a ceiling means
  the same thing in every run and is set from the precision's expected level;
- ``truncated_ceiling``: ``response_length/truncated_frac`` above it;
- ``reward_floor``: ``reward/mean`` and every ``reward/mean/<domain>`` at or below it (0: the
  reward has collapsed to 0 in every domain);

and ``nonfinite``: any NaN or infinite number among the step's metrics (no threshold, no window).

A step that lacks a check's metric (no update when dynamic sampling kept no group), or has it as
NaN (the ``nonfinite`` check's business), neither extends nor breaks that check's streak. A check
that fired starts counting afresh. The actions (``warn``, ``reset``, ``stop``, ``rollback``) are
the training loop's to carry out; this module only decides, from plain numbers, like
:class:`~prorl_megatron.algo.reset.ResetScheduler`, and resumes via ``state_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

ACTIONS = ("warn", "reset", "next_stage", "stop", "rollback")

# check -> (metric, how a value is bad given the threshold, the words for it)
CHECKS: dict[str, tuple[str, Any, str]] = {
    "entropy_floor": ("entropy", lambda v, t: v < t, "<"),
    "kl_ref_ceiling": ("kl_ref", lambda v, t: v > t, ">"),
    "approx_kl_ceiling": ("approx_kl", lambda v, t: v > t, ">"),
    "mismatch_ceiling": ("mismatch_mean", lambda v, t: v > t, ">"),
    "truncated_ceiling": ("response_length/truncated_frac", lambda v, t: v > t, ">"),
    "reward_floor": ("reward/mean", lambda v, t: v <= t, "<="),  # and every reward/mean/<domain>
}
NONFINITE = "nonfinite"
_STATE_KEYS = ("last_step", "streaks")


@dataclass(frozen=True)
class Limit:
    """One threshold check's setting (the recipe's ``health.<check>`` has the same fields)."""

    threshold: Optional[float]  # None: the check is off
    window: int = 1  # consecutive bad steps before the alarm
    action: str = "warn"


@dataclass(frozen=True)
class Alarm:
    """A tripped check after step ``step``: what to do (``action``) and why (``message``)."""

    step: int
    check: str
    action: str  # one of ACTIONS
    message: str
    since: int  # the first step of the streak that tripped it: a rollback goes back before it

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "action": self.action, "message": self.message, "since": self.since}


class HealthWatcher:
    """Decides alarms from per-step metrics; resumable via ``state_dict``.

    ``limits``: check name (a key of :data:`CHECKS`) -> :class:`Limit` (or any object with its
    fields); those with a None threshold are off. ``nonfinite``: the action on non-finite
    metrics, None: off. Steps are the 1-based indices of completed steps and must increase
    (after :meth:`load_state_dict`, from the loaded state's step on).
    """

    def __init__(self, nonfinite: Optional[str] = None, **limits: Any) -> None:
        unknown = sorted(set(limits) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown health checks {unknown}; valid: {', '.join(CHECKS)}")
        if nonfinite is not None and nonfinite not in ACTIONS:
            raise ValueError(f"nonfinite: action must be one of {ACTIONS} or None, got {nonfinite!r}")
        self.limits: dict[str, Limit] = {}
        for name, limit in limits.items():
            if limit is None or limit.threshold is None:
                continue
            if limit.window < 1 or limit.action not in ACTIONS or not math.isfinite(limit.threshold):
                raise ValueError(f"{name}: need a finite threshold, window >= 1 and an action in {ACTIONS}, "
                                 f"got {limit}")
            self.limits[name] = Limit(float(limit.threshold), int(limit.window), limit.action)
        self.nonfinite = nonfinite
        self.last_step = 0
        self.streaks: dict[str, list[int]] = {name: [0, 0] for name in self.limits}  # [length, first step]

    @property
    def enabled(self) -> bool:
        return bool(self.limits) or self.nonfinite is not None

    def observe(self, step: int, metrics: Mapping[str, Any]) -> list[Alarm]:
        """Record the metrics of completed step ``step``; return the alarms it raises (in the
        order of :data:`CHECKS`, ``nonfinite`` first)."""
        if step <= self.last_step:
            raise ValueError(f"step: expected a step after {self.last_step}, got {step}")
        self.last_step = step
        alarms = []
        if self.nonfinite is not None:
            bad = sorted(k for k, v in metrics.items() if _is_number(v) and not math.isfinite(v))
            if bad:
                shown = ", ".join(f"{k}={metrics[k]}" for k in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5
                                                                          else "")
                alarms.append(Alarm(step, NONFINITE, self.nonfinite, f"non-finite metrics: {shown}", step))
        for name, limit in self.limits.items():
            metric, is_bad, words = CHECKS[name]
            keys = [metric] + (sorted(k for k in metrics if k.startswith("reward/mean/")) if name == "reward_floor"
                               else [])
            values = [metrics.get(k) for k in keys]
            if not all(_is_number(v) and not math.isnan(v) for v in values):
                continue  # missing or NaN: no evidence either way
            streak = self.streaks[name]
            if all(is_bad(float(v), limit.threshold) for v in values):
                streak[:] = [streak[0] + 1, streak[1] if streak[0] else step]
            else:
                streak[:] = [0, 0]
            if streak[0] >= limit.window:
                shown = ", ".join(f"{k} {float(v):.4g}" for k, v in zip(keys, values))
                run = f" for {streak[0]} consecutive steps (since step {streak[1]})" if limit.window > 1 else ""
                alarms.append(Alarm(step, name, limit.action, f"{shown} {words} {limit.threshold:g}{run}", streak[1]))
                streak[:] = [0, 0]
        return alarms

    def state_dict(self) -> dict[str, Any]:
        """The streaks (plain Python values); the thresholds come from the recipe."""
        return {"last_step": self.last_step, "streaks": {k: list(v) for k, v in self.streaks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore streaks saved by :meth:`state_dict`; a check the recipe turned on since starts
        at 0, one it turned off is forgotten."""
        missing = [key for key in _STATE_KEYS if key not in state]
        unexpected = [key for key in state if key not in _STATE_KEYS]
        if missing or unexpected:
            raise ValueError(f"state: missing keys {missing}, unexpected keys {unexpected}")
        self.last_step = int(state["last_step"])
        saved = state["streaks"]
        self.streaks = {name: list(saved.get(name, [0, 0])) for name in self.limits}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
