"""ProRL training: one process per device, launched by torchrun or srun.

    torchrun --nproc_per_node 2 -m prorl_megatron.train --recipe recipes/tiny_cpu.yaml [key.sub=value ...]

:func:`train_step` is the whole algorithm, top to bottom: rollout -> reward -> dynamic
sampling -> advantages -> old/reference logprobs -> mini-batch updates -> weight sync ->
evaluation -> reference reset (or the next stage of a staged recipe: a reset, then the stage's
settings applied live; prorl_megatron/stages.py) -> health checks -> metrics -> checkpoint.
Every rank runs the same control flow on the same batch (rollouts and rewards are gathered
everywhere); the Megatron passes split the rows over data-parallel ranks, and only the last
pipeline stage sees logprobs.
SIGUSR1/SIGTERM (Slurm's warning signal) are read after each rollout round (the step is then
abandoned, the previous one checkpointed, and the step redone after the resume) and at the end
of the step (checkpointed); the process then exits with status 3.
The recipe's ``health:`` checks (prorl_megatron/health.py) watch each step's metrics: an alarm
warns, resets the reference, stops (the step checkpointed, exit status 4, not requeued) or rolls
back to the newest checkpoint before its first bad step and redoes the steps with other seeds.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from prorl_megatron.algo import (
    ResetEvent, ResetScheduler, compute_advantages, correction_weights, keep_informative_groups, kl_penalty,
    logprob_mismatch, policy_kl_loss, scheduled_cosine_length_rewards,
)
from prorl_megatron.checkpoint.dist_ckpt import hf_config_dir, load_model
from prorl_megatron.checkpoint.hf_io import CheckpointError, HFReader
from prorl_megatron.checkpoint.train_state import (
    checkpoint_before, find_checkpoint, load_checkpoint, read_meta, restore_rng, rewind_checkpoints, rng_states,
    save_checkpoint,
)
from prorl_megatron.checkpoint.transfer import load_hf_weights
from prorl_megatron.collect import any_rank, gather_lists
from prorl_megatron import stages
from prorl_megatron.config import (
    ConfigError, Recipe, add_recipe_arguments, recipe_from_args, stage_overridden, stage_recipe, to_dict,
)
from prorl_megatron.data.chat import EncodedPrompt, encode
from prorl_megatron.data.dataset import DataError, PromptMixture, load_rows
from prorl_megatron.eval import evaluate, score_rollouts
from prorl_megatron.health import CHECKS, Alarm, HealthWatcher
from prorl_megatron.metrics import MetricsWriter, PhaseTimer, Progress, TokenSums, check_trackers
from prorl_megatron.models.architectures import ModelDims, model_dims, read_hf_config
from prorl_megatron.models.forward import MicroBatch, packing_unavailable_reason, run_microbatches
from prorl_megatron.models.gpt import transformer_config, transformer_engine_available
from prorl_megatron.models.policy import (
    build_optimizer, build_policy, build_reference, copy_weights, finalize_grads, optimizer_state_is_empty,
    loss_scale, optimizer_step, reset_optimizer_state, set_learning_rate, still_calibrating, zero_grads,
)
from prorl_megatron.parallel import Layout, init_parallel, read_launch_env
from prorl_megatron.plan import check_fits, cost_model, device_memory_bytes
from prorl_megatron.rewards.pool import RewardPool, pool_settings
from prorl_megatron.rollout.batch import (
    MiniBatch, Sample, TrainBatch, make_batch, micro_batches, response_values, training_plan,
)
from prorl_megatron.rollout.seeds import rollout_base_seed
from prorl_megatron.rollout.weight_sync import SYNC_TOLERANCES, SyncTolerance, check_sync, sync_weights

log = logging.getLogger("prorl_megatron.train")


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite updates in a row); the message says why."""


class StopRequested(Exception):
    """SIGUSR1/SIGTERM arrived; the step finished and a checkpoint was written."""


class StepAbandoned(Exception):
    """A stop signal arrived during the step's rollout, before anything of the step was applied."""


class HealthStopped(Exception):
    """A health check with action ``stop`` fired; the step was checkpointed."""


class RollBack(Exception):
    """Health alarms with action ``rollback`` after step ``step``: go back to checkpoint ``path``."""

    def __init__(self, step: int, path: Path, alarms: list[Alarm]) -> None:
        super().__init__(step, path)
        self.step, self.path, self.alarms = step, path, alarms


EXIT_STOPPED = 3  # exit status after a signal-triggered checkpoint: not finished, resume me
EXIT_UNHEALTHY = 4  # exit status after a health check's stop (checkpointed): look before resuming
STOPPED_FILE = "stopped"  # in checkpoint.dir after a signal-triggered checkpoint; removed on start


