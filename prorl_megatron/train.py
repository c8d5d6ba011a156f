"""ProRL training: one process per device, launched by torchrun or srun.

    torchrun --nproc_per_node 2 -m prorl_megatron.train --recipe recipes/tiny_cpu.yaml [key.sub=value ...]

:func:`train_step` is the whole algorithm, top to bottom: rollout -> reward -> dynamic
sampling -> advantages -> old/reference logprobs -> mini-batch updates -> weight sync ->
evaluation -> run control (one decision over the reset schedule, the stage entries and the
health checks: a reference reset, the next stage, a warning, a rollback or a stop;
prorl_megatron/control/) -> checkpoint -> metrics.
Every rank runs the same control flow on the same batch (rollouts and rewards are gathered
everywhere); the Megatron passes split the rows over data-parallel ranks, and only the last
pipeline stage sees logprobs.
SIGUSR1/SIGTERM (Slurm's warning signal) are read after each rollout round (the step is then
abandoned, the previous one checkpointed, and the step redone after the resume) and at the end
of the step (checkpointed); the process then exits with status 3. A health check's ``stop``
checkpoints the step and exits with status 4.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from prorl_megatron.algo import (
    compute_advantages, correction_weights, kl_penalty, logprob_mismatch, policy_kl_loss,
    scheduled_cosine_length_rewards,
)
from prorl_megatron.checkpoint.dist_ckpt import hf_config_dir, load_model
from prorl_megatron.checkpoint.hf_io import CheckpointError, HFReader
from prorl_megatron.checkpoint.train_state import find_checkpoint, read_meta, rng_states
from prorl_megatron.checkpoint.transfer import load_hf_weights
from prorl_megatron.collect import any_rank
from prorl_megatron.config import (
    ConfigError, Recipe, add_recipe_arguments, recipe_from_args, resolve_stages, stage_recipe, to_dict,
)
from prorl_megatron.control.apply import (
    EXIT_STOPPED, EXIT_UNHEALTHY, STOPPED_FILE, HealthStopped, RollBack, StepAbandoned, StopRequested,
    TrainingStopped, apply_actions, fill_engine, health_stopped, install_signal_handlers, roll_back, rollback_target,
    signal_received, stop, stop_before,
)
from prorl_megatron.control.decide import Controller, Stop
from prorl_megatron.data.chat import EncodedPrompt
from prorl_megatron.data.dataset import DataError, PromptMixture, load_rows
from prorl_megatron.loop import LoopState, Run, Sampler, Trainer, loop_state, restore, save
from prorl_megatron.metrics import MetricsWriter, PhaseTimer, Progress, TokenSums, check_trackers
from prorl_megatron.models.architectures import ModelDims, model_dims, read_hf_config
from prorl_megatron.models.forward import MicroBatch, packing_unavailable_reason, run_microbatches
from prorl_megatron.models.gpt import transformer_config, transformer_engine_available
from prorl_megatron.models.policy import (
    build_optimizer, build_policy, build_reference, copy_weights, finalize_grads, loss_scale, optimizer_step,
    still_calibrating, zero_grads,
)
from prorl_megatron.parallel import Layout, init_parallel, read_launch_env
from prorl_megatron.plan import check_fits, cost_model, device_memory_bytes
from prorl_megatron.rollout.batch import (
    MiniBatch, Sample, TrainBatch, make_batch, micro_batches, response_values, training_plan,
)
from prorl_megatron.rollout.stream import StepStream, StreamSettings, score_rollouts
from prorl_megatron.seeds import slots_per_step, step_base_seed
from prorl_megatron.stages import recipe_to_resume

log = logging.getLogger("prorl_megatron.train")

__all__ = ["EXIT_STOPPED", "EXIT_UNHEALTHY", "TrainingStopped", "train", "train_step", "main"]


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One ProRL step (collective); returns its metrics."""
    cfg, trainer, timer = run.recipe, run.trainer, PhaseTimer()
    start = time.perf_counter()

    # 1-3. rollout -> reward -> dynamic sampling (more rounds until the batch is full)
    samples, metrics = collect_samples(run, step, timer)
    if run.record is not None:  # the GPU check's replay recorder (prorl_megatron/replay.py); never a recipe's
        run.record(step, samples)
    if samples:
        run.sampler.engine.sleep()  # its memory goes to the training passes; the sync below brings it back
        # 4-6. advantages -> old-policy and reference logprobs -> one policy update per mini-batch
        metrics.update(train_on_samples(trainer, cfg, samples, run.state.counters, step, timer))

        # 7. weight sync: the engine samples the next step with the updated policy
        with timer("sync"):
            metrics.update(sync_engine(run, step, samples))
    else:
        log.warning("step %d: no prompt group with a reward signal after %d rounds; no update",
                    step, metrics["sampling/rounds"])

    # 8. evaluation (pass@k on held-out prompts; the plateau triggers' signal)
    if cfg.eval.every_n_steps and (step % cfg.eval.every_n_steps == 0 or step == cfg.train.steps):
        with timer("eval"):
            metrics.update(validate(run, step))

    # 9. run control: the reset schedule, the stage entries and the health checks decide together
    # (a reset: reference <- policy, Adam afresh; a stage: a reset, then its settings; a rollback leaves here)
    halt = run_control(run, step, metrics)

    # 10. checkpoint (at the stage's cadence from this step on), then the step's metrics record
    end_step(run, step, metrics, timer, start, halt)
    return metrics


