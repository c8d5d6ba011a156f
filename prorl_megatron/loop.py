"""What the training loop holds, split by what it is for, and its checkpointed state.

- :class:`Trainer`: what trains (the layout, the policy and reference shards, the optimizer);
  the training passes (prorl_megatron/train.py) need only this and the recipe;
- :class:`Sampler`: what samples (the vLLM engine, the reward pool, the prompt mixture and the
  validation prompts);
- :class:`LoopState`: the loop's own state (the step, the counters, the run controller, the last
  validation reward), which with the mixture's position is a checkpoint's loop state;
- :class:`Run`: the three, the output (metrics writer, progress bar) and the signals received.
  ``run.recipe`` is the current stage's recipe: the controller's, so a stage entry changes it
  in one place. A run without a sampler (``sampler`` None) is the GPU check's replay
  (prorl_megatron/replay.py): recorded samples, no engine, no prompt data.

:func:`save` and :func:`restore` write and read a whole checkpoint (models, optimizer, RNG
states, loop state); a checkpoint written before the run controller resumes too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prorl_megatron.checkpoint.hf_io import CheckpointError
from prorl_megatron.checkpoint.train_state import load_checkpoint, save_checkpoint
from prorl_megatron.config import Recipe
from prorl_megatron.control.decide import Controller, legacy_control_state
from prorl_megatron.models.policy import optimizer_state_is_empty, set_learning_rate
from prorl_megatron.rollout.stream import Carried


@dataclass
class Trainer:
    """What trains. ``policy``/``reference``: the GPTModel shards (what is saved and synced);
    ``policy_ddp``/``reference_module``: what runs; ``packed``: micro-batches are packed;
    ``cost``: what the training plan balances over DP ranks (a rollout.batch.CostModel)."""

    layout: Any  # prorl_megatron.parallel.Layout
    dims: Any  # prorl_megatron.models.architectures.ModelDims
    hf_dir: Path
    pad_id: int
    policy: Any
    policy_ddp: Any
    reference: Any
    reference_module: Any
    optimizer: Any
    packed: bool = False
    cost: Any = None


@dataclass
class Sampler:
    """What samples: the engine (with the policy's weights after every sync), the reward pool,
    the training prompt mixture, the encoder of prompt rows and the validation prompts."""

    engine: Any  # prorl_megatron.rollout.engine.RolloutEngine
    pool: Any  # prorl_megatron.rewards.pool.RewardPool
    mixture: Any  # prorl_megatron.data.dataset.PromptMixture
    encode: Any  # PromptRow -> EncodedPrompt
    val_prompts: list = field(default_factory=list)

    def usable_val_prompts(self, max_prompt_tokens: int) -> list:
        """The validation prompts within ``max_prompt_tokens`` (a stage may change it)."""
        return [p for p in self.val_prompts if len(p.ids) <= max_prompt_tokens]


def fresh_counters() -> dict[str, int]:
    return {"skipped_updates": 0, "nonfinite_in_row": 0, "too_long_prompts": 0, "resets": 0, "rollbacks": 0}


@dataclass
class LoopState:
    """The loop's state: ``step`` (the last completed step), the counters (logged every step),
    the run controller (reset schedule, stage, health streaks), the last validation reward, and
    the groups a step carried into the next (``rollout.partial: resume``)."""

    control: Controller
    step: int = 0
    counters: dict[str, int] = field(default_factory=fresh_counters)
    last_val_reward: Optional[float] = None
    carried: list = field(default_factory=list)  # rollout.stream.Carried: groups going on into the next step


@dataclass
class Run:
    """Everything the loop holds (built by prorl_megatron.train.setup)."""

    trainer: Trainer
    sampler: Optional[Sampler]  # None: the replay's run, which samples nothing (see the module docstring)
    state: LoopState
    writer: Any  # prorl_megatron.metrics.MetricsWriter
    progress: Any  # prorl_megatron.metrics.Progress
    overrides: tuple[str, ...] = ()  # the command line's: they win over every stage's settings
    stop_signal: list[int] = field(default_factory=list)
    saved_step: Optional[int] = None  # the newest checkpoint this run wrote or resumed from
    # (step, the step's kept samples) -> None: the replay recorder (prorl_megatron/replay.py), never a recipe's
    record: Optional[Callable[[int, list], None]] = None

    @property
    def recipe(self) -> Recipe:
        """The current stage's recipe (the command line's overrides on top)."""
        return self.state.control.recipe


def loop_state(run: Run) -> dict[str, Any]:
    """The checkpoint's loop state (JSON-able); ``data`` is None for the replay's run (no prompt mixture)."""
    s = run.state
    data = run.sampler.mixture.state_dict() if run.sampler is not None else None
    return copy.deepcopy({"control": s.control.state_dict(), "data": data,
                          "counters": dict(s.counters), "last_val_reward": s.last_val_reward,
                          **({"carried": [c.to_state() for c in s.carried]} if s.carried else {})})


def load_loop_state(run: Run, loop: dict[str, Any]) -> None:
    """Restore :func:`loop_state`'s output, or the loop state of a checkpoint from before the
    run controller (``scheduler``, ``health``, ``stage``)."""
    s = run.state
    s.control.load_state_dict(loop["control"] if "control" in loop else legacy_control_state(loop))
    if run.sampler is not None:  # the replay's run has no prompt mixture: its samples come by step
        if loop["data"] is None:
            raise CheckpointError("this checkpoint was written by the GPU check's replay (no prompt mixture "
                                  "position): a training run cannot resume from it")
        run.sampler.mixture.load_state_dict(loop["data"])
    s.counters.update(loop["counters"])
    s.last_val_reward = loop["last_val_reward"]
    s.carried = [Carried.from_state(c) for c in loop.get("carried", [])]


def save(run: Run, step: int) -> None:
    """Checkpoint step ``step`` (collective)."""
    t, cfg = run.trainer, run.recipe
    save_checkpoint(cfg.checkpoint.dir, step, t.policy, t.reference, t.optimizer, t.hf_dir, loop_state(run),
                    optimizer_state_is_empty(t.optimizer), cfg.checkpoint.keep_last)
    run.saved_step = step


def restore(run: Run, path: Path) -> None:
    """Load checkpoint ``path``: models, optimizer, RNG states, loop state, step (collective)."""
    t = run.trainer
    meta = load_checkpoint(path, t.policy, t.reference, t.optimizer)
    load_loop_state(run, meta["loop"])
    set_learning_rate(t.optimizer, run.recipe.train.lr)  # the stage's (command line's), not the saved one
    run.state.step = run.saved_step = int(meta["step"])