@dataclass
class Run:
    """Everything the loop holds, built once by :func:`setup`."""

    recipe: Recipe
    layout: Layout
    dims: ModelDims
    hf_dir: Path
    pad_id: int
    policy: Any  # GPTModel shard (what is saved and synced)
    policy_ddp: Any  # what is trained
    reference: Any  # GPTModel shard, frozen
    reference_module: Any  # what is run
    optimizer: Any
    engine: Any
    pool: RewardPool
    mixture: PromptMixture
    encode: Any  # PromptRow -> EncodedPrompt
    val_prompts: list[EncodedPrompt]
    scheduler: ResetScheduler
    writer: MetricsWriter
    progress: Progress
    step: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {"skipped_updates": 0, "nonfinite_in_row": 0,
                                                               "too_long_prompts": 0, "resets": 0, "rollbacks": 0})
    health: Optional[HealthWatcher] = None
    last_val_reward: Optional[float] = None
    packed: bool = False  # train.sequence_packing, where the attention kernels take packed sequences
    stop_signal: list[int] = field(default_factory=list)
    saved_step: Optional[int] = None  # the newest checkpoint this run wrote or resumed from
    stages: stages.StageTracker = field(default_factory=lambda: stages.StageTracker([]))
    overrides: tuple[str, ...] = ()  # the command line's: they win over every stage's settings


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One ProRL step (collective); returns its metrics."""
    cfg, timer = run.recipe, PhaseTimer()
    start = time.perf_counter()

    # 1-3. rollout -> reward -> dynamic sampling (more rounds until the batch is full)
    samples, metrics = collect_samples(run, step, timer)
    if not samples:
        log.warning("step %d: no prompt group with a reward signal after %d rounds; no update",
                    step, metrics["sampling/rounds"])
    else:
        run.engine.sleep()  # its memory goes to the training passes; the sync below brings it back
        # 4. advantages, per token, from the group rewards
        batch = make_batch(samples, run.pad_id)
        if cfg.rollout.truncated == "mask":
            batch["mask"] = batch["mask"] & ~batch["truncated"].unsqueeze(1)
        batch["advantages"] = compute_advantages(
            cfg.algo.advantage, batch["rewards"], batch["group_ids"], batch["mask"],
            **({"scale_by_std": cfg.algo.scale_by_std} if cfg.algo.advantage == "grpo" else {}))
        groups = [[i for i, s in enumerate(samples) if s.group == g] for g in range(samples[-1].group + 1)]
        plan = training_plan(groups, cfg.train.mini_batch_prompts, run.layout.data, run.layout.dp_rank,
                             cfg.train.micro_batch_size, (batch["prompt_len"] + batch["response_len"]).tolist(),
                             cfg.train.max_tokens_per_micro_batch, run.packed, cost_model(run.dims, run.policy.config))
        sums = TokenSums()

        # 5. old-policy and reference logprobs (no grad), entropy, KL to the reference
        with timer("logprob"):
            old_and_reference_logprobs(run, batch, plan, sums)

        # 6. policy updates: one optimizer step per mini-batch
        with timer("update"):
            for mini_batch in plan:
                update_policy(run, batch, mini_batch, sums)

        # 7. weight sync: the engine samples the next step with the updated policy
        free_training_memory()  # before the engine wakes up and takes its memory back
        with timer("sync"):
            sync = sync_weights(run.policy, run.dims, run.engine, cfg.precision.params_dtype,
                                cfg.rollout.sync_bucket_mib << 20)
            metrics["sync/bytes"] = sync.bytes
            if cfg.rollout.check_sync_every and step % cfg.rollout.check_sync_every == 0:
                longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens - 1  # vLLM's limit
                parity = check_sync(run.policy, run.dims, run.engine,
                                    [(s.prompt_ids + s.response_ids)[:longest] for s in samples[:4]],
                                    sync_tolerance(cfg))
                metrics.update({f"sync/logprob_diff_{k}": v for k, v in parity.items()})
        metrics.update(sums.means(
            ["entropy", "kl_ref", "mismatch_mean", "loss", "pg_loss", "kl_loss", "clip_frac", "clip_frac_high",
             "clip_frac_low", "dual_clip_frac", "approx_kl", "ratio_mean", "grad_norm"]
            + (["is_oob_frac"] if cfg.rollout.correction_mode() != "none" else []),
            ["mismatch_max", "ratio_max"]))
        metrics["updates"] = len(plan)
        metrics["tokens"] = int(batch["mask"].sum())

    # 8. evaluation (pass@k on held-out prompts; the plateau trigger's signal)
    if cfg.eval.every_n_steps and (step % cfg.eval.every_n_steps == 0 or step == cfg.train.steps):
        with timer("eval"):
            metrics.update(validate(run, step))

    # 9. reference reset: reference <- policy, optimizer state <- fresh; or the next stage (a
    # reset, then the stage's settings applied to the run)
    if cfg.stages:
        metrics["stage"] = run.stages.index  # the stage this step ran in
    signals = {"kl": metrics.get("kl_ref", 0.0), "entropy": metrics.get("entropy", math.nan),
               **({"val_reward": run.last_val_reward} if "val/reward" in metrics else {})}
    event = run.scheduler.observe(step, signals)
    entry = run.stages.observe(step, signals)
    if entry is not None:
        enter_stage(run, step, entry)
        metrics["reset"] = 1
    elif event is not None:
        reset_reference(run, step, event)
        metrics["reset"] = 1

    # 10. health checks on the complete metrics: warn, reset; a rollback leaves here, a stop after 11
    metrics["lr"] = cfg.train.lr
    scale = loss_scale(run.optimizer)
    if scale is not None:
        metrics["loss_scale"] = scale
    metrics.update(run.counters)
    halt = act_on_alarms(run, step, metrics)

    # 11. checkpoint, then 12. the step's metrics record (a logged checkpoint step is on disk)
    stopping = signal_received(run)
    if should_checkpoint(cfg, step) or stopping or halt:
        with timer("checkpoint"):
            save(run, step)
    metrics.update(timer.metrics())
    metrics["time/step"] = time.perf_counter() - start
    metrics["tokens_per_s"] = metrics.get("tokens", 0) / metrics["time/step"]
    run.writer.write(step, metrics)
    if halt:
        raise HealthStopped(f"health check {halt.check}: {halt.message}; checkpointed step {step} in "
                            f"{cfg.checkpoint.dir}. Look at the run before resuming (checkpoint.resume=auto)")
    if stopping:
        stop(run, step)
    return metrics


def collect_samples(run: Run, step: int, timer: PhaseTimer) -> tuple[list[Sample], dict[str, Any]]:
    """Generate and score groups until ``train.prompts_per_step`` groups carry signal (with
    ``algo.dynamic_sampling``) or ``algo.max_sampling_rounds`` is spent; metrics cover every
    sample generated."""
    cfg = run.recipe
    target = cfg.train.prompts_per_step
    kept: list[list[Sample]] = []
    every: list[Sample] = []
    drawn, rounds = 0, 0
    while len(kept) < target and rounds < (cfg.algo.max_sampling_rounds if cfg.algo.dynamic_sampling else 1):
        rounds += 1
        missing = target - len(kept)
        keep_rate = len(kept) / drawn if drawn else 1.0
        count = min(target, math.ceil(missing / max(keep_rate, 0.1)))
        prompts = draw_prompts(run, count)
        drawn += count
        with timer("rollout"):  # the engine is awake with the policy's weights since the last sync
            # after a rollback the redone steps sample with another key (hashed from seed + count)
            seed = rollout_base_seed(cfg.seed + run.counters["rollbacks"], step, rounds - 1,
                                     rounds_per_step=cfg.algo.max_sampling_rounds, prompts_per_round=target,
                                     n=cfg.rollout.n)  # one stream per sample
            rollouts = run.engine.generate_global([p.ids for p in prompts], seed=seed)
        with timer("reward"):
            rewards = score_rollouts(run.pool, prompts, rollouts)
        if signal_received(run):  # nothing of this step is applied yet: it is redone after the resume
            raise StepAbandoned(step)
        round_groups = []
        for prompt, outs, rs in zip(prompts, rollouts, rewards):
            group = []
            for out, reward in zip(outs, rs):
                if out.truncated and cfg.rollout.truncated == "zero_reward":
                    reward = 0.0
                group.append(Sample(prompt.ids, out.response_ids, out.logprobs, reward, out.truncated,
                                    prompt.row.domain, group=-1))
            round_groups.append(group)
            every.extend(group)
        if cfg.algo.dynamic_sampling:
            flat = [s for g in round_groups for s in g]
            keep = keep_informative_groups(torch.tensor([s.reward for s in flat]),
                                           torch.tensor([i for i, g in enumerate(round_groups) for _ in g]))
            keep_group = keep.view(len(round_groups), -1).all(dim=1).tolist() if flat else []
            round_groups = [g for g, k in zip(round_groups, keep_group) if k]
        kept.extend(round_groups)
    kept = kept[:target]
    samples = []
    for g, group in enumerate(kept):
        for s in group:
            s.group = g
            samples.append(s)
    metrics = {**rollout_metrics(every), "sampling/rounds": rounds, "sampling/prompts": drawn,
               "sampling/kept_groups": len(kept), "sampling/kept_frac": len(kept) / max(drawn, 1)}
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
        for row in run.mixture.next(count - len(out)):
            prompt = run.encode(row)
            if len(prompt.ids) > run.recipe.rollout.max_prompt_tokens:
                run.counters["too_long_prompts"] += 1
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


def counts_for_stats(run: Run) -> bool:
    """This rank holds a distinct copy of the last stage's values (TP peers hold the same)."""
    return run.layout.is_last_stage and run.layout.tp_rank == 0