def train_on_samples(trainer: Trainer, cfg: Recipe, samples: list[Sample], counters: dict[str, int], step: int,
                     timer: PhaseTimer) -> dict[str, Any]:
    """Phases 4-6 of a step on its kept samples (the same list on every rank; ``group`` numbers
    the prompts from 0): advantages, the old-policy and reference logprobs, one policy update
    per mini-batch. Returns the training metrics (:func:`step_means`), ``updates`` and ``tokens``
    (response tokens in the loss). The GPU check's replay (prorl_megatron/replay.py) calls it on
    recorded samples."""
    # 4. advantages, per token, from the group rewards
    batch = make_batch(samples, trainer.pad_id)
    with_advantages(cfg, batch)
    plan = training_plan([[i for i, s in enumerate(samples) if s.group == g] for g in range(samples[-1].group + 1)],
                         cfg.train.mini_batch_prompts, trainer.layout.data, trainer.layout.dp_rank,
                         cfg.train.micro_batch_size, (batch["prompt_len"] + batch["response_len"]).tolist(),
                         cfg.train.max_tokens_per_micro_batch, trainer.packed, trainer.cost)
    sums = TokenSums()

    # 5. old-policy and reference logprobs (no grad), entropy, KL to the reference
    with timer("logprob"):
        old_and_reference_logprobs(trainer, cfg, batch, plan, sums)

    # 6. policy updates: one optimizer step per mini-batch
    with timer("update"):
        for mini_batch in plan:
            update_policy(trainer, cfg, batch, mini_batch, sums, counters, step)
    return {**step_means(cfg, sums), "updates": len(plan), "tokens": int(batch["mask"].sum())}


def run_control(run: Run, step: int, metrics: dict[str, Any]) -> Optional[Stop]:
    """Phase 9 (collective): the step's settings into ``metrics``, the run controller's one
    decision over them, its actions applied (``metrics`` gets their marks), then the counters.
    Returns a health stop to raise after the checkpoint; a rollback raises :class:`RollBack`."""
    metrics.update(step_settings(run))
    actions = run.state.control.decide(step, metrics, rollback_target(run))
    halt = apply_actions(run, step, actions, metrics)
    metrics.update(run.state.counters)
    return halt


def end_step(run: Run, step: int, metrics: dict[str, Any], timer: PhaseTimer, start: float,
             halt: Optional[Stop]) -> None:
    """Phase 10 (collective): the step's checkpoint (at the stage's cadence, or on a stop signal
    or a health stop), then its metrics record (times, ``tokens_per_s``; ``start``: the step's
    ``perf_counter``); then the health stop or the signal's stop is raised, if any."""
    stopping = signal_received(run)
    if should_checkpoint(run.recipe, step) or stopping or halt:
        with timer("checkpoint"):
            save(run, step)
    metrics.update(timer.metrics())
    metrics["time/step"] = time.perf_counter() - start
    metrics["tokens_per_s"] = metrics.get("tokens", 0) / metrics["time/step"]
    run.writer.write(step, metrics)  # a logged checkpoint step is on disk
    if halt:
        raise health_stopped(run, step, halt.alarm)
    if stopping:
        stop(run, step)


