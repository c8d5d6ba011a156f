"""ProRL's training stages on autopilot: when to enter the next stage, and what entering it changes.

The paper trains in stages — a KL coefficient, a temperature, a response budget (8k, then 16k)
changed between them, each change a reference + optimizer reset. A recipe's ``stages:`` list
(:class:`~prorl_megatron.config.StageConfig`) says what each stage changes and when the run
enters it. This module holds

- :class:`StageTracker`: the decision (pure: the current stage, and the next stage's trigger
  as a :class:`~prorl_megatron.algo.reset.ResetScheduler` counting from the step the current
  stage was entered); its state goes into the checkpoint's loop state;
- :func:`changes`: what differs between two recipes, as dotted keys;
- :func:`apply_recipe`: a new stage's recipe applied to a live run — ``train.lr`` into the
  optimizer, sampling settings into the engine (rebuilt, and the policy's weights synced into
  it, only when ``rollout.max_prompt_tokens + max_response_tokens`` changes: vLLM's maximum
  model length), ``data.domain_weights`` into the prompt mixture (its position kept),
  ``reset.*`` into the reset scheduler (its counters kept). Nothing else is rebuilt.

A stage's recipe is the file's, then stages 0..k's overrides, then the command line's
(:func:`~prorl_megatron.config.stage_recipe`): a resume lands in the checkpoint's stage with
that recipe, and a key given on the resumed command wins over any stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from prorl_megatron.algo.reset import ResetScheduler
from prorl_megatron.config import ConfigError, Recipe, StageConfig, stage_overridden, stage_recipe, to_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageEntry:
    """A decided stage change: after step ``step``, into stage ``index``, for ``reason``."""

    step: int
    index: int
    name: str
    reason: str
    triggers: tuple[str, ...]


def trigger_scheduler(stage: StageConfig, start_step: int) -> ResetScheduler:
    """The scheduler that decides when the run enters ``stage``, counting from ``start_step``."""
    t = stage.enter
    return ResetScheduler(every_n_steps=t.after_steps, kl_threshold=t.kl_threshold, kl_window=t.kl_window,
                          plateau_window=t.plateau_window, plateau_delta=t.plateau_delta,
                          entropy_floor=t.entropy_floor, entropy_window=t.entropy_window,
                          min_gap_steps=t.min_steps, start_step=start_step)


class StageTracker:
    """The current stage and the next one's trigger; resumable via ``state_dict``.

    ``observe`` takes the signals the reset scheduler takes (``kl``, ``val_reward`` on
    evaluation steps) and ``entropy``; it returns the stage to enter after this step, or None.
    """

    def __init__(self, stages: list[StageConfig], index: int = 0, entered_step: int = 0) -> None:
        self.stages = stages
        self.index = index
        self.entered_step = entered_step
        self.trigger = self._next_trigger()

    def _next_trigger(self) -> Optional[ResetScheduler]:
        following = self.index + 1
        return trigger_scheduler(self.stages[following], self.entered_step) if following < len(self.stages) else None

    @property
    def name(self) -> str:
        return self.stages[self.index].name if self.stages else ""

    def observe(self, step: int, signals: Mapping[str, float]) -> Optional[StageEntry]:
        if self.trigger is None:
            return None
        fired = self.trigger.observe(step, signals)
        if fired is None:
            return None
        steps_in = step - self.entered_step
        self.index += 1
        self.entered_step = step
        self.trigger = self._next_trigger()
        reason = fired.reason if fired.triggers != ("periodic",) else f"{steps_in} steps in the previous stage"
        return StageEntry(step=step, index=self.index, name=self.name, reason=reason, triggers=fired.triggers)

    def advance(self, step: int, reason: str) -> Optional[StageEntry]:
        """Enter the next stage after ``step`` whatever its trigger (a health check's
        ``next_stage``); None in the last stage."""
        if self.index + 1 >= len(self.stages):
            return None
        self.index += 1
        self.entered_step = step
        self.trigger = self._next_trigger()
        return StageEntry(step=step, index=self.index, name=self.name, reason=reason, triggers=("health",))

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "entered_step": self.entered_step,
                "trigger": None if self.trigger is None else self.trigger.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; the stage list comes from the recipe."""
        index = int(state["index"])
        if index >= max(len(self.stages), 1) or (self.stages and state["name"] != self.stages[index].name):
            names = [s.name for s in self.stages]
            raise ValueError(f"the checkpoint is in stage {index} {state['name']!r}; this recipe's stages are {names}")
        self.index, self.entered_step = index, int(state["entered_step"])
        self.trigger = self._next_trigger()
        if self.trigger is not None and state["trigger"] is not None:
            self.trigger.load_state_dict(state["trigger"])