def old_and_reference_logprobs(run: Run, batch: TrainBatch, plan: list[MiniBatch], sums: TokenSums) -> None:
    """Fill ``old_logprobs`` and ``ref_logprobs`` [N, R] for this rank's rows (last stage)."""
    cfg = run.recipe
    n, width = batch["mask"].shape
    batch["old_logprobs"] = torch.zeros(n, width)
    batch["ref_logprobs"] = torch.zeros(n, width)
    fields = ["response_index", "mask", "rollout_logprobs"]
    for mini_batch in plan:
        mbs = micro_batches(batch, mini_batch.micro, run.layout.device, fields)
        with torch.no_grad():
            policy = run_microbatches(run.policy_ddp, mbs, vocab_size=run.dims.vocab_size, with_entropy=True,
                                      temperature=cfg.rollout.temperature,
                                      chunk_tokens=cfg.train.logprob_chunk_tokens, pack=run.packed)
            reference = run_microbatches(run.reference_module, mbs, vocab_size=run.dims.vocab_size,
                                         temperature=cfg.rollout.temperature,
                                         chunk_tokens=cfg.train.logprob_chunk_tokens, pack=run.packed)
        for rows, mb, both, ref in zip(mini_batch.micro, mbs, policy, reference):
            index, mask = mb.extras["response_index"], mb.extras["mask"]
            old = response_values(both[0], index)
            entropy = response_values(both[1], index)
            ref_lp = response_values(ref, index)
            r = old.shape[1]
            batch["old_logprobs"][rows, :r] = old.float().cpu()
            batch["ref_logprobs"][rows, :r] = ref_lp.float().cpu()
            if counts_for_stats(run):
                tokens = float(mask.sum())
                m = mask.float()
                sums.add("entropy", float((entropy * m).sum()), tokens)
                sums.add("kl_ref", float((kl_penalty(old, ref_lp, cfg.algo.kl_estimator) * m).sum()), tokens)
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


