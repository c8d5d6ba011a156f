"""When a run intervenes: one trigger type for scheduled resets, stage entries and health checks.

ProRL hard-resets the reference policy (and the optimizer) when the KL penalty starts to
dominate or validation stalls, moves to its next stage (8k, then 16k responses) after a while
or on such signals, and a long run should also notice its own failures (entropy collapse, a
runaway KL, rewards at zero). Each of these is a :class:`Trigger` over the metrics of completed
steps, built from one :class:`TriggerSpec`; it fires when any of its conditions holds:

- ``after_steps``: that many steps since its clock started (for resets: the last reset; for a
  stage: the step the previous stage was entered);
- a :class:`Threshold`: a metric beyond a bound for ``window`` consecutive steps. A step without
  the metric (no update when dynamic sampling kept no group), or with it NaN, neither extends nor
  breaks the streak: there is no evidence either way (non-finite values are the health watch's
  ``nonfinite`` check's business);
- ``plateau_window``: the validation reward (``plateau_metric``, present on evaluation steps
  only) not above the best so far by more than ``plateau_delta`` for that many consecutive
  evaluations;

and ``min_steps`` holds every condition back until that many steps have passed since the clock
started (a held-back condition stays armed and fires as soon as the gap allows). A trigger that
fires starts counting afresh (:meth:`Trigger.restart`: the clock, every streak, the plateau's
stale count), as it does after a reset decided elsewhere. This module only decides, from plain numbers;
prorl_megatron/control/ holds the triggers of a run and what their firing makes the loop do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

Op = Literal[">", "<", "<="]
_OPS = {">": lambda v, b: v > b, "<": lambda v, b: v < b, "<=": lambda v, b: v <= b}
_STATE_KEYS = ("last_step", "clock", "streaks", "best_val", "stale_evals", "fired")


@dataclass(frozen=True)
class Threshold:
    """``metric`` ``op`` ``bound`` for ``window`` consecutive steps. ``name`` names the condition
    in reasons and state (default: the metric); with ``every_prefix``, every metric starting with
    it (``reward/mean/<domain>``) must be beyond the bound too."""

    metric: str
    op: Op
    bound: float
    window: int = 1
    name: str = ""
    every_prefix: Optional[str] = None

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"{self.label}: op must be one of {', '.join(_OPS)}, got {self.op!r}")
        if self.window < 1 or not math.isfinite(self.bound):
            raise ValueError(f"{self.label}: need a finite bound and window >= 1, got {self.bound}, {self.window}")

    @property
    def label(self) -> str:
        return self.name or self.metric

    def values(self, metrics: Mapping[str, Any]) -> Optional[list[tuple[str, float]]]:
        """The (metric, value) pairs this condition reads, or None without evidence."""
        keys = [self.metric]
        if self.every_prefix:
            keys += sorted(k for k in metrics if k.startswith(self.every_prefix))
        out = []
        for key in keys:
            value = metrics.get(key)
            if not _is_number(value) or math.isnan(value):
                return None
            out.append((key, float(value)))
        return out

    def beyond(self, values: list[tuple[str, float]]) -> bool:
        return all(_OPS[self.op](v, self.bound) for _, v in values)


@dataclass(frozen=True)
class TriggerSpec:
    """The conditions of one trigger (see the module docstring); all off: never fires."""

    after_steps: Optional[int] = None
    thresholds: tuple[Threshold, ...] = ()
    plateau_window: Optional[int] = None
    plateau_delta: float = 0.0
    plateau_metric: str = "val/reward"
    min_steps: int = 0

    def __post_init__(self) -> None:
        if self.after_steps is not None and self.after_steps < 1:
            raise ValueError(f"after_steps: expected >= 1 or None, got {self.after_steps}")
        if self.plateau_window is not None and self.plateau_window < 1:
            raise ValueError(f"plateau_window: expected >= 1 or None, got {self.plateau_window}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps: expected >= 0, got {self.min_steps}")
        labels = [t.label for t in self.thresholds]
        if len(set(labels)) != len(labels):
            raise ValueError(f"thresholds: names must be unique, got {labels}")

    @property
    def enabled(self) -> bool:
        return self.after_steps is not None or bool(self.thresholds) or self.plateau_window is not None


@dataclass(frozen=True)
class Fired:
    """A trigger that fired after step ``step``, for ``reason`` (from the conditions in
    ``triggers``: ``periodic``, threshold names, ``plateau``); ``since``: the first step of the
    evidence (a streak's first step; the step itself for ``periodic`` and ``plateau``)."""

    step: int
    reason: str
    triggers: tuple[str, ...]
    since: int


class Trigger:
    """One :class:`TriggerSpec` watching completed steps; resumable via ``state_dict``.

    Steps are the 1-based indices of completed steps and must increase. ``start_step``: where
    the clock starts (the step a stage was entered; 0 for a run's start).
    """

    def __init__(self, spec: TriggerSpec, start_step: int = 0) -> None:
        self.spec = spec
        self.last_step = start_step
        self.clock = start_step
        self.streaks: dict[str, list[int]] = {t.label: [0, 0] for t in spec.thresholds}  # [length, first step]
        self.best_val: Optional[float] = None
        self.stale_evals = 0
        self.fired = 0

    def observe(self, step: int, metrics: Mapping[str, Any]) -> Optional[Fired]:
        """Record the metrics of completed step ``step``; return what fired, or None."""
        if step <= self.last_step:
            raise ValueError(f"step: expected a step after {self.last_step}, got {step}")
        self.last_step = step
        spec, fired = self.spec, []  # (name, reason, since)
        elapsed = step - self.clock
        if spec.after_steps is not None and elapsed >= spec.after_steps:
            fired.append(("periodic", f"every {spec.after_steps} steps ({elapsed} since the last reset)", step))
        for t in spec.thresholds:
            values = t.values(metrics)
            if values is None:
                continue
            streak = self.streaks[t.label]
            streak[:] = [streak[0] + 1, streak[1] if streak[0] else step] if t.beyond(values) else [0, 0]
            if streak[0] >= t.window:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in values)
                run = f" for {streak[0]} consecutive steps (since step {streak[1]})" if t.window > 1 else ""
                fired.append((t.label, f"{shown} {t.op} {t.bound:g}{run}", streak[1]))
        if spec.plateau_window is not None and _is_number(metrics.get(spec.plateau_metric)):
            val = float(metrics[spec.plateau_metric])
            if self.best_val is None or (math.isfinite(val) and val > self.best_val + spec.plateau_delta):
                self.best_val = val if math.isfinite(val) else self.best_val
                self.stale_evals = 0
            else:
                self.stale_evals += 1
            if self.stale_evals >= spec.plateau_window:
                fired.append(("plateau", f"validation reward {val:.4g} not above the best {self.best_val:.4g} by > "
                                         f"{spec.plateau_delta:g} for {self.stale_evals} evaluations", step))
        if not fired or elapsed < spec.min_steps:
            return None
        self.restart(step)
        self.fired += 1
        return Fired(step=step, reason="; ".join(r for _, r, _ in fired), triggers=tuple(n for n, _, _ in fired),
                     since=min(s for _, _, s in fired))

    def restart(self, step: int) -> None:
        """Count afresh from ``step`` (it fired, or a reset was decided elsewhere): the clock,
        every streak and the plateau's stale count start again (the best validation reward is kept)."""
        self.clock = step
        self.streaks = {name: [0, 0] for name in self.streaks}
        self.stale_evals = 0

    def state_dict(self) -> dict[str, Any]:
        """The counters (plain Python values); the conditions come from the recipe."""
        return {"last_step": self.last_step, "clock": self.clock, "streaks": {k: list(v) for k, v in self.streaks.items()},
                "best_val": self.best_val, "stale_evals": self.stale_evals, "fired": self.fired}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters saved by :meth:`state_dict`; a condition the recipe added since starts
        at 0, one it dropped is forgotten."""
        missing = [key for key in _STATE_KEYS if key not in state]
        unexpected = [key for key in state if key not in _STATE_KEYS]
        if missing or unexpected:
            raise ValueError(f"state: missing keys {missing}, unexpected keys {unexpected}")
        self.last_step, self.clock = int(state["last_step"]), int(state["clock"])
        self.streaks = {name: list(state["streaks"].get(name, [0, 0])) for name in self.streaks}
        self.best_val, self.stale_evals, self.fired = state["best_val"], int(state["stale_evals"]), int(state["fired"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