def collect_samples(run: Run, step: int, timer: PhaseTimer) -> tuple[list[Sample], dict[str, Any]]:
    """Generate and score groups until ``train.prompts_per_step`` groups carry signal (with
    ``algo.dynamic_sampling``) or no more prompts may be drawn (prorl_megatron/rollout/stream.py);
    the metrics cover every sample generated to the end."""
    cfg, n = run.recipe, run.recipe.rollout.n
    slots = slots_per_step(cfg.algo.max_sampling_rounds, cfg.train.prompts_per_step,
                           cfg.algo.prompts_cap(cfg.train.prompts_per_step))
    resume = cfg.rollout.partial == "resume"  # the layout holds the continuations of carried samples too
    # after a rollback the redone steps sample with another key (hashed from seed + count)
    base = step_base_seed(cfg.seed + run.state.counters["rollbacks"], step, slots * (2 if resume else 1), n)

    def score(prompts: list[EncodedPrompt], rollouts: list[list[Any]]) -> list[list[float]]:
        with timer("reward"):
            rewards = score_rollouts(run.sampler.pool, prompts, rollouts)
        if cfg.rollout.truncated == "zero_reward":
            rewards = [[0.0 if out.truncated else r for out, r in zip(outs, rs)] for outs, rs in zip(rollouts, rewards)]
        return rewards

    def check() -> None:
        if signal_received(run):  # nothing of this step is applied yet: it is redone after the resume
            raise StepAbandoned(step)

    # the engine is awake with the policy's weights since the last sync
    stream = StepStream(run.sampler.engine, StreamSettings.of(cfg), base, lambda count: draw_prompts(run, count),
                        score, check, timer, slots=slots, version=step - 1, carried=run.state.carried)
    result = stream.run()
    run.state.carried = result.carried
    samples = [Sample(g.prompt.ids, out.response_ids, out.logprobs, reward, out.truncated, g.prompt.row.domain, group=i)
               for i, g in enumerate(result.batch) for out, reward in zip(g.samples, g.rewards)]
    every = [Sample(g.prompt.ids, out.response_ids, out.logprobs, reward, out.truncated, g.prompt.row.domain, group=-1)
             for g in result.complete for out, reward in zip(g.samples, g.rewards)]
    metrics = {**rollout_metrics(every), "sampling/rounds": result.waves, "sampling/prompts": result.drawn,
               "sampling/kept_groups": len(result.batch), "sampling/kept_frac": len(result.batch) / max(result.drawn, 1)}
    if cfg.rollout.overdraw:
        metrics["sampling/aborted_groups"] = result.aborted
    if resume:  # versions behind the policy trained on (step - 1): of the batch's groups' oldest tokens
        lags = [step - 1 - g.oldest for g in result.batch] or [0]
        metrics.update({"sampling/carried_groups": len(result.carried), "sampling/stale_groups": result.stale,
                        "staleness/lag_mean": sum(lags) / len(lags), "staleness/lag_max": max(lags)})
    metrics.update(shape_rewards(cfg, samples, step))  # after the metrics and the filter: they see verifier rewards
    return samples, metrics


def shape_rewards(cfg: Recipe, samples: list[Sample], step: int) -> dict[str, float]:
    """``rewards.length_penalty`` on the samples' rewards, in place (the verifier's reward is kept
    in ``info["verifier_reward"]``); returns its metrics."""
    lp = cfg.rewards.length_penalty
    if lp.kind == "none" or not samples:
        return {}
    shaped, active = scheduled_cosine_length_rewards(
        torch.tensor([s.reward for s in samples]), torch.tensor([len(s.response_ids) for s in samples]),
        cfg.rollout.max_response_tokens, step, on_steps=lp.on_steps, off_steps=lp.off_steps,
        start_step=lp.start_step, correct=tuple(lp.correct), wrong=tuple(lp.wrong), threshold=lp.threshold)
    if active:
        for s, r in zip(samples, shaped.tolist()):
            s.info["verifier_reward"], s.reward = s.reward, r
    return {"length_penalty/active": float(active), "reward/shaped_mean": float(shaped.mean())}


def draw_prompts(run: Run, count: int) -> list[EncodedPrompt]:
    """The next ``count`` prompts of the mixture that fit ``rollout.max_prompt_tokens``."""
    out: list[EncodedPrompt] = []
    while len(out) < count:
        for row in run.sampler.mixture.next(count - len(out)):
            prompt = run.sampler.encode(row)
            if len(prompt.ids) > run.recipe.rollout.max_prompt_tokens:
                run.state.counters["too_long_prompts"] += 1
                continue
            out.append(prompt)
    return out


def rollout_metrics(samples: list[Sample]) -> dict[str, float]:
    """Reward and pass rate (overall and per domain), response lengths, truncation."""
    if not samples:
        return {}
    out: dict[str, float] = {}
    for domain in sorted({s.domain for s in samples}) + [None]:
        part = [s for s in samples if domain is None or s.domain == domain]
        name = "" if domain is None else f"/{domain}"
        out[f"reward/mean{name}"] = sum(s.reward for s in part) / len(part)
        out[f"pass_rate{name}"] = sum(s.reward > 0.5 for s in part) / len(part)
    lengths = [len(s.response_ids) for s in samples]
    out.update({"response_length/mean": sum(lengths) / len(lengths), "response_length/max": max(lengths),
                "response_length/truncated_frac": sum(s.truncated for s in samples) / len(samples)})
    return out


def with_advantages(cfg: Recipe, batch: TrainBatch) -> None:
    """``batch["advantages"]`` [N, R] from the group rewards (``algo.advantage``); with
    ``rollout.truncated: mask``, truncated responses leave the loss first."""
    if cfg.rollout.truncated == "mask":
        batch["mask"] = batch["mask"] & ~batch["truncated"].unsqueeze(1)
    batch["advantages"] = compute_advantages(
        cfg.algo.advantage, batch["rewards"], batch["group_ids"], batch["mask"],
        **({"scale_by_std": cfg.algo.scale_by_std} if cfg.algo.advantage == "grpo" else {}))


# --------------------------------------------------------------------------------------
# The training passes (what trains: the Trainer and the recipe, nothing else)
# --------------------------------------------------------------------------------------