def update_policy(run: Run, batch: TrainBatch, mini_batch: MiniBatch, sums: TokenSums) -> None:
    """Forward/backward of this rank's micro-batches, DP grad reduction, one optimizer step."""
    cfg = run.recipe
    policy_gradients(run, batch, mini_batch, sums)
    stepped, grad_norm = optimizer_step(run.optimizer)
    if dist.get_rank() == 0:
        sums.add("grad_norm", grad_norm if math.isfinite(grad_norm) else 0.0, 1.0)
    if stepped:
        run.counters["nonfinite_in_row"] = 0
        return
    run.counters["skipped_updates"] += 1
    if still_calibrating(run.optimizer):  # fp16: the loss scale backs off from its high start
        log.info("step %d: fp16 gradient overflow: update skipped, loss scale now %s", run.step,
                 loss_scale(run.optimizer))
        return
    run.counters["nonfinite_in_row"] += 1
    log.warning("step %d: non-finite gradients (norm %s): update skipped (%d in a row)",
                run.step, grad_norm, run.counters["nonfinite_in_row"])
    if run.counters["nonfinite_in_row"] >= cfg.train.max_nonfinite_in_row:
        raise TrainingStopped(
            f"{run.counters['nonfinite_in_row']} updates in a row had non-finite gradients "
            f"(train.max_nonfinite_in_row={cfg.train.max_nonfinite_in_row}); stopping. Resume from the last "
            f"checkpoint with a lower train.lr or a smaller train.clip_grad.")


def policy_gradients(run: Run, batch: TrainBatch, mini_batch: MiniBatch, sums: TokenSums) -> None:
    """The mini-batch's loss gradients, final in the DDP grad buffers (reduced over DP): the
    forward/backward of this rank's micro-batches. The sum over micro-batches and ranks is the
    gradient of the mini-batch's loss, whatever the plan's grouping."""
    cfg, algo, ro = run.recipe, run.recipe.algo, run.recipe.rollout
    correction = ro.correction_mode()  # none | token_tis | icepop | seq_mask_tis
    mini_mask = batch["mask"][mini_batch.rows]  # every DP rank's rows: the loss's normaliser
    fields = ["response_index", "mask", "old_logprobs", "ref_logprobs", "advantages", "rollout_logprobs"]
    mbs = micro_batches(batch, mini_batch.micro, run.layout.device, fields)
    scale = len(mbs) * run.layout.data  # megatron divides by the micro-batch count, DDP averages over DP

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
            dual_clip_c=algo.dual_clip_c, agg=algo.loss_agg)
        share = aggregation_share(cfg, x["mask"], mini_mask.to(x["mask"].device))
        tokens = float(x["mask"].sum())
        return loss * (share * scale), {"tokens": tokens, "share": share, "loss": float(loss.detach()),
                                        "pg_loss": float(pg.detach()), "kl_loss": float(kl.detach()), **stats, **oob}

    zero_grads(run.policy_ddp, run.optimizer)
    reports = run_microbatches(run.policy_ddp, mbs, vocab_size=run.dims.vocab_size, loss_fn=loss_fn,
                               temperature=cfg.rollout.temperature, chunk_tokens=cfg.train.logprob_chunk_tokens,
                               pack=run.packed)
    finalize_grads(run.policy_ddp)
    losses = ("loss", "pg_loss", "kl_loss")
    if counts_for_stats(run):
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


