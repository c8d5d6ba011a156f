"""Carrying out the run controller's actions on the trainer (control, not algorithm).

:func:`apply_actions` takes :meth:`~prorl_megatron.control.decide.Controller.decide`'s actions
for a completed step: a health alarm is an event and a warning; a reset copies the policy into
the reference and forgets Adam's state; a stage entry is a reset, then the stage's settings
applied live (``train.lr`` into the optimizer, sampling settings into the engine — rebuilt only
for a new maximum length — and ``data.domain_weights`` into the mixture, its position kept); a
rollback raises :class:`RollBack`, which the loop catches to go back (:func:`roll_back`); a stop
is returned, to be raised after the step's checkpoint. The exceptions that end or rewind the loop
live here, with the stop-signal handling (Slurm's warning signal) that checkpoints and exits.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from prorl_megatron.checkpoint.train_state import checkpoint_before, restore_rng, rewind_checkpoints, rng_states
from prorl_megatron.collect import any_rank, gather_lists
from prorl_megatron.config import Recipe, stage_overridden
from prorl_megatron.control.decide import Action, Alarm, EnterStage, Reset, Rollback, Stop, Warn
from prorl_megatron.loop import Run, load_loop_state, restore, save
from prorl_megatron.models.policy import copy_weights, reset_optimizer_state, set_learning_rate
from prorl_megatron.stages import changes, describe, engine_length

log = logging.getLogger("prorl_megatron.train")

EXIT_STOPPED = 3  # exit status after a signal-triggered checkpoint: not finished, resume me
EXIT_UNHEALTHY = 4  # exit status after a health check's stop (checkpointed): look before resuming
STOPPED_FILE = "stopped"  # in checkpoint.dir after a signal-triggered checkpoint; removed on start


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite updates in a row); the message says why."""


class StopRequested(Exception):
    """SIGUSR1/SIGTERM arrived; the step finished and a checkpoint was written."""


class StepAbandoned(Exception):
    """A stop signal arrived during the step's rollout, before anything of the step was applied."""


class HealthStopped(Exception):
    """A health check with action ``stop`` fired; the step was checkpointed."""


class RollBack(Exception):
    """Health alarms with action ``rollback`` after step ``step``: go back to checkpoint ``action.target``."""

    def __init__(self, step: int, action: Rollback) -> None:
        super().__init__(step, action.target)
        self.step, self.action = step, action


# --------------------------------------------------------------------------------------
# Applying a step's actions
# --------------------------------------------------------------------------------------


def apply_actions(run: Run, step: int, actions: list[Action], metrics: dict[str, Any]) -> Optional[Stop]:
    """Carry out ``actions`` (in the controller's order) after step ``step``; ``metrics`` gets
    the step's marks (``health/<check>``, ``reset``). Raises :class:`RollBack`; returns the
    :class:`Stop` to raise once the step is checkpointed, if any."""
    halt = None
    for action in actions:
        if isinstance(action, Rollback):
            raise RollBack(step, action)  # the step's events go with the discarded steps
        if isinstance(action, Warn):
            warn(run, step, action, metrics)
        elif isinstance(action, EnterStage):
            enter_stage(run, step, action)
            metrics["reset"] = 1
        elif isinstance(action, Reset):
            reset_reference(run, step, action)
            metrics["reset"] = 1
        elif isinstance(action, Stop):
            halt = action
            if action.absorbed:
                log.warning("step %d: health stop: %s not done", step, ", ".join(action.absorbed))
    return halt


def warn(run: Run, step: int, action: Warn, metrics: dict[str, Any]) -> None:
    a = action.alarm
    metrics[f"health/{a.check}"] = 1
    run.writer.event(step, "health", **a.to_dict(), **({"note": action.note} if action.note else {}))
    log.warning("step %d: health check %s -> %s: %s%s", step, a.check, a.action, a.message,
                f" ({action.note})" if action.note else "")


def hard_reset(run: Run, reset_optimizer: bool) -> None:
    """ProRL's hard reset: the reference becomes the current policy; Adam starts afresh."""
    t = run.trainer
    copy_weights(t.policy, t.reference)
    if reset_optimizer:
        reset_optimizer_state(t.optimizer)
    run.state.counters["resets"] += 1