def counts_for_stats(trainer: Trainer) -> bool:
    """This rank holds a distinct copy of the last stage's values (TP peers hold the same)."""
    return trainer.layout.is_last_stage and trainer.layout.tp_rank == 0


def old_and_reference_logprobs(trainer: Trainer, cfg: Recipe, batch: TrainBatch, plan: list[MiniBatch],
                               sums: TokenSums) -> None:
    """Fill ``old_logprobs`` and ``ref_logprobs`` [N, R] for this rank's rows (last stage)."""
    n, width = batch["mask"].shape
    batch["old_logprobs"] = torch.zeros(n, width)
    batch["ref_logprobs"] = torch.zeros(n, width)
    fields = ["response_index", "mask", "rollout_logprobs"]
    for mini_batch in plan:
        mbs = micro_batches(batch, mini_batch.micro, trainer.layout.device, fields)
        with torch.no_grad():
            policy = run_microbatches(trainer.policy_ddp, mbs, vocab_size=trainer.dims.vocab_size, with_entropy=True,
                                      temperature=cfg.rollout.temperature,
                                      chunk_tokens=cfg.train.logprob_chunk_tokens, pack=trainer.packed)
            reference = run_microbatches(trainer.reference_module, mbs, vocab_size=trainer.dims.vocab_size,
                                         temperature=cfg.rollout.temperature,
                                         chunk_tokens=cfg.train.logprob_chunk_tokens, pack=trainer.packed)
        for rows, mb, both, ref in zip(mini_batch.micro, mbs, policy, reference):
            index, mask = mb.extras["response_index"], mb.extras["mask"]
            old = response_values(both[0], index)
            entropy = response_values(both[1], index)
            ref_lp = response_values(ref, index)
            r = old.shape[1]
            batch["old_logprobs"][rows, :r] = old.float().cpu()
            batch["ref_logprobs"][rows, :r] = ref_lp.float().cpu()
            if counts_for_stats(trainer):
                tokens = float(mask.sum())
                m = mask.float()
                sums.add("entropy", float((entropy * m).sum()), tokens)
                kl = kl_penalty(old, ref_lp, cfg.algo.kl_estimator, cfg.algo.kl_input_clamp, cfg.algo.kl_output_clamp)
                sums.add("kl_ref", float((kl * m).sum()), tokens)
                gap = logprob_mismatch(mb.extras["rollout_logprobs"], old, mask)
                sums.add("mismatch_mean", gap["mismatch_mean"] * tokens, tokens)
                sums.add_max("mismatch_max", gap["mismatch_max"])


def aggregation_share(cfg: Recipe, mask: torch.Tensor, mini_mask: torch.Tensor) -> float:
    """How much of the mini-batch's loss this micro-batch carries, for ``algo.loss_agg``.

    ``mask`` [B, R] is the micro-batch's, ``mini_mask`` the whole mini-batch's (all DP ranks).
    Each micro-batch computes its loss normalised by its own counts; multiplying by this
    share makes the sum over micro-batches and ranks the mini-batch's loss exactly.
    """
    agg = cfg.algo.loss_agg
    if agg == "token-mean":
        return float(mask.sum()) / max(float(mini_mask.sum()), 1.0)
    if agg == "token-sum":
        return 1.0
    rows = float((mask.sum(1) > 0).sum()) / max(float((mini_mask.sum(1) > 0).sum()), 1.0)
    if agg == "seq-mean-token-sum-norm":  # normalise by the recipe's response budget, not local padding
        return rows * mask.shape[1] / cfg.rollout.max_response_tokens
    return rows


def update_policy(trainer: Trainer, cfg: Recipe, batch: TrainBatch, mini_batch: MiniBatch, sums: TokenSums,
                  counters: dict[str, int], step: int) -> None:
    """Forward/backward of this rank's micro-batches, DP grad reduction, one optimizer step.

    A non-finite gradient skips the update: counted in ``counters`` (``skipped_updates``; and
    ``nonfinite_in_row``, which stops the run at ``train.max_nonfinite_in_row``, unless fp16's
    loss scale is still backing off from its start). ``grad_norm`` is summed as measured, so a
    step with a non-finite update has a non-finite mean (the health watch's ``nonfinite`` sees
    it); the fp16 scale's calibration skips are left out of it.
    """
    policy_gradients(trainer, cfg, batch, mini_batch, sums)
    stepped, grad_norm = optimizer_step(trainer.optimizer)
    calibrating = not stepped and still_calibrating(trainer.optimizer)
    if dist.get_rank() == 0 and not calibrating:
        sums.add("grad_norm", grad_norm, 1.0)
    if stepped:
        counters["nonfinite_in_row"] = 0
        return
    counters["skipped_updates"] += 1
    if calibrating:  # fp16: the loss scale backs off from its high start
        log.info("step %d: fp16 gradient overflow: update skipped, loss scale now %s", step,
                 loss_scale(trainer.optimizer))
        return
    counters["nonfinite_in_row"] += 1
    log.warning("step %d: non-finite gradients (norm %s): update skipped (%d in a row)",
                step, grad_norm, counters["nonfinite_in_row"])
    if counters["nonfinite_in_row"] >= cfg.train.max_nonfinite_in_row:
        raise TrainingStopped(
            f"{counters['nonfinite_in_row']} updates in a row had non-finite gradients "
            f"(train.max_nonfinite_in_row={cfg.train.max_nonfinite_in_row}); stopping. Resume from the last "
            f"checkpoint with a lower train.lr or a smaller train.clip_grad.")