def sync_tolerance(cfg: Recipe) -> SyncTolerance:
    """The parity check's tolerance for the recipe's dtype. float32 on a GPU computes its matmuls
    in TF32 where allowed (NGC images force it: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1), whose
    10-bit mantissa is float16's: it gets float16's tolerance there."""
    dtype = cfg.precision.params_dtype
    return SYNC_TOLERANCES["float16" if dtype == "float32" and torch.cuda.is_available() else dtype]


def validate(run: Run, step: int) -> dict[str, float]:
    table = evaluate(run.engine, run.pool, usable_val_prompts(run), run.recipe)
    run.last_val_reward = table["reward"]
    return {f"val/{k}": v for k, v in table.items()}


def reset_reference(run: Run, step: int, event: Any) -> None:
    """ProRL's hard reset: the reference becomes the current policy; Adam starts afresh."""
    hard_reset(run)
    run.writer.event(step, "reset", reason=event.reason, triggers=list(event.triggers),
                     optimizer_reset=run.recipe.reset.reset_optimizer)
    run.progress.write(f"step {step}: reference reset ({event.reason})")


def hard_reset(run: Run) -> None:
    copy_weights(run.policy, run.reference)
    if run.recipe.reset.reset_optimizer:
        reset_optimizer_state(run.optimizer)
    run.counters["resets"] += 1


def enter_stage(run: Run, step: int, entry: stages.StageEntry) -> None:
    """The next stage after ``step``: a hard reset (as the paper does between stages), then the
    stage's recipe (the command line's overrides still on top) applied to the live run."""
    hard_reset(run)
    run.scheduler.restart(step)  # the periodic resets count from this one
    new = stage_recipe(run.recipe, entry.index, run.overrides, start=entry.index - 1).validate(
        source=f"stage {entry.index} {entry.name!r}")
    changed, rebuilt = stages.apply_recipe(run, new, rebuild_engine)
    run.writer.event(step, "stage", stage=entry.name, index=entry.index, reason=entry.reason,
                     triggers=list(entry.triggers), changed={k: list(v) for k, v in changed.items()},
                     engine_rebuilt=rebuilt, optimizer_reset=new.reset.reset_optimizer)
    run.progress.write(f"step {step}: stage {entry.index} {entry.name!r} ({entry.reason}): "
                       f"{stages.describe(changed)}; reference reset" + ("; vLLM engine rebuilt" if rebuilt else ""))
    for line in stage_overridden(new, entry.index, run.overrides, first=entry.index):
        log.warning("stage %r: %s", entry.name, line)


def rebuild_engine(run: Run) -> None:
    """A vLLM engine for a new maximum length (a stage change): the old one is shut down, the new
    one built from ``run.recipe`` and given the policy's weights. The process-global RNG states
    (which vLLM reseeds when it starts) are kept as they were."""
    from prorl_megatron.rollout.engine import RolloutEngine

    cfg, rng = run.recipe, rng_states()
    run.engine.shutdown()
    run.engine = RolloutEngine(str(run.hf_dir), cfg.rollout, cfg.precision, cfg.seed, load_weights=False)
    restore_rng(rng)
    fill_engine(run)
    log.debug("vLLM engine rebuilt for max length %d", stages.engine_length(cfg))


def fill_engine(run: Run) -> None:
    """The policy's weights into a fresh engine (it starts with random ones), then the parity
    check where enabled."""
    cfg = run.recipe
    sync_weights(run.policy, run.dims, run.engine, cfg.precision.params_dtype, cfg.rollout.sync_bucket_mib << 20)
    if cfg.rollout.check_sync_every:
        probe = [p.ids for p in usable_val_prompts(run)[:4]] or [[run.pad_id, run.pad_id]]
        check_sync(run.policy, run.dims, run.engine, probe, sync_tolerance(cfg))


def usable_val_prompts(run: Run) -> list[EncodedPrompt]:
    """The validation prompts within the current ``rollout.max_prompt_tokens`` (a stage may change it)."""
    return [p for p in run.val_prompts if len(p.ids) <= run.recipe.rollout.max_prompt_tokens]


# --------------------------------------------------------------------------------------
# Health checks
# --------------------------------------------------------------------------------------