def reset_reference(run: Run, step: int, action: Reset) -> None:
    reset_optimizer = run.recipe.reset.reset_optimizer
    hard_reset(run, reset_optimizer)
    run.writer.event(step, "reset", reason=action.reason, triggers=list(action.triggers),
                     optimizer_reset=reset_optimizer, **({"absorbed": list(action.absorbed)} if action.absorbed else {}))
    run.progress.write(f"step {step}: reference reset ({action.reason})")


def enter_stage(run: Run, step: int, action: EnterStage) -> None:
    """Stage ``action.index`` after ``step`` (the controller is in it already): a hard reset (as
    the paper does between stages, with the entered stage's ``reset.reset_optimizer``), then the
    stage's recipe (the command line's overrides on top) applied to the live run."""
    control = run.state.control
    old, new = control.recipes[action.index - 1], control.recipes[action.index]
    hard_reset(run, new.reset.reset_optimizer)
    changed, rebuilt = apply_recipe(run, old, new)
    run.writer.event(step, "stage", stage=action.name, index=action.index, reason=action.reason,
                     triggers=list(action.triggers), changed={k: list(v) for k, v in changed.items()},
                     engine_rebuilt=rebuilt, optimizer_reset=new.reset.reset_optimizer,
                     **({"absorbed": list(action.absorbed)} if action.absorbed else {}))
    run.progress.write(f"step {step}: stage {action.index} {action.name!r} ({action.reason}): "
                       f"{describe(changed)}; reference reset" + ("; vLLM engine rebuilt" if rebuilt else ""))
    for line in stage_overridden(new, action.index, run.overrides, first=action.index):
        log.warning("stage %r: %s", action.name, line)


def apply_recipe(run: Run, old: Recipe, new: Recipe) -> tuple[dict[str, tuple[Any, Any]], bool]:
    """What differs from ``old`` to ``new`` (the live recipe now), applied where the run holds
    it; returns the changes and whether the engine was rebuilt."""
    changed = changes(old, new)
    if "train.lr" in changed:
        set_learning_rate(run.trainer.optimizer, new.train.lr)
    if run.sampler is None:  # the GPU check's replay (prorl_megatron/replay.py): no engine, no mixture to set
        return changed, False
    if "data.domain_weights" in changed:
        run.sampler.mixture.set_weights(new.data.domain_weights or None)
    rebuilt = engine_length(new) != engine_length(old)
    if rebuilt:
        rebuild_engine(run)
    else:
        run.sampler.engine.rollout = new.rollout  # n, temperature, max tokens, stop: read at every generate
    return changed, rebuilt


def rebuild_engine(run: Run) -> None:
    """A vLLM engine for a new maximum length: the old one is shut down, the new one built from
    ``run.recipe`` and given the policy's weights. The process-global RNG states (which vLLM
    reseeds when it starts) are kept as they were."""
    from prorl_megatron.rollout.engine import RolloutEngine

    cfg, rng = run.recipe, rng_states()
    run.sampler.engine.shutdown()
    run.sampler.engine = RolloutEngine(str(run.trainer.hf_dir), cfg.rollout, cfg.precision, cfg.seed,
                                       load_weights=False)
    restore_rng(rng)
    fill_engine(run)
    log.debug("vLLM engine rebuilt for max length %d", engine_length(cfg))


def fill_engine(run: Run) -> None:
    """The policy's weights into a fresh engine (it starts with random ones), then the parity
    check where enabled."""
    from prorl_megatron.rollout.weight_sync import check_sync, sync_tolerance, sync_weights

    cfg, t = run.recipe, run.trainer
    sync_weights(t.policy, t.dims, run.sampler.engine, cfg.precision.params_dtype, cfg.rollout.sync_bucket_mib << 20)
    if cfg.rollout.check_sync_every:
        probe = [p.ids for p in run.sampler.usable_val_prompts(cfg.rollout.max_prompt_tokens)[:4]]
        check_sync(t.policy, t.dims, run.sampler.engine, probe or [[t.pad_id, t.pad_id]],
                   sync_tolerance(cfg.precision.params_dtype))


# --------------------------------------------------------------------------------------
# Rollbacks
# --------------------------------------------------------------------------------------