def saved_stage(loop_state: Optional[Mapping[str, Any]]) -> int:
    """The stage index in a checkpoint's loop state (0 for a checkpoint without stages)."""
    return int(((loop_state or {}).get("stage") or {}).get("index", 0))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and not (prefix.endswith("domain_weights")):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def changes(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every setting that differs (the stage list aside)."""
    a, b = _flatten({k: v for k, v in to_dict(old).items() if k != "stages"}), \
        _flatten({k: v for k, v in to_dict(new).items() if k != "stages"})
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def engine_length(recipe: Recipe) -> int:
    """vLLM's maximum model length for the recipe: prompt + response budgets."""
    return recipe.rollout.max_prompt_tokens + recipe.rollout.max_response_tokens


def apply_recipe(run: Any, new: Recipe, rebuild_engine: Any) -> tuple[dict[str, tuple[Any, Any]], bool]:
    """Make ``new`` the live recipe of ``run`` (a :class:`prorl_megatron.train.Run`); return
    what changed and whether the engine was rebuilt. ``rebuild_engine(run)`` replaces the engine
    by one built from ``run.recipe`` with the policy's weights (collective); it is called only
    when the maximum length changes."""
    from prorl_megatron.models.policy import set_learning_rate

    old, changed = run.recipe, changes(run.recipe, new)
    run.recipe = new
    if "train.lr" in changed:
        set_learning_rate(run.optimizer, new.train.lr)
    if "data.domain_weights" in changed:
        run.mixture.set_weights(new.data.domain_weights or None)
    if any(k.startswith("reset.") for k in changed):
        state = run.scheduler.state_dict()
        run.scheduler = reset_scheduler(new)
        run.scheduler.load_state_dict(state)
    rebuilt = engine_length(new) != engine_length(old)
    if rebuilt:
        rebuild_engine(run)
    else:
        run.engine.rollout = new.rollout  # n, temperature, max tokens, stop: read at every generate
    return changed, rebuilt


def recipe_to_resume(recipe: Recipe, overrides: tuple[str, ...], loop_state: Optional[Mapping[str, Any]]) -> Recipe:
    """The recipe a run resumes with: ``recipe`` (stage 0's, the command line applied) moved to
    the checkpoint's stage, the command line's ``overrides`` on top (each one that beats a
    stage's value is logged). ``loop_state``: the checkpoint's, None for a fresh run."""
    state = (loop_state or {}).get("stage") or {"index": 0, "name": recipe.stages[0].name if recipe.stages else ""}
    index, name = int(state["index"]), state["name"]
    names = [s.name for s in recipe.stages]
    if index >= max(len(names), 1) or (names and names[index] != name):
        raise ConfigError(f"the checkpoint was written in stage {index} {name!r}; this recipe's stages are {names}: "
                          "resume with the recipe the run started with")
    if not recipe.stages:
        return recipe
    if index:
        recipe = stage_recipe(recipe, index, overrides).validate(source=f"stage {index} {name!r}")
        log.info("resuming in stage %d %r", index, name)
    for line in stage_overridden(recipe, index, overrides):
        log.warning("%s", line)
    return recipe


def reset_scheduler(recipe: Recipe) -> ResetScheduler:
    r = recipe.reset
    return ResetScheduler(every_n_steps=r.every_n_steps, kl_threshold=r.kl_threshold, kl_window=r.kl_window,
                          plateau_window=r.plateau_window, plateau_delta=r.plateau_delta,
                          min_gap_steps=r.min_gap_steps)


def describe(changed: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "no setting changed"