def policy_gradients(trainer: Trainer, cfg: Recipe, batch: TrainBatch, mini_batch: MiniBatch, sums: TokenSums) -> None:
    """The mini-batch's loss gradients, final in the DDP grad buffers (reduced over DP): the
    forward/backward of this rank's micro-batches. The sum over micro-batches and ranks is the
    gradient of the mini-batch's loss, whatever the plan's grouping."""
    algo, ro = cfg.algo, cfg.rollout
    correction = ro.correction_mode()  # none | token_tis | icepop | seq_mask_tis
    mini_mask = batch["mask"][mini_batch.rows]  # every DP rank's rows: the loss's normaliser
    fields = ["response_index", "mask", "old_logprobs", "ref_logprobs", "advantages", "rollout_logprobs"]
    mbs = micro_batches(batch, mini_batch.micro, trainer.layout.device, fields)
    scale = len(mbs) * trainer.layout.data  # megatron divides by the micro-batch count, DDP averages over DP

    def loss_fn(logprobs: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        x = mb.extras
        lp = response_values(logprobs, x["response_index"])
        weights, oob = None, {}  # rollout correction: multiplies the policy-gradient loss only; the mask stays 0/1
        if correction != "none":
            weights, frac = correction_weights(correction, x["old_logprobs"], x["rollout_logprobs"], x["mask"],
                                               cap=ro.tis_cap, low=ro.correction_low, high=ro.correction_high)
            units = (x["mask"].sum(1) > 0) if correction == "seq_mask_tis" else x["mask"]  # sequences or tokens
            oob = {"is_oob_frac": frac, "oob_units": float(units.sum())}
        loss, pg, kl, stats = policy_kl_loss(
            lp, x["old_logprobs"], x["ref_logprobs"], x["advantages"], x["mask"], kl_coef=algo.kl_coef,
            kl_estimator=algo.kl_estimator, is_weights=weights, eps_low=algo.eps_low, eps_high=algo.eps_high,
            dual_clip_c=algo.dual_clip_c, agg=algo.loss_agg, kl_input_clamp=algo.kl_input_clamp,
            kl_output_clamp=algo.kl_output_clamp)
        share = aggregation_share(cfg, x["mask"], mini_mask.to(x["mask"].device))
        tokens = float(x["mask"].sum())
        return loss * (share * scale), {"tokens": tokens, "share": share, "loss": float(loss.detach()),
                                        "pg_loss": float(pg.detach()), "kl_loss": float(kl.detach()), **stats, **oob}

    zero_grads(trainer.policy_ddp, trainer.optimizer)
    reports = run_microbatches(trainer.policy_ddp, mbs, vocab_size=trainer.dims.vocab_size, loss_fn=loss_fn,
                               temperature=cfg.rollout.temperature, chunk_tokens=cfg.train.logprob_chunk_tokens,
                               pack=trainer.packed)
    finalize_grads(trainer.policy_ddp)
    losses = ("loss", "pg_loss", "kl_loss")
    if counts_for_stats(trainer):
        for report in reports:
            for name in losses:  # the shares add up to the mini-batch's loss under any aggregation
                sums.add(name, report[name] * report["share"], 0.0)
            t = report["tokens"]
            for name in ("clip_frac", "clip_frac_high", "clip_frac_low", "dual_clip_frac", "approx_kl", "ratio_mean"):
                sums.add(name, report[name] * t, t)
            sums.add_max("ratio_max", report["ratio_max"])
            if "is_oob_frac" in report:  # outside the correction's band: of tokens, or of sequences (seq_mask_tis)
                sums.add("is_oob_frac", report["is_oob_frac"] * report["oob_units"], report["oob_units"])
    if dist.get_rank() == 0:  # one count per mini-batch: the metric is the mean of the mini-batch losses
        for name in losses:
            sums.add(name, 0.0, 1.0)


def step_means(cfg: Recipe, sums: TokenSums) -> dict[str, float]:
    """The step's training metrics: token-weighted means (maxima for ``*_max``) over ranks."""
    return sums.means(
        ["entropy", "kl_ref", "mismatch_mean", "loss", "pg_loss", "kl_loss", "clip_frac", "clip_frac_high",
         "clip_frac_low", "dual_clip_frac", "approx_kl", "ratio_mean", "grad_norm"]
        + (["is_oob_frac"] if cfg.rollout.correction_mode() != "none" else []),
        ["mismatch_max", "ratio_max"])


# --------------------------------------------------------------------------------------
# The engine, evaluation, settings
# --------------------------------------------------------------------------------------


def sync_engine(run: Run, step: int, samples: list[Sample]) -> dict[str, float]:
    """The policy's weights into the engine (and, every ``rollout.check_sync_every`` steps, the
    parity check on a few of the step's sequences); returns the sync's metrics."""
    from prorl_megatron.rollout.weight_sync import check_sync, sync_tolerance, sync_weights

    cfg, t = run.recipe, run.trainer
    free_training_memory()  # before the engine wakes up and takes its memory back
    out: dict[str, float] = {}
    sync = sync_weights(t.policy, t.dims, run.sampler.engine, cfg.precision.params_dtype,
                        cfg.rollout.sync_bucket_mib << 20)
    out["sync/bytes"] = sync.bytes
    if cfg.rollout.check_sync_every and step % cfg.rollout.check_sync_every == 0:
        longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens - 1  # vLLM's limit
        parity = check_sync(t.policy, t.dims, run.sampler.engine,
                            [(s.prompt_ids + s.response_ids)[:longest] for s in samples[:4]],
                            sync_tolerance(cfg.precision.params_dtype))
        out.update({f"sync/logprob_diff_{k}": v for k, v in parity.items()})
    return out


def free_training_memory() -> None:
    """Return the update's cached allocations to the device before vLLM wakes (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.debug("training memory freed")


def validate(run: Run, step: int) -> dict[str, float]:
    from prorl_megatron.eval import evaluate

    prompts = run.sampler.usable_val_prompts(run.recipe.rollout.max_prompt_tokens)
    table = evaluate(run.sampler.engine, run.sampler.pool, prompts, run.recipe)
    run.state.last_val_reward = table["reward"]
    return {f"val/{k}": v for k, v in table.items()}


def step_settings(run: Run) -> dict[str, Any]:
    """The settings the step trained with: the stage, the learning rate, fp16's loss scale."""
    out: dict[str, Any] = {"lr": run.recipe.train.lr}
    if run.recipe.stages:
        out["stage"] = run.state.control.stage
    scale = loss_scale(run.trainer.optimizer)
    if scale is not None:
        out["loss_scale"] = scale
    return out


def should_checkpoint(cfg: Recipe, step: int) -> bool:
    every = cfg.checkpoint.every_n_steps
    return step == cfg.train.steps or bool(every and step % every == 0)


# --------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------


def check_recipe(recipe: Recipe, overrides: tuple[str, ...] = ()) -> tuple[Path, ModelDims, Any, Any]:
    """Everything about the recipe that can fail, checked before any model is built (the memory
    plan of every stage's recipe too; ``overrides``: the command line's, on top of each stage's).

    Returns the HF config directory, the model's dims, the train rows and the val rows.
    """
    check_packages()
    model = recipe.model
    if model.mcore_ckpt:
        hf_dir = hf_config_dir(model.mcore_ckpt)
    elif model.hf_path:
        hf_dir = Path(model.hf_path)
    else:
        raise ConfigError("recipe: set model.hf_path or model.mcore_ckpt")
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"model: {hf_dir}/config.json not found (model.hf_path / model.mcore_ckpt)")
    dims = model_dims(read_hf_config(str(hf_dir)))
    transformer_config(dims, recipe.precision, recipe.parallel.tensor, recipe.parallel.pipeline,
                       recipe.parallel.sequence_parallel, use_te=None)
    if not recipe.data.train_files:
        raise ConfigError("recipe: data.train_files is empty")
    train_rows = load_rows(recipe.data.train_files, recipe.data.on_bad_row).rows
    val_rows = load_rows(recipe.data.val_files, recipe.data.on_bad_row).rows if recipe.data.val_files else []
    if recipe.eval.every_n_steps and not val_rows:
        raise ConfigError("eval.every_n_steps > 0 needs data.val_files")
    check_trackers(recipe.logging.tensorboard, recipe.logging.wandb)
    find_checkpoint(recipe.checkpoint.dir, recipe.checkpoint.resume)  # a bad resume target fails here
    device_bytes, on_gpu = device_memory_bytes()  # this GPU, or this host's RAM over its processes
    world_size, te = read_launch_env().world_size, transformer_engine_available()
    for index in range(max(len(recipe.stages), 1)):  # every stage's recipe (e.g. 16k responses) must fit
        staged = stage_recipe(recipe, index, overrides) if index else recipe
        name = f" (stage {index} {recipe.stages[index].name!r})" if recipe.stages else ""
        try:  # a ConfigError with the table and the knobs to turn
            memory = check_fits(staged, dims, world_size, device_bytes, te=te, on_gpu=on_gpu)
        except ConfigError as e:
            raise ConfigError(f"memory plan{name}: {e}") from None
        log.info("memory plan%s: %s", name, memory.verdict())
        log.debug("memory plan%s:\n%s", name, memory.table())
    return hf_dir, dims, train_rows, val_rows