def act_on_alarms(run: Run, step: int, metrics: dict[str, Any]) -> Optional[Alarm]:
    """The health checks on step ``step``'s complete metrics (the same on every rank, so every
    rank decides the same). Each alarm is an event and a warning; ``next_stage`` enters the next
    stage now (a reset, then its settings); ``reset`` resets the reference now; ``rollback``
    raises :class:`RollBack` (with nothing to go back to, it stops instead; a ``stop`` alarm of
    the same step wins); returns the alarm that stops the run after the step's checkpoint, if any."""
    alarms = run.health.observe(step, metrics)
    if not alarms:
        return None
    halt = next((a for a in alarms if a.action == "stop"), None)
    back = [a for a in alarms if a.action == "rollback"]
    if back and halt is None:
        path, why = rollback_target(run, min(a.since for a in back))
        if path is not None:
            raise RollBack(step, path, alarms)  # the step's events go with the discarded steps
        halt = Alarm(step, back[0].check, "stop", f"{back[0].message} (no rollback: {why})", back[0].since)
        alarms = [halt if a is back[0] else a for a in alarms]
    for a in alarms:
        metrics[f"health/{a.check}"] = 1
        run.writer.event(step, "health", **a.to_dict())
        log.warning("step %d: health check %s -> %s: %s", step, a.check, a.action, a.message)
    nexts = [a for a in alarms if a.action == "next_stage"]
    if nexts and "reset" not in metrics:  # not when this step already entered a stage or reset
        reason = "; ".join(f"health check {a.check}: {a.message}" for a in nexts)
        entry = run.stages.advance(step, reason)
        if entry is not None:
            enter_stage(run, step, entry)
            metrics.update({"reset": 1, "resets": run.counters["resets"]})
        else:
            log.warning("step %d: health check asks for the next stage, but %r is the last one", step, run.stages.name)
    resets = [a for a in alarms if a.action == "reset"]
    if resets and "reset" not in metrics:  # not twice when the scheduler reset this step
        reason = "; ".join(f"health check {a.check}: {a.message}" for a in resets)
        reset_reference(run, step, ResetEvent(step, reason, ("health",)))
        metrics.update({"reset": 1, "resets": run.counters["resets"]})
    return halt


def rollback_target(run: Run, since: int) -> tuple[Optional[Path], str]:
    """The newest checkpoint before step ``since`` and in the current stage (collective: rank
    0's listing for every rank), or None and why not."""
    limit = run.recipe.health.max_rollbacks
    if run.counters["rollbacks"] >= limit:
        return None, f"health.max_rollbacks={limit} rollbacks done"
    root = run.recipe.checkpoint.dir
    path = gather_lists([checkpoint_before(root, since) if dist.get_rank() == 0 else None])[0][0]
    if path is None:
        return None, f"no checkpoint before step {since} in {root}"
    if run.stages.index > 0 and int(path.name.split("_")[-1]) < run.stages.entered_step:
        return None, (f"the newest checkpoint before step {since} ({path.name}) is from before stage "
                      f"{run.stages.name!r}, entered after step {run.stages.entered_step}")
    return path, ""


def roll_back(run: Run, back: RollBack) -> None:
    """Go back to checkpoint ``back.path`` in process, as a resume would; the checkpoints and
    metric records of the later steps are discarded (a ``rollback`` event lists them) and the
    steps are redone with other sampling seeds (the rollback count, in the loop state, shifts them)."""
    cfg = run.recipe
    count = run.counters["rollbacks"] + 1
    rewind_checkpoints(cfg.checkpoint.dir, back.path)
    reset_optimizer_state(run.optimizer)  # loaded into an empty optimizer, as at start-up
    restore(run, back.path)
    run.counters["rollbacks"] = count
    sync_weights(run.policy, run.dims, run.engine, cfg.precision.params_dtype, cfg.rollout.sync_bucket_mib << 20)
    discarded = list(range(run.step + 1, back.step + 1))
    run.writer.discard_after(run.step)  # the event is the checkpoint step's: a later rollback to it keeps it
    run.writer.event(run.step, "rollback", alarm_step=back.step, discarded=discarded, rollbacks=count,
                     alarms=[a.to_dict() for a in back.alarms])
    run.progress.rewind(run.step)
    log.warning("step %d: health rollback %d to the checkpoint of step %d (steps %s discarded): %s", back.step,
                count, run.step, discarded, "; ".join(f"{a.check}: {a.message}" for a in back.alarms))


# --------------------------------------------------------------------------------------
# Checkpoints and signals
# --------------------------------------------------------------------------------------


def should_checkpoint(cfg: Recipe, step: int) -> bool:
    every = cfg.checkpoint.every_n_steps
    return step == cfg.train.steps or bool(every and step % every == 0)


def loop_state(run: Run) -> dict[str, Any]:
    return copy.deepcopy({"scheduler": run.scheduler.state_dict(), "data": run.mixture.state_dict(),
                          "counters": dict(run.counters), "last_val_reward": run.last_val_reward,
                          "health": run.health.state_dict(), "stage": run.stages.state_dict()})


def load_loop_state(run: Run, state: dict[str, Any]) -> None:
    run.scheduler.load_state_dict(state["scheduler"])
    run.mixture.load_state_dict(state["data"])
    run.counters.update(state["counters"])
    run.last_val_reward = state["last_val_reward"]
    if "health" in state:  # checkpoints from before the health checks start with empty streaks
        run.health.load_state_dict(state["health"])
    if "stage" in state:  # absent from checkpoints older than stages
        run.stages.load_state_dict(state["stage"])