def rollback_target(run: Run):
    """``since -> (checkpoint, why not)``: the newest checkpoint before step ``since`` and in
    the current stage (collective: rank 0's listing for every rank), within ``health.max_rollbacks``."""
    def target(since: int) -> tuple[Optional[Path], str]:
        limit, root = run.recipe.health.max_rollbacks, run.recipe.checkpoint.dir
        if run.state.counters["rollbacks"] >= limit:
            return None, f"health.max_rollbacks={limit} rollbacks done"
        path = gather_lists([checkpoint_before(root, since) if dist.get_rank() == 0 else None])[0][0]
        if path is None:
            return None, f"no checkpoint before step {since} in {root}"
        control = run.state.control
        if control.stage > 0 and int(path.name.split("_")[-1]) < control.entered_step:
            return None, (f"the newest checkpoint before step {since} ({path.name}) is from before stage "
                          f"{control.stage_name!r}, entered after step {control.entered_step}")
        return path, ""
    return target


def roll_back(run: Run, back: RollBack) -> None:
    """Go back to the rollback's checkpoint in process, as a resume would; the checkpoints and
    metric records of the later steps are discarded (a ``rollback`` event lists them) and the
    steps are redone with other sampling seeds (the rollback count, in the loop state, shifts them)."""
    from prorl_megatron.rollout.weight_sync import sync_weights

    cfg, t = run.recipe, run.trainer
    count = run.state.counters["rollbacks"] + 1
    rewind_checkpoints(cfg.checkpoint.dir, back.action.target)
    reset_optimizer_state(t.optimizer)  # loaded into an empty optimizer, as at start-up
    restore(run, back.action.target)
    run.state.counters["rollbacks"] = count
    cfg = run.recipe  # the checkpoint's stage: the same (a rollback never crosses a stage boundary)
    sync_weights(t.policy, t.dims, run.sampler.engine, cfg.precision.params_dtype, cfg.rollout.sync_bucket_mib << 20)
    step = run.state.step
    discarded = list(range(step + 1, back.step + 1))
    run.writer.discard_after(step)  # the event is the checkpoint step's: a later rollback to it keeps it
    run.writer.event(step, "rollback", alarm_step=back.step, discarded=discarded, rollbacks=count,
                     alarms=[a.to_dict() for a in back.action.alarms],
                     **({"absorbed": list(back.action.absorbed)} if back.action.absorbed else {}))
    run.progress.rewind(step)
    log.warning("step %d: health rollback %d to the checkpoint of step %d (steps %s discarded): %s", back.step,
                count, step, discarded, "; ".join(f"{a.check}: {a.message}" for a in back.action.alarms))


def health_stopped(run: Run, step: int, alarm: Alarm) -> HealthStopped:
    return HealthStopped(f"health check {alarm.check}: {alarm.message}; checkpointed step {step} in "
                         f"{run.recipe.checkpoint.dir}. Look at the run before resuming (checkpoint.resume=auto)")


# --------------------------------------------------------------------------------------
# Stop signals
# --------------------------------------------------------------------------------------


def install_signal_handlers(run: Run) -> None:
    """SIGUSR1/SIGTERM: finish the step, checkpoint, exit (see :func:`signal_received`)."""
    def handler(signum: int, frame: Any) -> None:
        run.stop_signal.append(signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)


def signal_received(run: Run) -> bool:
    """Collective: did any rank get a stop signal? (srun signals ranks at slightly different times)."""
    return any_rank(bool(run.stop_signal))


def stop(run: Run, step: int) -> None:
    """After the checkpoint of ``step``: leave the marker for the job script and stop."""
    cfg = run.recipe
    if dist.get_rank() == 0:  # for the job script: every rank may not exit with status 3 under srun
        (Path(cfg.checkpoint.dir) / STOPPED_FILE).write_text(f"{step}\n")
    raise StopRequested(f"stop signal received: checkpointed step {step} in {cfg.checkpoint.dir}; "
                        "resume with checkpoint.resume=auto")


def stop_before(run: Run, step: int, start: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """A stop signal came during step ``step``'s rollout: go back to the step's start (loop
    state, RNG states), checkpoint step ``step - 1`` if it is not on disk, stop."""
    state, rng = start
    load_loop_state(run, state)
    restore_rng(rng)
    run.state.step = done = step - 1
    if done > 0 and run.saved_step != done:  # every rank knows the same: no file read decides a collective
        save(run, done)
    run.progress.write(f"step {step}: stop signal during the rollout: the step is redone after the resume")
    stop(run, done)
