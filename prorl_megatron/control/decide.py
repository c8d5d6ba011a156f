"""The run's one decision point: after each step, what the loop does about it.

Requests come from three kinds of :class:`~prorl_megatron.algo.triggers.Trigger` over the step's
complete metrics (the same on every rank, so every rank decides the same):

- the reset schedule (the stage's ``reset:`` section; its clock is the last reset);
- the next stage's entry (``stages[k].enter``; its clock is the current stage's entry);
- the health checks (``health:``: one trigger per check, each with its action; ``nonfinite``:
  any NaN or infinite number among the metrics).

:meth:`Controller.decide` turns them into actions, in one precedence::

    Stop > Rollback > EnterStage > Reset > Warn

- :class:`Stop` (a health check's ``stop``): wins over a rollback of the same step, which is
  absorbed. It does not cancel the step's stage entry or reset: they are applied, the step is
  checkpointed, then the run exits (status 4), so nothing decided is lost.
- :class:`Rollback` (``rollback``): the step is discarded, so every other request of the step is
  absorbed (the rollback lists them). Where no rollback can be made (``rollback_target`` says why:
  no checkpoint before the trouble, ``health.max_rollbacks`` spent, a stage boundary) it is a
  Stop that says why.
- :class:`EnterStage` (the stage trigger, or a health check's ``next_stage``): includes a reset,
  so a Reset of the same step is absorbed. ``next_stage`` in the last stage is a Warn saying so.
- :class:`Reset` (the schedule, or a health check's ``reset``): the same step's requests are one
  reset with all their reasons.
- :class:`Warn`: every health alarm is logged, whatever else happens.

An absorbed request is named in the absorbing action (``absorbed``), never silently dropped.
After any reset, whoever asked for it, the reset schedule's clock and streaks restart in one
place (:meth:`Controller._after_reset`); health streaks watch the run's health whatever the
reference and restart only when their own check fires. Resumable via ``state_dict``, which also
reads the loop state of checkpoints written before this module (``scheduler``/``stage``/``health``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from prorl_megatron.algo.triggers import Trigger
from prorl_megatron.config import HEALTH_CHECKS, Recipe, health_spec

NONFINITE = "nonfinite"


@dataclass(frozen=True)
class Alarm:
    """A health check that fired after step ``step``: its action and why; ``since``: the first
    step of the streak that tripped it (a rollback goes back before it)."""

    step: int
    check: str
    action: str
    message: str
    since: int

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "action": self.action, "message": self.message, "since": self.since}


@dataclass(frozen=True)
class Warn:
    """Log ``alarm`` (an event and a console line); ``note``: what became of its action, if not done."""

    alarm: Alarm
    note: str = ""


@dataclass(frozen=True)
class Reset:
    """Hard-reset the reference (and the optimizer, per the stage's ``reset.reset_optimizer``)."""

    reason: str
    triggers: tuple[str, ...]
    absorbed: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnterStage:
    """Enter stage ``index`` (a reset, then the stage's settings)."""

    index: int
    name: str
    reason: str
    triggers: tuple[str, ...]
    absorbed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rollback:
    """Go back to checkpoint ``target`` (the newest before step ``since``) and redo the steps."""

    since: int
    target: Any
    alarms: tuple[Alarm, ...]
    absorbed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stop:
    """After the step's checkpoint, stop the run (exit status 4) for ``alarm``."""

    alarm: Alarm
    absorbed: tuple[str, ...] = ()


Action = Union[Warn, Reset, EnterStage, Rollback, Stop]
RollbackTarget = Callable[[int], "tuple[Optional[Any], str]"]


@dataclass
class _Requests:
    """What the step's triggers asked for, before the precedence: the health alarms, and the
    reset schedule's and the stage trigger's (reason, triggers) where they fired."""

    alarms: list[Alarm] = field(default_factory=list)
    scheduled_reset: Optional[tuple[str, tuple[str, ...]]] = None
    scheduled_entry: Optional[tuple[str, tuple[str, ...]]] = None

    def asking(self, action: str) -> list[tuple[str, tuple[str, ...]]]:
        """(reason, triggers) of every request for ``reset`` or ``next_stage``, the schedule's first."""
        scheduled = self.scheduled_reset if action == "reset" else self.scheduled_entry
        return ([scheduled] if scheduled else []) + [(f"health check {a.check}: {a.message}", ("health",))
                                                     for a in self.alarms if a.action == action]


class Controller:
    """The reset schedule, the stage entries and the health checks of one run.

    ``recipes``: each stage's resolved recipe (one for a recipe without stages); the current
    stage's ``reset:`` is the schedule, the next stage's ``enter`` its entry trigger, ``health:``
    the checks (a stage cannot change them).
    """

    def __init__(self, recipes: list[Recipe], stage: int = 0, entered_step: int = 0) -> None:
        if not recipes:
            raise ValueError("recipes: need at least one (stage 0's)")
        self.recipes = recipes
        self.stages = recipes[0].stages
        self.stage, self.entered_step = stage, entered_step
        self.reset = Trigger(self.recipe.reset.spec(), start_step=entered_step)
        self.entry = self._entry_trigger()
        health = recipes[0].health
        self.nonfinite = health.nonfinite
        self.health = {name: Trigger(health_spec(name, getattr(health, name))) for name in HEALTH_CHECKS
                       if getattr(health, name).threshold is not None}
        self.actions = {name: getattr(health, name).action for name in self.health}

    @property
    def recipe(self) -> Recipe:
        """The current stage's recipe."""
        return self.recipes[self.stage]

    @property
    def stage_name(self) -> str:
        return self.stages[self.stage].name if self.stages else ""

    def _entry_trigger(self) -> Optional[Trigger]:
        following = self.stage + 1
        if following >= len(self.stages):
            return None
        return Trigger(self.stages[following].enter.spec(), start_step=self.entered_step)

    # ---- the decision ------------------------------------------------------------------

    def decide(self, step: int, metrics: Mapping[str, Any], rollback_target: RollbackTarget) -> list[Action]:
        """The actions after completed step ``step``, in the order to apply them: a Warn per
        health alarm, a stage entry or a reset, then a rollback or a stop.
        ``rollback_target(since)``: the checkpoint to go back to for trouble that began at step
        ``since``, or None and why not. The controller's own counters move as the actions say
        (a rollback restores them with the rest of the loop state)."""
        asked = self._observe(step, metrics)
        stops = [a for a in asked.alarms if a.action == "stop"]
        backs = [a for a in asked.alarms if a.action == "rollback"]
        if backs and not stops:
            since = min(a.since for a in backs)
            target, why = rollback_target(since)
            if target is not None:
                absorbed = [f"{a.check} -> {a.action}" for a in asked.alarms if a.action != "rollback"]
                absorbed += [f"{kind} ({r[0]})" for kind, r in (("reset", asked.scheduled_reset),
                                                                ("stage entry", asked.scheduled_entry)) if r]
                return [Rollback(since, target, tuple(asked.alarms), absorbed=tuple(absorbed))]
            stop = Alarm(step, backs[0].check, "stop", f"{backs[0].message} (no rollback: {why})", backs[0].since)
            asked.alarms = [stop if a is backs[0] else a for a in asked.alarms]
            stops = [stop]
        last = self.stage + 1 >= len(self.stages)
        actions: list[Action] = [Warn(a, note=f"{self.stage_name!r} is the last stage"
                                      if a.action == "next_stage" and last else "") for a in asked.alarms]
        change = self._stage_or_reset(step, asked.asking("next_stage") if not last else [], asked.asking("reset"))
        if change is not None:
            actions.append(change)
        if stops:
            actions.append(Stop(stops[0], absorbed=tuple(f"{a.check} -> rollback" for a in asked.alarms
                                                         if a.action == "rollback")))
        return actions

    def _observe(self, step: int, metrics: Mapping[str, Any]) -> _Requests:
        """Every trigger sees the step, whatever else fires (no evidence is skipped)."""
        asked = _Requests()
        if self.nonfinite is not None:
            bad = sorted(k for k, v in metrics.items() if _is_number(v) and not math.isfinite(v))
            if bad:
                shown = ", ".join(f"{k}={metrics[k]}" for k in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5
                                                                          else "")
                asked.alarms.append(Alarm(step, NONFINITE, self.nonfinite, f"non-finite metrics: {shown}", step))
        for name, trigger in self.health.items():
            fired = trigger.observe(step, metrics)
            if fired is not None:
                asked.alarms.append(Alarm(step, name, self.actions[name], fired.reason, fired.since))
        fired = self.reset.observe(step, metrics)
        if fired is not None:
            asked.scheduled_reset = (fired.reason, fired.triggers)
        fired = self.entry.observe(step, metrics) if self.entry is not None else None
        if fired is not None:
            reason = (f"{step - self.entered_step} steps in the previous stage" if fired.triggers == ("periodic",)
                      else fired.reason)
            asked.scheduled_entry = (reason, fired.triggers)
        return asked

    def _stage_or_reset(self, step: int, entries: list[tuple[str, tuple[str, ...]]],
                        resets: list[tuple[str, tuple[str, ...]]]) -> Optional[Action]:
        """The step's stage entry (absorbing its resets) or its one reset, the counters moved."""
        def merged(requests: list[tuple[str, tuple[str, ...]]]) -> tuple[str, tuple[str, ...]]:
            return "; ".join(r for r, _ in requests), tuple(t for _, ts in requests for t in ts)

        if entries:
            state = self.reset.state_dict()
            self.stage, self.entered_step = self.stage + 1, step
            self.entry = self._entry_trigger()
            self.reset = Trigger(self.recipe.reset.spec())  # the new stage's schedule, its counters kept
            self.reset.load_state_dict(state)
            self._after_reset(step)
            return EnterStage(self.stage, self.stage_name, *merged(entries),
                              absorbed=tuple(f"reset ({r})" for r, _ in resets))
        if resets:
            self._after_reset(step)
            return Reset(*merged(resets), absorbed=tuple(f"reset ({r})" for r, _ in resets[1:]))
        return None

    def _after_reset(self, step: int) -> None:
        """Every counter that measures since the last reset starts again (any reset, any source)."""
        self.reset.restart(step)

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values: the stage, and every trigger's counters."""
        return {"stage": {"index": self.stage, "name": self.stage_name, "entered_step": self.entered_step},
                "reset": self.reset.state_dict(),
                "entry": None if self.entry is None else self.entry.state_dict(),
                "health": {name: t.state_dict() for name, t in self.health.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the triggers' settings come from the recipes."""
        stage = state["stage"]
        index = int(stage["index"])
        if index >= len(self.recipes) or (self.stages and stage["name"] != self.stages[index].name):
            raise ValueError(f"the checkpoint is in stage {index} {stage['name']!r}; this recipe's stages are "
                             f"{[s.name for s in self.stages]}")
        self.stage, self.entered_step = index, int(stage["entered_step"])
        self.reset = Trigger(self.recipe.reset.spec(), start_step=self.entered_step)
        self.reset.load_state_dict(state["reset"])
        self.entry = self._entry_trigger()
        if self.entry is not None and state["entry"] is not None:
            self.entry.load_state_dict(state["entry"])
        for name, trigger in self.health.items():
            if name in state["health"]:
                trigger.load_state_dict(state["health"][name])


def legacy_control_state(loop: Mapping[str, Any]) -> dict[str, Any]:
    """:meth:`Controller.state_dict` from the loop state of a checkpoint written before the
    controller (``scheduler``: the ResetScheduler's counters; ``health``: the HealthWatcher's
    streaks; ``stage``: the StageTracker's index and its trigger, a ResetScheduler's counters)."""
    def trigger(s: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
        if s is None:
            return None
        last = int(s["last_step"])
        streaks = {name: [int(s.get(key, 0)), last - int(s.get(key, 0)) + 1 if s.get(key, 0) else 0]
                   for name, key in (("kl", "kl_streak"), ("entropy", "entropy_streak"))}
        return {"last_step": last, "clock": int(s["last_reset_step"]), "streaks": streaks,
                "best_val": s["best_val"], "stale_evals": int(s["stale_evals"]), "fired": int(s["num_resets"])}

    stage = loop.get("stage") or {"index": 0, "name": "", "entered_step": 0, "trigger": None}
    health = loop.get("health") or {"last_step": 0, "streaks": {}}
    return {"stage": {k: stage[k] for k in ("index", "name", "entered_step")},
            "reset": trigger(loop["scheduler"]), "entry": trigger(stage.get("trigger")),
            "health": {name: {"last_step": int(health["last_step"]), "clock": 0, "streaks": {name: list(streak)},
                              "best_val": None, "stale_evals": 0, "fired": 0}
                       for name, streak in health["streaks"].items()}}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
