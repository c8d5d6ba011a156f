"""ProRL's training stages as recipes: which stage a checkpoint is in, and what a stage changes.

The paper trains in stages — a KL coefficient, a temperature, a response budget (8k, then 16k)
changed between them, each change a reference + optimizer reset. A recipe's ``stages:`` list
(:class:`~prorl_megatron.config.StageConfig`) says what each stage changes and when the run
enters it; the run controller (prorl_megatron/control/) decides the entries and applies them.
This module holds what is about the recipes themselves:

- :func:`recipe_to_resume`: the recipe a run (or an evaluation) of a checkpoint uses — the
  checkpoint's stage's, the command line's overrides on top;
- :func:`changes`: what differs between two recipes, as dotted keys; :func:`engine_length`:
  vLLM's maximum model length, which decides whether a stage rebuilds the engine.

A stage's recipe is the file's, then stages 0..k's overrides, then the command line's
(:func:`~prorl_megatron.config.stage_recipe`): a resume lands in the checkpoint's stage with
that recipe, and a key given on the resumed command wins over any stage.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from prorl_megatron.config import ConfigError, Recipe, stage_overridden, stage_recipe, to_dict

log = logging.getLogger(__name__)


def saved_stage(loop_state: Optional[Mapping[str, Any]], recipe: Recipe) -> tuple[int, str]:
    """(index, name) of the stage a checkpoint's loop state is in (stage 0 for a fresh run,
    or a checkpoint from before stages); it reads the run controller's state and the older
    ``stage`` entry alike."""
    loop = loop_state or {}
    state = (loop.get("control") or {}).get("stage") or loop.get("stage")
    if state is None:
        return 0, recipe.stages[0].name if recipe.stages else ""
    return int(state["index"]), state["name"]


def recipe_to_resume(recipe: Recipe, overrides: tuple[str, ...], loop_state: Optional[Mapping[str, Any]]) -> Recipe:
    """The recipe a run resumes with: ``recipe`` (stage 0's, the command line applied) moved to
    the checkpoint's stage, the command line's ``overrides`` on top (each one that beats a
    stage's value is logged). ``loop_state``: the checkpoint's, None for a fresh run."""
    index, name = saved_stage(loop_state, recipe)
    staged = recipe_in_stage(recipe, overrides, index, name, "the checkpoint was written in")
    if index:
        log.info("resuming in stage %d %r", index, name)
    return staged


def recipe_in_stage(recipe: Recipe, overrides: tuple[str, ...], index: int, name: str, said: str) -> Recipe:
    """Stage ``index`` (named ``name``) of ``recipe``, ``overrides`` on top; ``said``: how an
    error introduces the stage."""
    names = [s.name for s in recipe.stages]
    if index >= max(len(names), 1) or (names and names[index] != name):
        raise ConfigError(f"{said} stage {index} {name!r}; this recipe's stages are {names}: "
                          "use the recipe the run started with")
    if not recipe.stages:
        return recipe
    if index:
        recipe = stage_recipe(recipe, index, overrides).validate(source=f"stage {index} {name!r}")
    for line in stage_overridden(recipe, index, overrides):
        log.warning("%s", line)
    return recipe


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


def describe(changed: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "no setting changed"