# what a training run imports beyond this module (which imports without them: the GPU check and
# the tests drive the training passes where no engine or verifier is installed)
RUN_PACKAGES = {"vllm": "vLLM, the rollout engine", "datasets": "Hugging Face datasets, which reads the data files",
                "math_verify": "math-verify, the math and STEM verifier", "reasoning_gym": "reasoning-gym, the logic "
                "verifier", "if_verifiable": "if-verifiable, the instruction-following verifier"}


def check_packages() -> None:
    """A clear error naming every package a training run needs that is not installed here."""
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:
            return False

    missing = [f"{name} ({what})" for name, what in RUN_PACKAGES.items() if not installed(name)]
    if missing:
        raise ConfigError("a training run needs packages that are not installed here: " + "; ".join(missing)
                          + ". Install the project with its dependencies: scripts/install.sh cpu (or gpu, as the "
                          "Docker image does)")


def build_trainer(recipe: Recipe, dims: ModelDims, hf_dir: Path, layout: Layout, pad_id: int = 0) -> Trainer:
    """What trains: the policy with the recipe's weights (``model.mcore_ckpt``, else
    ``model.hf_path``), the reference a copy of it, megatron's optimizer over the policy, and
    the packing decision. Collective (after :func:`~prorl_megatron.parallel.init_parallel`)."""
    policy, policy_ddp = build_policy(dims, recipe.precision, recipe.train)
    reference, reference_module = build_reference(dims, recipe.precision)
    if recipe.model.mcore_ckpt:
        load_model(policy, recipe.model.mcore_ckpt)
    else:
        reader = HFReader(hf_dir)
        load_hf_weights(policy, reader.get, dims)
        reader.close()
    copy_weights(policy, reference)
    optimizer = build_optimizer(policy_ddp, recipe.train, recipe.precision)
    return Trainer(layout=layout, dims=dims, hf_dir=hf_dir, pad_id=pad_id, policy=policy, policy_ddp=policy_ddp,
                   reference=reference, reference_module=reference_module, optimizer=optimizer,
                   packed=packing_decision(recipe, policy), cost=cost_model(dims, policy.config))