def stop(run: Run, step: int) -> None:
    """After the checkpoint of ``step``: leave the marker for the job script and stop."""
    cfg = run.recipe
    if dist.get_rank() == 0:  # for the job script: every rank may not exit with status 3 under srun
        (Path(cfg.checkpoint.dir) / STOPPED_FILE).write_text(f"{step}\n")
    raise StopRequested(f"stop signal received: checkpointed step {step} in {cfg.checkpoint.dir}; "
                        "resume with checkpoint.resume=auto")


def stop_before(run: Run, step: int, start: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """A stop signal came during step ``step``'s rollout: go back to the step's start (data
    position, counters, RNG states), checkpoint step ``step - 1`` if it is not on disk, stop."""
    state, rng = start
    load_loop_state(run, state)
    restore_rng(rng)
    done = step - 1
    if done > 0 and run.saved_step != done:  # every rank knows the same: no file read decides a collective
        save(run, done)
    run.progress.write(f"step {step}: stop signal during the rollout: the step is redone after the resume")
    stop(run, done)


def save(run: Run, step: int) -> None:
    cfg = run.recipe
    save_checkpoint(cfg.checkpoint.dir, step, run.policy, run.reference, run.optimizer, run.hf_dir,
                    loop_state(run), optimizer_state_is_empty(run.optimizer), cfg.checkpoint.keep_last)
    run.saved_step = step


def resume(run: Run) -> None:
    """Continue from ``checkpoint.resume`` (auto: the latest complete checkpoint), if any."""
    path = find_checkpoint(run.recipe.checkpoint.dir, run.recipe.checkpoint.resume)
    if path is None:
        return
    restore(run, path)
    log.info("resumed from %s (step %d)", path, run.step)


def restore(run: Run, path: Path) -> None:
    """Load checkpoint ``path``: models, optimizer, RNG states, loop state, step."""
    meta = load_checkpoint(path, run.policy, run.reference, run.optimizer)
    set_learning_rate(run.optimizer, run.recipe.train.lr)  # the recipe's (stage's, command line's), not the saved one
    load_loop_state(run, meta["loop"])
    run.step = run.saved_step = int(meta["step"])


def install_signal_handlers(run: Run) -> None:
    """SIGUSR1/SIGTERM: finish the step, checkpoint, exit (see :func:`signal_received`)."""
    def handler(signum: int, frame: Any) -> None:
        run.stop_signal.append(signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)


def free_training_memory() -> None:
    """Return the update's cached allocations to the device before vLLM wakes (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.debug("training memory freed")


def signal_received(run: Run) -> bool:
    """Collective: did any rank get a stop signal? (srun signals ranks at slightly different times)."""
    return any_rank(bool(run.stop_signal))


# --------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------


def check_recipe(recipe: Recipe, overrides: tuple[str, ...] = ()) -> tuple[Path, ModelDims, Any, Any]:
    """Everything about the recipe that can fail, checked before any model is built (the memory
    plan of every stage's recipe too; ``overrides``: the command line's, on top of each stage's).

    Returns the HF config directory, the model's dims, the train rows and the val rows.
    """
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


def build_models(recipe: Recipe, dims: ModelDims, hf_dir: Path) -> tuple[Any, Any, Any, Any, Any]:
    """``(policy, policy_ddp, reference, reference_module, optimizer)``: the policy with the
    recipe's weights (``model.mcore_ckpt``, else ``model.hf_path``), the reference a copy of it,
    megatron's optimizer over the policy. Collective (after :func:`init_parallel`)."""
    policy, policy_ddp = build_policy(dims, recipe.precision, recipe.train)
    reference, reference_module = build_reference(dims, recipe.precision)
    if recipe.model.mcore_ckpt:
        load_model(policy, recipe.model.mcore_ckpt)
    else:
        reader = HFReader(hf_dir)
        load_hf_weights(policy, reader.get, dims)
        reader.close()
    copy_weights(policy, reference)
    return policy, policy_ddp, reference, reference_module, build_optimizer(policy_ddp, recipe.train, recipe.precision)


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


def setup(recipe: Recipe, overrides: tuple[str, ...] = ()) -> Run:
    """Everything the loop holds, resumed from the latest checkpoint where there is one (in its
    stage: that stage's recipe, ``overrides`` — the command line's — on top)."""
    from transformers import AutoTokenizer

    from prorl_megatron.rollout.engine import RolloutEngine

    hf_dir, dims, train_rows, val_rows = check_recipe(recipe, overrides)
    checkpoint = find_checkpoint(recipe.checkpoint.dir, recipe.checkpoint.resume)
    recipe = stages.recipe_to_resume(recipe, overrides, read_meta(checkpoint)["loop"] if checkpoint else None)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=recipe.model.trust_remote_code)
    layout = init_parallel(recipe.parallel.tensor, recipe.parallel.pipeline, seed=recipe.seed)
    domains = {r.domain for r in train_rows + val_rows}
    pool = RewardPool(recipe.rewards.workers, pool_settings(recipe.rewards), code="code" in domains)

    policy, policy_ddp, reference, reference_module, optimizer = build_models(recipe, dims, hf_dir)

    engine = RolloutEngine(str(hf_dir), recipe.rollout, recipe.precision, recipe.seed, load_weights=False)

    def encode_row(row: Any) -> EncodedPrompt:
        return encode(row, tokenizer, recipe.data.apply_chat_template)

    val_prompts = list(map(encode_row, val_rows))  # filtered by rollout.max_prompt_tokens where used
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rank0 = dist.get_rank() == 0
    run = Run(recipe=recipe, layout=layout, dims=dims, hf_dir=hf_dir, pad_id=pad, policy=policy,
              policy_ddp=policy_ddp, reference=reference, reference_module=reference_module, optimizer=optimizer,
              engine=engine, pool=pool,
              mixture=PromptMixture(train_rows, recipe.data.domain_weights or None, recipe.data.shuffle_seed),
              encode=encode_row, val_prompts=val_prompts, scheduler=stages.reset_scheduler(recipe),
              writer=MetricsWriter(recipe.logging.dir, enabled=False), progress=Progress(0, 0, enabled=False),
              packed=packing_decision(recipe, policy), stages=stages.StageTracker(recipe.stages), overrides=overrides,
              health=HealthWatcher(recipe.health.nonfinite, **{c: getattr(recipe.health, c) for c in CHECKS}))
    resume(run)
    if rank0:
        (Path(recipe.checkpoint.dir) / STOPPED_FILE).unlink(missing_ok=True)
    run.writer = MetricsWriter(recipe.logging.dir, enabled=rank0, resume_step=run.step,
                               tensorboard=recipe.logging.tensorboard, wandb=recipe.logging.wandb,
                               wandb_project=recipe.logging.wandb_project, run_name=recipe.name,
                               config=to_dict(recipe))
    log.info("model %s: %d layers, hidden %d; %d processes: TP %d x PP %d x DP %d; %d train / %d val prompts",
             hf_dir, dims.num_layers, dims.hidden_size, layout.world_size, layout.tensor, layout.pipeline,
             layout.data, len(train_rows), len(usable_val_prompts(run)))
    run.progress = Progress(recipe.train.steps, run.step, enabled=rank0)
    return run


def passes_only(recipe: Recipe) -> Run:
    """A :class:`Run` that holds only what the training passes read (layout, models, optimizer,
    counters): no engine, data, verifiers or writers. For benchmarks and tests that drive
    :func:`old_and_reference_logprobs`, :func:`policy_gradients` and :func:`update_policy` on
    batches of their own. Collective: initialises the process group like :func:`setup`."""
    hf_dir = Path(recipe.model.hf_path)
    dims = model_dims(read_hf_config(str(hf_dir)))
    layout = init_parallel(recipe.parallel.tensor, recipe.parallel.pipeline, seed=recipe.seed)
    policy, policy_ddp, reference, reference_module, optimizer = build_models(recipe, dims, hf_dir)
    return Run(recipe=recipe, layout=layout, dims=dims, hf_dir=hf_dir, pad_id=0, policy=policy, policy_ddp=policy_ddp,
               reference=reference, reference_module=reference_module, optimizer=optimizer, engine=None, pool=None,
               mixture=None, encode=None, val_prompts=[], scheduler=None, writer=None, progress=None,
               packed=packing_decision(recipe, policy))


def train(recipe: Recipe, overrides: tuple[str, ...] = ()) -> Run:
    """Run (or continue) the recipe to ``train.steps``; return the finished run. ``overrides``:
    the command line's, already in ``recipe``; with ``stages:`` they stay on top of every stage."""
    run = setup(recipe, tuple(overrides))
    install_signal_handlers(run)
    fill_engine(run)  # the engine starts with random weights: it gets the policy's (fresh or resumed)
    if run.step == 0 and run.recipe.stages:
        run.writer.event(0, "stage", stage=run.stages.name, index=0, reason="the run starts in it")
    if run.step == 0 and run.recipe.eval.every_n_steps:
        run.writer.write(0, validate(run, 0))
    try:
        while run.step < recipe.train.steps:  # a stage does not change the run's length
            start = loop_state(run), rng_states()
            run.step += 1
            try:
                metrics = train_step(run, run.step)
            except StepAbandoned:
                run.step -= 1
                stop_before(run, run.step + 1, start)
            except RollBack as back:  # a health alarm: redo the steps since the checkpoint before it
                roll_back(run, back)
                continue
            run.progress.update(metrics)
            every = run.recipe.logging.console_every
            if every and run.step % every == 0:
                run.progress.write(console_line(run.step, metrics))
    finally:
        run.progress.close()
        run.writer.close()
        run.pool.close()
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