def packing_decision(recipe: Recipe, policy: Any) -> bool:
    """Whether micro-batches are packed: ``train.sequence_packing`` where the attention kernels
    take packed sequences; otherwise the reason is said once and the token budget is used."""
    if not recipe.train.sequence_packing:
        return False
    reason = packing_unavailable_reason(policy)
    if not any_rank(reason is not None):  # every rank must plan alike (TE importable on some nodes only?)
        return True
    reason = reason or "another rank's attention cannot take packed sequences"
    log.warning("train.sequence_packing is off here: %s; micro-batches are padded rows under the token budget "
                "instead", reason)
    return False


def stage_recipes(recipe: Recipe, overrides: tuple[str, ...]) -> list[Recipe]:
    """Every stage's recipe, the command line's ``overrides`` on top (one for a recipe without stages)."""
    return resolve_stages(recipe, overrides) if recipe.stages else [recipe]


def setup(recipe: Recipe, overrides: tuple[str, ...] = ()) -> Run:
    """Everything the loop holds, resumed from the latest checkpoint where there is one (in its
    stage: that stage's recipe, ``overrides`` — the command line's — on top)."""
    from transformers import AutoTokenizer

    from prorl_megatron.data.chat import encode
    from prorl_megatron.rewards.pool import RewardPool, pool_settings
    from prorl_megatron.rollout.engine import RolloutEngine

    hf_dir, dims, train_rows, val_rows = check_recipe(recipe, overrides)
    checkpoint = find_checkpoint(recipe.checkpoint.dir, recipe.checkpoint.resume)
    resumed = recipe_to_resume(recipe, overrides, read_meta(checkpoint)["loop"] if checkpoint else None)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=recipe.model.trust_remote_code)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    layout = init_parallel(recipe.parallel.tensor, recipe.parallel.pipeline, seed=recipe.seed)
    domains = {r.domain for r in train_rows + val_rows}
    pool = RewardPool(resumed.rewards.workers, pool_settings(resumed.rewards), code="code" in domains)
    trainer = build_trainer(resumed, dims, hf_dir, layout, pad)
    engine = RolloutEngine(str(hf_dir), resumed.rollout, resumed.precision, resumed.seed, load_weights=False)

    def encode_row(row: Any) -> EncodedPrompt:
        return encode(row, tokenizer, recipe.data.apply_chat_template)

    sampler = Sampler(engine=engine, pool=pool, mixture=PromptMixture(train_rows, recipe.data.domain_weights or None,
                                                                       recipe.data.shuffle_seed),
                      encode=encode_row, val_prompts=list(map(encode_row, val_rows)))
    rank0 = dist.get_rank() == 0
    run = Run(trainer=trainer, sampler=sampler, state=LoopState(control=Controller(stage_recipes(recipe, overrides))),
              writer=MetricsWriter(recipe.logging.dir, enabled=False), progress=Progress(0, 0, enabled=False),
              overrides=overrides)
    if checkpoint is not None:
        restore(run, checkpoint)
        log.info("resumed from %s (step %d)", checkpoint, run.state.step)
    if rank0:
        (Path(recipe.checkpoint.dir) / STOPPED_FILE).unlink(missing_ok=True)
    run.writer = MetricsWriter(recipe.logging.dir, enabled=rank0, resume_step=run.state.step,
                               tensorboard=recipe.logging.tensorboard, wandb=recipe.logging.wandb,
                               wandb_project=recipe.logging.wandb_project, run_name=recipe.name,
                               config=to_dict(recipe))
    log.info("model %s: %d layers, hidden %d; %d processes: TP %d x PP %d x DP %d; %d train / %d val prompts",
             hf_dir, dims.num_layers, dims.hidden_size, trainer.layout.world_size, trainer.layout.tensor,
             trainer.layout.pipeline, trainer.layout.data, len(train_rows),
             len(sampler.usable_val_prompts(run.recipe.rollout.max_prompt_tokens)))
    run.progress = Progress(recipe.train.steps, run.state.step, enabled=rank0)
    return run


def passes_only(recipe: Recipe) -> Trainer:
    """What trains, alone (no engine, data, verifiers or writers): for benchmarks and tests that
    drive :func:`old_and_reference_logprobs`, :func:`policy_gradients` and :func:`update_policy`
    on batches of their own. Collective: initialises the process group like :func:`setup`."""
    hf_dir = Path(recipe.model.hf_path)
    layout = init_parallel(recipe.parallel.tensor, recipe.parallel.pipeline, seed=recipe.seed)
    return build_trainer(recipe, model_dims(read_hf_config(str(hf_dir))), hf_dir, layout)


def train(recipe: Recipe, overrides: tuple[str, ...] = (), record: Optional[Callable[[int, list[Sample]], None]] = None
          ) -> Run:
    """Run (or continue) the recipe to ``train.steps``; return the finished run. ``overrides``:
    the command line's, already in ``recipe``; with ``stages:`` they stay on top of every stage.
    ``record``: called with each step's kept samples (the replay recorder, prorl_megatron/replay.py)."""
    run = setup(recipe, tuple(overrides))
    run.record = record
    install_signal_handlers(run)
    fill_engine(run)  # the engine starts with random weights: it gets the policy's (fresh or resumed)
    if run.state.step == 0 and run.recipe.stages:
        run.writer.event(0, "stage", stage=run.state.control.stage_name, index=0, reason="the run starts in it")
    if run.state.step == 0 and run.recipe.eval.every_n_steps:
        run.writer.write(0, validate(run, 0))
    try:
        while run.state.step < recipe.train.steps:  # a stage does not change the run's length
            start = loop_state(run), rng_states()
            step = run.state.step = run.state.step + 1
            try:
                metrics = train_step(run, step)
            except StepAbandoned:
                stop_before(run, step, start)
            except RollBack as back:  # a health alarm: redo the steps since the checkpoint before it
                roll_back(run, back)
                continue
            run.progress.update(metrics)
            every = run.recipe.logging.console_every
            if every and step % every == 0:
                run.progress.write(console_line(step, metrics))
    finally:
        run.progress.close()
        run.writer.close()
        run.sampler.pool.close()
    return run


def console_line(step: int, m: dict[str, Any]) -> str:
    parts = [f"step {step}", f"reward {m.get('reward/mean', 0):.3f}", f"kl_ref {m.get('kl_ref', 0):.4f}",
             f"entropy {m.get('entropy', 0):.3f}", f"kept {m.get('sampling/kept_frac', 0):.2f}",
             f"len {m.get('response_length/mean', 0):.1f}", f"{m.get('time/step', 0):.1f}s"]
    if "val/pass@1" in m:
        parts.append(f"val pass@1 {m['val/pass@1']:.3f}")
    alarms = [k.split("/", 1)[1] for k in m if k.startswith("health/")]
    if alarms:
        parts.append(f"ALARM {','.join(alarms)}")
    return " | ".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    """Train; the exit status: 0 finished, 2 a recipe/data/checkpoint error or an unrecoverable
    run (the message says which), 3 stopped by a signal (checkpointed; the job script requeues),
    4 stopped by a health check (checkpointed; not requeued: look at the run before resuming)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    from prorl_megatron import run_log

    try:
        recipe = recipe_from_args(args)
        # before megatron and vLLM are imported (their notices come at import): library output
        # and every rank's log go to train.log, the console keeps rank 0's own lines and the bar
        with run_log.routed(recipe.logging.dir) as log_file:
            log.info("%s: %d steps; every rank's log, library messages included: %s", recipe.name,
                     recipe.train.steps, log_file)
            train(recipe, tuple(args.overrides))
    except StopRequested as e:
        print(str(e), file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except HealthStopped as e:
        print(str(e), file=sys.stderr, flush=True)
        return EXIT_UNHEALTHY
    except (ConfigError, CheckpointError, DataError, TrainingStopped) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
