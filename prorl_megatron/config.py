"""The whole ProRL recipe as typed dataclasses, loaded from ``recipes/*.yaml``.

A recipe is one YAML file whose top-level keys are the sections below. Every field has a
default, so a recipe only states what differs. Command-line overrides use dotted keys::

    python -m prorl_megatron.config --recipe recipes/tiny_cpu.yaml algo.eps_high=0.28 rollout.n=8

Values are parsed as YAML scalars/lists (``rollout.stop=['</answer>']``, ``reset.after_steps=null``)
and coerced to the field's declared type. Unknown keys are errors that name the key, where it
came from, and the closest valid names; a value of the wrong type names the field and the
expected type; cross-field problems (batch sizes that do not divide, a reset with no trigger)
are caught by :meth:`Recipe.validate` before anything is built.

``stages:`` lists ProRL's training stages (:class:`StageConfig`): each names the dotted keys it
changes and when the run enters it. Stage ``k``'s recipe is the file's, then the overrides of
stages 0..k in order, then the command line's (which always win); every stage's recipe is
resolved and validated at load, its errors naming the stage and the key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional

import yaml

from prorl_megatron.seeds import TRAINING_SPAN, training_seeds_used

if TYPE_CHECKING:
    from prorl_megatron.algo.triggers import TriggerSpec

AdvantageName = Literal["grpo", "rloo", "reinforce_pp_baseline"]
KLEstimator = Literal["k1", "abs", "k2", "k3"]
AggMode = Literal[
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]
Domain = Literal["math", "code", "stem", "logic", "instruction"]
Correction = Literal["none", "token_tis", "seq_mask_tis", "icepop"]  # algo/rollout_correction.py
HealthAction = Literal["warn", "reset", "next_stage", "stop", "rollback"]  # prorl_megatron/control/decide.py


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what and where."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which network is trained. Weights come from ``mcore_ckpt`` if set, else ``hf_path``."""

    hf_path: str = ""  # HF directory: config.json, tokenizer files, optionally safetensors
    mcore_ckpt: Optional[str] = None  # Megatron dist checkpoint made by tools/convert_hf.py
    trust_remote_code: bool = False


@dataclass
class PrecisionConfig:
    """Numerics of training. FP8 needs Transformer Engine (absent on CPU: an error there)."""

    params_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    fp8: Optional[Literal["e4m3", "hybrid"]] = None  # None: no FP8
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    grad_reduce_in_fp32: bool = True
    # float16 only: the dynamic loss scale's start (halved on each overflow, that update skipped;
    # torch AMP's default, where megatron's 2**32 would skip the first ~30 updates of a run)
    initial_loss_scale: float = 65536.0


@dataclass
class ParallelConfig:
    """Training layout; data parallel size = world size / (tensor * pipeline)."""

    tensor: int = 1
    pipeline: int = 1
    sequence_parallel: bool = False  # not supported yet (Recipe.validate refuses true)


@dataclass
class RolloutConfig:
    """vLLM generation. Logprobs are those of the sampling distribution (after temperature)."""

    n: int = 16  # samples per prompt (GRPO group size)
    temperature: float = 1.2  # ProRL samples at 1.2
    top_p: float = 1.0  # must be 1 (see Recipe.validate); evaluation has its own eval.top_p
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 8192  # 8k, then 16k in ProRL's last stage
    stop: list[str] = field(default_factory=list)
    engine_tensor_parallel: int = 1  # vLLM TP; may differ from training TP
    gpu_memory_utilization: float = 0.5
    cpu_kvcache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    sleep_between_rollouts: bool = True  # GPU only: release KV cache and weights for training
    truncated: Literal["zero_reward", "mask", "keep"] = "zero_reward"  # overlong responses
    tis_cap: Optional[float] = None  # truncated importance sampling cap C; None: off
    # train/rollout mismatch correction of the policy-gradient loss (prorl_megatron/algo/
    # rollout_correction.py): token_tis min(r, tis_cap); icepop masks tokens with r outside
    # [correction_low, correction_high]; seq_mask_tis masks sequences whose geometric-mean r is
    # outside it. none with tis_cap set is token_tis (the older spelling)
    correction: Correction = "none"
    correction_low: Optional[float] = None  # icepop / seq_mask_tis band (ProRL v2: 0.5, v2.1: 0.999)
    correction_high: Optional[float] = None  # (ProRL v2: 5.0, v2.1: 1.002)
    check_sync_every: int = 0  # engine-vs-policy logprob parity check every N steps; 0: never
    # generation as a stream (prorl_megatron/rollout/stream.py): 0 draws prompts in waves, each
    # once the previous one is done (the rounds of dynamic sampling); x > 0 draws ahead, whenever
    # the groups in flight are not expected to bring 1 + x times what the batch still misses, and
    # ends the step as soon as the batch is full
    overdraw: float = 0.0
    # the samples still in flight when the batch is full (overdraw > 0): abort them, or carry them
    # into the next step, where they continue with its weights (each token tagged with the policy
    # version that sampled it)
    partial: Literal["abort", "resume"] = "abort"
    # a group trains only if its oldest token is at most this many policy versions behind the
    # policy being trained (0: on-policy); staler groups are dropped and counted
    max_staleness: int = 0
    sync_bucket_mib: int = 256  # weight sync moves full tensors in buckets of at most this size

    def correction_mode(self) -> str:
        """The correction in effect: ``correction``, or ``token_tis`` for none + ``tis_cap``."""
        return "token_tis" if self.correction == "none" and self.tis_cap is not None else self.correction


@dataclass
class AlgoConfig:
    """The RL objective (GRPO + DAPO clip-higher + token-level loss + KL to a reference)."""

    advantage: AdvantageName = "grpo"
    scale_by_std: bool = True  # False: Dr. GRPO (r - group mean)
    eps_low: float = 0.2  # DAPO decoupled clipping, lower
    eps_high: float = 0.4  # ProRL uses 0.4 (DAPO 0.28)
    dual_clip_c: Optional[float] = 3.0  # dual-clip bound for negative advantages; None: off
    loss_agg: AggMode = "token-mean"  # DAPO token-level loss
    kl_coef: float = 1e-4  # beta of the KL penalty to the reference policy
    kl_estimator: KLEstimator = "k3"
    # NeMo-RL's calculate_kl clamps: log(ref/policy) into [-x, x] before the estimator, the
    # estimate into [-y, y] after it; null: the estimator's own (k3: 20 and 10, the others none)
    kl_input_clamp: Optional[float] = None
    kl_output_clamp: Optional[float] = None
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal, refill
    # waves of prompts allowed to fill a batch when nothing is drawn ahead (rollout.overdraw 0):
    # the rounds of dynamic sampling; it also sizes the step's seed layout (prorl_megatron/seeds.py)
    max_sampling_rounds: int = 4
    # prompts drawn per step at most; null: max_sampling_rounds x train.prompts_per_step
    max_prompts_per_step: Optional[int] = None

    def prompts_cap(self, prompts_per_step: int) -> int:
        """The most prompts a step draws (``max_prompts_per_step``, or its default)."""
        return self.max_prompts_per_step or self.max_sampling_rounds * prompts_per_step


@dataclass
class TrainConfig:
    """Batch sizes, optimizer and run length."""

    steps: int = 2000
    prompts_per_step: int = 256
    mini_batch_prompts: int = 64  # prompts per optimizer update (256/64 = 4 updates per step)
    micro_batch_size: int = 4  # sequences per forward/backward when max_tokens_per_micro_batch is null
    # token budget of one micro-batch (rows x padded length, or packed tokens): rows are spread
    # over DP ranks by tokens and grouped by length under it; null: micro_batch_size rows
    max_tokens_per_micro_batch: Optional[int] = None
    # several sequences per micro-batch row (THD layout, cu_seqlens) where Transformer Engine's
    # attention takes them; without TE a start-up message says so and the token budget is used
    sequence_packing: bool = False
    recompute: Literal["none", "selective", "full"] = "none"  # megatron's activation recompute
    distributed_optimizer: bool = False  # megatron's DistributedOptimizer: Adam state sharded over DP
    logprob_chunk_tokens: int = 4096  # tokens per chunk of the vocab-parallel logprob pass
    lr: float = 2e-6  # constant, AdamW
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    max_nonfinite_in_row: int = 3  # stop the run after this many skipped updates in a row


@dataclass
class TriggerConfig:
    """When to act (prorl_megatron/algo/triggers.py): the first of these conditions that holds;
    null turns a condition off. The shape of ``reset:`` and of every stage's ``enter:``; the
    health checks are single-threshold views of the same trigger (:func:`health_spec`).

    For ``reset:`` the clock is the last reset (scheduled, a health check's or a stage entry's);
    for a stage's ``enter:``, the step the previous stage was entered. A step without the metric
    (no update) neither extends nor breaks a streak.
    """

    ALIASES: ClassVar[dict[str, str]] = {"every_n_steps": "after_steps", "min_gap_steps": "min_steps"}

    after_steps: Optional[int] = None  # this many steps since the clock started (reset: every N steps)
    kl_threshold: Optional[float] = None  # kl_ref (mean KL to the reference) above this ...
    kl_window: int = 1  # ... for this many consecutive steps
    entropy_floor: Optional[float] = None  # the policy's mean token entropy below this ...
    entropy_window: int = 1  # ... for this many consecutive steps
    plateau_window: Optional[int] = None  # validation reward not improved for W evaluations ...
    plateau_delta: float = 0.0  # ... by more than this
    min_steps: int = 0  # no condition fires before this many steps since the clock started

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.after_steps, self.kl_threshold, self.entropy_floor,
                                           self.plateau_window))

    def problems(self, where: str) -> list[str]:
        """What is wrong with the settings, each message naming ``where`` (``reset``, ``stages[1].enter``)."""
        out = []
        for key, low in (("after_steps", 1), ("plateau_window", 1), ("kl_window", 1), ("entropy_window", 1),
                         ("min_steps", 0)):
            value = getattr(self, key)
            if value is not None and value < low:
                out.append(f"{where}.{key} must be >= {low}{' (or null)' if key in ('after_steps', 'plateau_window') else ''}"
                           f", got {value}")
        for key in ("kl_threshold", "entropy_floor"):
            value = getattr(self, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                out.append(f"{where}.{key} must be > 0 (or null), got {value}")
        return out

    def spec(self) -> "TriggerSpec":
        """The trigger these settings describe."""
        from prorl_megatron.algo.triggers import Threshold, TriggerSpec  # torch-free here: config imports no torch

        thresholds = []
        if self.kl_threshold is not None:
            thresholds.append(Threshold("kl_ref", ">", self.kl_threshold, self.kl_window, name="kl"))
        if self.entropy_floor is not None:
            thresholds.append(Threshold("entropy", "<", self.entropy_floor, self.entropy_window, name="entropy"))
        return TriggerSpec(after_steps=self.after_steps, thresholds=tuple(thresholds),
                           plateau_window=self.plateau_window, plateau_delta=self.plateau_delta,
                           min_steps=self.min_steps)


@dataclass
class ResetConfig(TriggerConfig):
    """When the reference policy (and optimizer state) is hard-reset to the current policy: a
    trigger (:class:`TriggerConfig`) whose clock is the last reset. ``every_n_steps`` and
    ``min_gap_steps`` are the older names of ``after_steps`` and ``min_steps``."""

    reset_optimizer: bool = True  # ProRL resets the optimizer state with the reference


StageTrigger = TriggerConfig  # a stage's ``enter:``

# health check -> (the metric it reads, the comparison that makes a value bad); reward_floor also
# needs every reward/mean/<domain> at or below its threshold
HEALTH_CHECKS: dict[str, tuple[str, str]] = {
    "entropy_floor": ("entropy", "<"),
    "kl_ref_ceiling": ("kl_ref", ">"),
    "approx_kl_ceiling": ("approx_kl", ">"),
    "mismatch_ceiling": ("mismatch_mean", ">"),
    "truncated_ceiling": ("response_length/truncated_frac", ">"),
    "reward_floor": ("reward/mean", "<="),
}


@dataclass
class HealthCheck:
    """One health check (prorl_megatron/control/decide.py): off while ``threshold`` is null;
    the trigger of :func:`health_spec`."""

    threshold: Optional[float] = None  # the floor or ceiling of the check's metric
    window: int = 1  # consecutive steps beyond the threshold before the alarm
    # warn: an event and a console line; reset: the reference + optimizer reset; stop: checkpoint
    # this step, exit with status 4; rollback: back to the newest checkpoint before the first bad
    # step, the steps after it redone with other sampling seeds
    action: HealthAction = "warn"


@dataclass
class HealthConfig:
    """Per-step checks on the step's metrics, each off until its threshold is set."""

    entropy_floor: HealthCheck = field(default_factory=HealthCheck)  # entropy < threshold: collapse
    kl_ref_ceiling: HealthCheck = field(default_factory=HealthCheck)  # kl_ref (KL to the reference) >
    approx_kl_ceiling: HealthCheck = field(default_factory=HealthCheck)  # approx_kl (to the old policy) >
    mismatch_ceiling: HealthCheck = field(default_factory=HealthCheck)  # mismatch_mean (train/rollout) >
    truncated_ceiling: HealthCheck = field(default_factory=HealthCheck)  # response_length/truncated_frac >
    reward_floor: HealthCheck = field(default_factory=HealthCheck)  # reward/mean and every domain's <=
    nonfinite: Optional[HealthAction] = None  # a NaN/inf among the step's metrics: this action; null: off
    max_rollbacks: int = 3  # rollbacks per run; a rollback alarm past them stops the run instead


def health_spec(name: str, check: HealthCheck) -> "TriggerSpec":
    """Health check ``name`` (a key of :data:`HEALTH_CHECKS`) as the one trigger type: its metric
    beyond ``check.threshold`` for ``check.window`` consecutive steps."""
    from prorl_megatron.algo.triggers import Threshold, TriggerSpec

    metric, op = HEALTH_CHECKS[name]
    return TriggerSpec(thresholds=(Threshold(metric, op, check.threshold, check.window, name=name,
                                             every_prefix="reward/mean/" if name == "reward_floor" else None),))


@dataclass
class DataConfig:
    """Prompt datasets: local jsonl/parquet files in the project's schema."""

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    domain_weights: dict[str, float] = field(default_factory=dict)  # empty: natural mixture
    shuffle_seed: int = 0
    on_bad_row: Literal["error", "skip"] = "error"  # skip: counted and logged, never silent
    apply_chat_template: bool = True


@dataclass
class LengthPenaltyConfig:
    """ProRL v2's scheduled cosine length penalty (prorl_megatron/algo/length_penalty.py): a
    response's reward becomes v1 + (v0 - v1)(1 + cos(pi L / rollout.max_response_tokens)) / 2,
    (v0, v1) = ``correct`` if its verifier reward > ``threshold`` else ``wrong``, during
    ``on_steps`` steps of every ``on_steps + off_steps`` from ``start_step``. Metrics and
    dynamic sampling see the verifier rewards; advantages see the shaped ones."""

    kind: Literal["none", "cosine"] = "none"
    correct: list[float] = field(default_factory=lambda: [1.0, 0.5])  # reward at length 0, at the limit
    wrong: list[float] = field(default_factory=lambda: [0.0, 0.0])
    threshold: float = 0.5  # a verifier reward above this counts as correct
    on_steps: int = 100  # ProRL v2 blog: "100 updates on, 500 off"
    off_steps: int = 500
    start_step: int = 1  # the first step of the first "on" window (steps count from 1)


@dataclass
class RewardsConfig:
    """Verifiers; each runs in a worker process with a per-sample timeout."""

    workers: int = 8
    timeout_s: float = 10.0
    code_sandbox: Literal["bwrap", "none"] = "bwrap"
    allow_unsandboxed: bool = False  # must be True to run model code with code_sandbox=none
    code_cpu_s: float = 5.0
    code_memory_mib: int = 1024
    strip_think: bool = True  # score only what follows </think>; an unclosed think scores 0
    length_penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)


@dataclass
class BenchmarkConfig:
    """The paper's evaluation protocol (``python -m prorl_megatron.benchmarks``); the defaults are ProRL's
    (arXiv:2505.24864, section 4, as recalled: vLLM, 16 samples per prompt, temperature 0.6, top-p 0.95,
    32k response tokens; pass@1 the mean over the samples)."""

    n_samples: int = 16  # samples per prompt; pass@k (unbiased) for k up to this
    temperature: float = 0.6  # also DeepSeek-R1's recommended sampling temperature
    top_p: float = 0.95
    max_response_tokens: int = 32768  # capped per benchmark at the model's context minus its longest prompt
    apply_chat_template: bool = True  # the tokenizer's chat template, the whole prompt in one user turn
    instructions: bool = True  # append each benchmark's answer-format instruction (false: the bare problem)
    ks: list[int] = field(default_factory=list)  # pass@k reported; empty: 1, 2, 4, ... and n_samples
    choice_seed: int = 0  # GPQA's answer order: simple-evals' random.Random(seed) permutations, in file order


@dataclass
class EvalConfig:
    """Pass@k on held-out prompts, also the reset scheduler's plateau signal."""

    every_n_steps: int = 0  # 0: never during training
    n_samples: int = 16
    ks: list[int] = field(default_factory=lambda: [1, 16])
    temperature: float = 0.6
    top_p: float = 1.0  # nucleus sampling for evaluation only (training rollouts refuse top_p < 1)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)  # python -m prorl_megatron.benchmarks


@dataclass
class CheckpointConfig:
    """Atomic, resumable checkpoints (megatron dist checkpoints + loop state)."""

    dir: str = "runs/checkpoints"
    every_n_steps: int = 50
    keep_last: int = 3
    resume: str = "auto"  # auto | none | a checkpoint directory


@dataclass
class LoggingConfig:
    """Where metrics go. JSONL is always written."""

    dir: str = "runs/logs"
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "prorl-megatron"
    console_every: int = 1


@dataclass
class StageConfig:
    """One ProRL stage: a name, the recipe keys it changes, and when the run enters it (the
    first stage has no trigger: a run starts there)."""

    name: str = ""
    # dotted recipe keys -> values (rollout.max_response_tokens: 16384), typed like command-line
    # overrides; they stay in force in later stages unless one changes them again
    overrides: dict[str, Any] = field(default_factory=dict)
    # when the run leaves the previous stage for this one (a trigger whose clock is the previous
    # stage's entry); entering a stage also resets the reference and the optimizer
    enter: Optional[TriggerConfig] = None


# The keys a stage may change: what the loop reads afresh every step, or what entering a stage
# applies (prorl_megatron/control/apply.py: lr into the optimizer, sampling into the engine, which
# is rebuilt when rollout.max_prompt_tokens + max_response_tokens changes, weights into the data
# mixture; reset.* is the stage's reset schedule). The rest is fixed for a run (models, layout,
# data files, verifier pool, paths, run length).
STAGE_KEYS = (
    "rollout.n", "rollout.temperature", "rollout.max_prompt_tokens", "rollout.max_response_tokens", "rollout.stop",
    "rollout.truncated", "rollout.tis_cap", "rollout.correction", "rollout.correction_low",
    "rollout.correction_high", "rollout.check_sync_every", "rollout.sync_bucket_mib",
    "algo.", "train.lr", "train.prompts_per_step", "train.mini_batch_prompts", "train.micro_batch_size",
    "train.max_tokens_per_micro_batch", "train.logprob_chunk_tokens", "train.max_nonfinite_in_row",
    "reset.", "data.domain_weights", "rewards.length_penalty.", "eval.", "checkpoint.every_n_steps",
    "checkpoint.keep_last", "logging.console_every",
)


def stage_key_allowed(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) or key.startswith(k + ".") for k in STAGE_KEYS)


@dataclass
class Recipe:
    """A whole ProRL run."""

    name: str = "prorl"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage, the recipe as is

    def validate(self, source: str = "recipe") -> "Recipe":
        """Check constraints between fields; raise :class:`ConfigError` naming the fields."""
        problems: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        positive_ints = {
            "parallel.tensor": self.parallel.tensor,
            "parallel.pipeline": self.parallel.pipeline,
            "rollout.n": self.rollout.n,
            "rollout.max_prompt_tokens": self.rollout.max_prompt_tokens,
            "rollout.max_response_tokens": self.rollout.max_response_tokens,
            "rollout.engine_tensor_parallel": self.rollout.engine_tensor_parallel,
            "rollout.sync_bucket_mib": self.rollout.sync_bucket_mib,
            "algo.max_sampling_rounds": self.algo.max_sampling_rounds,
            "train.steps": self.train.steps,
            "train.prompts_per_step": self.train.prompts_per_step,
            "train.mini_batch_prompts": self.train.mini_batch_prompts,
            "train.micro_batch_size": self.train.micro_batch_size,
            "train.logprob_chunk_tokens": self.train.logprob_chunk_tokens,
            "train.max_nonfinite_in_row": self.train.max_nonfinite_in_row,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "eval.n_samples": self.eval.n_samples,
            "rewards.workers": self.rewards.workers,
        }
        for name, value in positive_ints.items():
            need(value >= 1, f"{name} must be >= 1, got {value}")
        non_negative_ints = {
            "rollout.check_sync_every": self.rollout.check_sync_every,
            "eval.every_n_steps": self.eval.every_n_steps,
            "checkpoint.every_n_steps": self.checkpoint.every_n_steps,
            "logging.console_every": self.logging.console_every,
        }
        for name, value in non_negative_ints.items():
            need(value >= 0, f"{name} must be >= 0, got {value}")

        need(0.0 <= self.algo.eps_low < 1.0, f"algo.eps_low must be in [0, 1), got {self.algo.eps_low}")
        need(self.algo.eps_high >= 0.0, f"algo.eps_high must be >= 0, got {self.algo.eps_high}")
        if self.algo.dual_clip_c is not None:
            need(self.algo.dual_clip_c > 1.0, f"algo.dual_clip_c must be > 1 (or null), got {self.algo.dual_clip_c}")
        need(self.algo.kl_coef >= 0.0, f"algo.kl_coef must be >= 0, got {self.algo.kl_coef}")
        for name in ("kl_input_clamp", "kl_output_clamp"):
            value = getattr(self.algo, name)
            need(value is None or (value > 0 and math.isfinite(value)), f"algo.{name} must be > 0 (or null), got {value}")
        need(not self.parallel.sequence_parallel,
             "parallel.sequence_parallel=true is not supported yet: the models are built without it and the "
             "chunked logprob head expects the whole sequence on every TP rank; leave it false")
        need(self.rollout.temperature > 0.0, f"rollout.temperature must be > 0, got {self.rollout.temperature}")
        need(self.rollout.overdraw >= 0.0 and math.isfinite(self.rollout.overdraw),
             f"rollout.overdraw must be >= 0 (0: waves, as the rounds of dynamic sampling), got {self.rollout.overdraw}")
        need(self.rollout.partial == "abort" or (self.rollout.overdraw > 0 and self.rollout.max_staleness >= 1),
             "rollout.partial=resume carries samples into the next step, a policy version later: it needs "
             "rollout.overdraw > 0 (the step ends before they are done) and rollout.max_staleness >= 1")
        need(self.rollout.max_staleness >= 0, f"rollout.max_staleness must be >= 0, got {self.rollout.max_staleness}")
        cap = self.algo.max_prompts_per_step
        need(cap is None or cap >= self.train.prompts_per_step,
             f"algo.max_prompts_per_step ({cap}) must be >= train.prompts_per_step ({self.train.prompts_per_step}) or null")
        need(
            self.rollout.top_p == 1.0,
            f"rollout.top_p must be 1.0, got {self.rollout.top_p}: vLLM renormalises the sampling distribution "
            "over the top-p nucleus and the trainer's logprobs do not, so the rollout/train logprob mismatch and "
            "the TIS weights (rollout.tis_cap) would be biased; top-p is allowed for evaluation (eval.top_p)",
        )
        need(0.0 < self.eval.top_p <= 1.0, f"eval.top_p must be in (0, 1], got {self.eval.top_p}")
        need(
            0.0 < self.rollout.gpu_memory_utilization <= 1.0,
            f"rollout.gpu_memory_utilization must be in (0, 1], got {self.rollout.gpu_memory_utilization}",
        )
        if self.rollout.tis_cap is not None:
            need(self.rollout.tis_cap > 0.0, f"rollout.tis_cap must be > 0 (or null), got {self.rollout.tis_cap}")
        self._validate_correction(need)
        need(self.train.lr > 0.0, f"train.lr must be > 0, got {self.train.lr}")
        need(self.train.clip_grad >= 0.0, f"train.clip_grad must be >= 0 (0: off), got {self.train.clip_grad}")
        need(
            self.train.mini_batch_prompts <= self.train.prompts_per_step
            and self.train.prompts_per_step % max(self.train.mini_batch_prompts, 1) == 0,
            f"train.prompts_per_step ({self.train.prompts_per_step}) must be a multiple of "
            f"train.mini_batch_prompts ({self.train.mini_batch_prompts})",
        )
        if self.train.max_tokens_per_micro_batch is not None:
            longest = self.rollout.max_prompt_tokens + self.rollout.max_response_tokens
            need(
                self.train.max_tokens_per_micro_batch >= longest,
                f"train.max_tokens_per_micro_batch ({self.train.max_tokens_per_micro_batch}) must hold the longest "
                f"sequence, rollout.max_prompt_tokens + rollout.max_response_tokens = {longest}",
            )
        need(
            self.train.max_tokens_per_micro_batch is not None
            or (self.train.mini_batch_prompts * self.rollout.n) % max(self.train.micro_batch_size, 1) == 0,
            f"a mini-batch of train.mini_batch_prompts x rollout.n = "
            f"{self.train.mini_batch_prompts * self.rollout.n} sequences must be a multiple of "
            f"train.micro_batch_size ({self.train.micro_batch_size})",
        )
        seeds = training_seeds_used(self.train.steps, self.algo.max_sampling_rounds, self.train.prompts_per_step,
                                    self.rollout.n, self.algo.prompts_cap(self.train.prompts_per_step))
        seeds *= 2 if self.rollout.partial == "resume" else 1  # carried samples' continuations
        need(
            seeds <= TRAINING_SPAN,
            f"(train.steps + 1) x algo.max_sampling_rounds x train.prompts_per_step x rollout.n = {seeds} "
            f"sampling seeds exceed the {TRAINING_SPAN} distinct ones a run has (prorl_megatron/seeds.py)",
        )
        need(self.rewards.timeout_s > 0, f"rewards.timeout_s must be > 0, got {self.rewards.timeout_s}")
        need(
            self.rewards.code_sandbox != "none" or self.rewards.allow_unsandboxed,
            "rewards.code_sandbox=none runs model-written code on the host: set "
            "rewards.allow_unsandboxed=true to accept that explicitly",
        )
        for domain, weight in self.data.domain_weights.items():
            need(
                domain in typing.get_args(Domain),
                f"data.domain_weights: unknown domain {domain!r}; valid: {', '.join(typing.get_args(Domain))}",
            )
            need(weight >= 0.0 and math.isfinite(weight), f"data.domain_weights.{domain} must be >= 0, got {weight}")
        if self.data.domain_weights:
            need(sum(self.data.domain_weights.values()) > 0, "data.domain_weights must not all be 0")
        self._validate_length_penalty(need)
        self._validate_health(need)
        need(self.eval.temperature >= 0.0, f"eval.temperature must be >= 0, got {self.eval.temperature}")
        need(self.eval.temperature > 0.0 or self.eval.n_samples == 1,
             f"eval.temperature=0 is greedy decoding: eval.n_samples must be 1, got {self.eval.n_samples}")
        for k in self.eval.ks:
            need(
                1 <= k <= self.eval.n_samples,
                f"eval.ks: every k must be in [1, eval.n_samples={self.eval.n_samples}], got {k}",
            )
        bench = self.eval.benchmark
        need(bench.n_samples >= 1, f"eval.benchmark.n_samples must be >= 1, got {bench.n_samples}")
        need(bench.temperature > 0.0 or bench.n_samples == 1,
             f"eval.benchmark.temperature must be > 0 (or n_samples 1), got {bench.temperature}")
        need(0.0 < bench.top_p <= 1.0, f"eval.benchmark.top_p must be in (0, 1], got {bench.top_p}")
        need(bench.max_response_tokens >= 1,
             f"eval.benchmark.max_response_tokens must be >= 1, got {bench.max_response_tokens}")
        for k in bench.ks:
            need(1 <= k <= bench.n_samples,
                 f"eval.benchmark.ks: every k must be in [1, eval.benchmark.n_samples={bench.n_samples}], got {k}")

        for problem in self.reset.problems("reset"):
            need(False, problem)
        if self.reset.plateau_window is not None:
            need(
                self.eval.every_n_steps > 0,
                "reset.plateau_window needs validation rewards: set eval.every_n_steps > 0",
            )
        need(
            self.checkpoint.resume in ("auto", "none") or bool(self.checkpoint.resume),
            "checkpoint.resume must be auto, none or a checkpoint directory",
        )
        if problems:
            raise ConfigError(f"{source}: invalid recipe:\n  " + "\n  ".join(problems))
        return self

    def _validate_correction(self, need) -> None:
        ro = self.rollout
        band = ro.correction in ("icepop", "seq_mask_tis")
        if ro.correction == "token_tis":
            need(ro.tis_cap is not None, "rollout.correction=token_tis needs its cap: set rollout.tis_cap (e.g. 2.0)")
        if band:
            need(ro.tis_cap is None, f"rollout.tis_cap is token_tis's cap; rollout.correction={ro.correction} uses "
                                     "rollout.correction_low/correction_high instead: set rollout.tis_cap=null")
            need(ro.correction_low is not None and ro.correction_high is not None,
                 f"rollout.correction={ro.correction} needs its band: set rollout.correction_low and "
                 "rollout.correction_high (ProRL v2 icepop: 0.5, 5.0; ProRL v2.1 seq_mask_tis: 0.999, 1.002)")
            if ro.correction_low is not None and ro.correction_high is not None:
                need(0.0 <= ro.correction_low <= ro.correction_high and ro.correction_high > 0.0,
                     f"rollout.correction_low/correction_high must satisfy 0 <= low <= high, high > 0, got "
                     f"{ro.correction_low}, {ro.correction_high}")
        else:
            unused = [k for k in ("correction_low", "correction_high") if getattr(ro, k) is not None]
            need(not unused, f"rollout.{' and rollout.'.join(unused)} set but rollout.correction={ro.correction} "
                             "does not use a band (icepop and seq_mask_tis do)")

    def _validate_health(self, need) -> None:
        h = self.health
        checks = {name: getattr(h, name) for name in HEALTH_CHECKS}
        for name, check in checks.items():
            need(check.window >= 1, f"health.{name}.window must be >= 1, got {check.window}")
            if check.threshold is None:
                continue
            need(math.isfinite(check.threshold), f"health.{name}.threshold must be finite (or null), "
                                                 f"got {check.threshold}")
            if name in ("kl_ref_ceiling", "approx_kl_ceiling", "mismatch_ceiling"):
                need(check.threshold > 0, f"health.{name}.threshold must be > 0 (or null: off), got {check.threshold}")
            if name == "truncated_ceiling":
                need(0 <= check.threshold < 1, f"health.truncated_ceiling.threshold is a fraction of responses: it "
                                               f"must be in [0, 1) (or null: off), got {check.threshold}")
            if name == "entropy_floor":
                need(check.threshold > 0, f"health.entropy_floor.threshold must be > 0 (or null: off), "
                                          f"got {check.threshold}")
        need(h.max_rollbacks >= 0, f"health.max_rollbacks must be >= 0, got {h.max_rollbacks}")
        rolling = [f"health.{n}" for n, c in checks.items() if c.threshold is not None and c.action == "rollback"]
        rolling += ["health.nonfinite"] if h.nonfinite == "rollback" else []
        staging = [f"health.{n}" for n, c in checks.items() if c.threshold is not None and c.action == "next_stage"]
        staging += ["health.nonfinite"] if h.nonfinite == "next_stage" else []
        need(not staging or len(self.stages) > 1,
             f"{', '.join(staging)}: action next_stage needs a stages: list of at least two stages")
        need(not rolling or self.checkpoint.every_n_steps > 0,
             f"{', '.join(rolling)}: action rollback goes back to a checkpoint: set checkpoint.every_n_steps > 0")

    def _validate_length_penalty(self, need) -> None:
        lp = self.rewards.length_penalty
        for name in ("correct", "wrong"):
            values = getattr(lp, name)
            need(len(values) == 2 and all(math.isfinite(v) for v in values),
                 f"rewards.length_penalty.{name} must be two finite numbers [at length 0, at the length limit], "
                 f"got {values}")
        need(lp.on_steps >= 1, f"rewards.length_penalty.on_steps must be >= 1, got {lp.on_steps}")
        need(lp.off_steps >= 0, f"rewards.length_penalty.off_steps must be >= 0, got {lp.off_steps}")
        need(lp.start_step >= 0, f"rewards.length_penalty.start_step must be >= 0, got {lp.start_step}")


# --------------------------------------------------------------------------------------
# Building dataclasses from plain data, with typed coercion and precise errors
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"mapping of {_type_name(key)} to {_type_name(value)}"
    if dataclasses.is_dataclass(tp):
        return f"mapping (section {tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _unknown_key(source: str, prefix: str, key: str, valid: list[str]) -> ConfigError:
    """An error naming the dotted key, its source and the closest valid names."""
    dotted = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = ""
    if close:
        hint = "; did you mean " + ", ".join(repr(f"{prefix}.{c}" if prefix else c) for c in close) + "?"
    section = f" in {prefix}" if prefix else ""
    return ConfigError(f"{source}: unknown key {dotted!r}{hint} (valid keys{section}: {', '.join(valid)})")


def _coerce(value: Any, tp: Any, source: str, dotted: str) -> Any:
    """Return ``value`` converted to type ``tp``, or raise ConfigError naming source and key."""
    origin = typing.get_origin(tp)
    if tp is Any:  # a stage's override values: typed against their own keys (resolve_stages)
        return value

    def wrong() -> ConfigError:
        return ConfigError(
            f"{source}: {dotted}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )

    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise wrong()
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):  # a section: its own error
                return _coerce(value, arg, source, dotted)
            try:
                return _coerce(value, arg, source, dotted)
            except ConfigError:
                continue
        raise wrong()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: {dotted}: expected {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong()
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, source, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong()
        key_tp, value_tp = typing.get_args(tp)
        return {
            _coerce(k, key_tp, source, dotted): _coerce(v, value_tp, source, f"{dotted}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong()
        return _build(tp, value, source, dotted)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise wrong() from None
        raise wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise wrong() from None
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong()
    raise TypeError(f"{dotted}: unsupported field type {tp!r}")  # a bug in this module


def _fields(cls: type) -> dict[str, Any]:
    """A section's fields and their types (class-level constants such as ``ALIASES`` aside)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _field_name(cls: type, key: str) -> str:
    """``key``, or the field that an older name of it (``cls.ALIASES``) stands for."""
    return getattr(cls, "ALIASES", {}).get(key, key)


def canonical_key(dotted: str) -> str:
    """``dotted`` with every older field name replaced (``reset.every_n_steps`` -> ``reset.after_steps``)."""
    parts, tp = dotted.split("."), Recipe
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            break
        parts[i] = _field_name(tp, part)
        tp = _fields(tp).get(parts[i])
    return ".".join(parts)


def _build(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and bad values are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'recipe'} must be a mapping, got {type(data).__name__}")
    hints = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        name = _field_name(cls, str(key))
        if name in kwargs or (name != key and name in data):
            raise ConfigError(f"{source}: {prefix}.{key} and {prefix}.{name} are one setting ({key} is its older "
                              f"name): give one")
        if name not in hints:
            raise _unknown_key(source, prefix, str(key), list(hints))
        kwargs[name] = _coerce(value, hints[name], source, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def from_dict(data: dict, source: str = "recipe") -> Recipe:
    """Build a :class:`Recipe` from nested plain data (as read from YAML)."""
    return _build(Recipe, data, source)


def to_dict(recipe: Recipe) -> dict:
    """The recipe as nested plain data (inverse of :func:`from_dict`)."""
    return dataclasses.asdict(recipe)


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"command line: override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: cannot parse the value of {key!r}: {e}") from None
    return parts, value


def _set_dotted(data: dict, parts: list[str], value: Any, source: str) -> None:
    """Set ``data[p0][p1]... = value``, checking every key against the recipe's schema."""
    tp: Any = Recipe
    node = data
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        last = depth == len(parts) - 1
        if typing.get_origin(tp) is dict and last:  # e.g. data.domain_weights.math=2
            node[part] = _coerce(value, typing.get_args(tp)[1], source, ".".join(parts))
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: {prefix} is a value, not a section: cannot set {'.'.join(parts)}")
        hints = _fields(tp)
        part = _field_name(tp, part)
        if part not in hints:
            raise _unknown_key(source, prefix, part, list(hints))
        if last:
            node[part] = _coerce(value, hints[part], source, ".".join(parts))
            if dataclasses.is_dataclass(node[part]):
                node[part] = dataclasses.asdict(node[part])
            elif isinstance(node[part], list):  # e.g. stages=[{name: a}, ...]
                node[part] = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in node[part]]
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, tp = child, hints[part]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply dotted overrides, coerce types and validate.

    Raises:
        ConfigError: with the file (or "command line"), the dotted key and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    recipe = from_dict(data, source=str(path))  # errors here name the file
    merged = to_dict(recipe)
    for text in overrides:
        parts, value = _parse_override(text)
        _set_dotted(merged, parts, value, f"command line ({text})")
    if overrides:
        recipe = from_dict(merged, source="command line")
    source = f"{path}" + (" + command line" if overrides else "")
    if recipe.stages:
        return resolve_stages(recipe, overrides, source)[0]
    return recipe.validate(source=source)


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


def _stage_where(recipe: Recipe, index: int) -> str:
    return f"stage {index} {recipe.stages[index].name!r} (stages[{index}])"


def _check_stages(recipe: Recipe, source: str) -> None:
    """The stage list's own shape: names, triggers, keys a stage may change, typed values."""
    names = [s.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        where = f"{source}: {_stage_where(recipe, i)}"
        if not stage.name:
            raise ConfigError(f"{where}: every stage needs a name")
        if stage.name in names[:i]:
            raise ConfigError(f"{where}: stage names must be unique")
        if i == 0 and stage.enter is not None:
            raise ConfigError(f"{where}: the first stage has no trigger (a run starts there); remove its 'enter'")
        if i > 0:
            if stage.enter is None or not stage.enter.enabled:
                raise ConfigError(f"{where}: needs a trigger: enter.after_steps, enter.kl_threshold, "
                                  "enter.plateau_window or enter.entropy_floor")
            problems = stage.enter.problems("enter")
            if problems:
                raise ConfigError(f"{where}: {'; '.join(problems)}")
        for key in stage.overrides:
            if not stage_key_allowed(str(key)):
                _set_dotted(to_dict(recipe), str(key).split("."), stage.overrides[key], f"{where} overrides")  # typos
                raise ConfigError(f"{where} overrides: {key}: fixed for the run, a stage cannot change it; a stage "
                                  f"may change {', '.join(STAGE_KEYS)} (a trailing '.': the whole section)")


def _apply_items(recipe: Recipe, items: list[tuple[str, Any, str]], source: str) -> Recipe:
    """``recipe`` with each (dotted key, value, where) set, typed and checked like an override."""
    data = to_dict(recipe)
    for key, value, where in items:
        parts = str(key).split(".")
        if not all(parts):
            raise ConfigError(f"{where}: {key!r} has an empty key")
        _set_dotted(data, parts, value, where)
    return from_dict(data, source=source)


def _command_line_items(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any, str]]:
    return [(canonical_key(".".join(parts)), value, f"command line ({text})")
            for text, (parts, value) in ((t, _parse_override(t)) for t in overrides)]


def stage_recipe(recipe: Recipe, index: int, overrides: list[str] | tuple[str, ...] = (),
                 start: int = 0, source: str = "") -> Recipe:
    """The recipe of stage ``index``, from ``recipe``, the recipe of stage ``start`` (as
    :func:`load_recipe` returns stage 0's): the overrides of stages ``start + 1 .. index``, then
    the command line's ``overrides`` again (they win over any stage). Not validated."""
    items = []
    for i in range(start + 1, index + 1):
        where = f"{source}: {_stage_where(recipe, i)}" if source else _stage_where(recipe, i)
        items += [(key, value, f"{where} overrides") for key, value in recipe.stages[i].overrides.items()]
    return _apply_items(recipe, items + _command_line_items(overrides), _stage_where(recipe, index))


def stage_overridden(recipe: Recipe, index: int, overrides: list[str] | tuple[str, ...], first: int = 0) -> list[str]:
    """One line per command-line override of a key that stages ``first``..``index`` set (the
    latest of them): the command line wins."""
    lines = []
    for key, value, _ in _command_line_items(overrides):
        for i in range(index, first - 1, -1):
            stage = recipe.stages[i]
            hit = [k for k in stage.overrides if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
            if hit:
                lines.append(f"command line {key}={value!r} overrides stage {i} {stage.name!r}'s "
                             + ", ".join(f"{k}={stage.overrides[k]!r}" for k in hit))
                break
    return lines


def resolve_stages(recipe: Recipe, overrides: list[str] | tuple[str, ...] = (), source: str = "recipe") -> list[Recipe]:
    """Every stage's recipe (:func:`stage_recipe`), each validated; ``recipe`` is the file's with
    the command line applied. Stage overrides are coerced in place to their keys' types."""
    _check_stages(recipe, source)
    first = _stage_where(recipe, 0)
    items = [(key, value, f"{source}: {first} overrides") for key, value in recipe.stages[0].overrides.items()]
    current = _apply_items(recipe, items + _command_line_items(overrides), f"{source}: {first}")
    out = []
    for i in range(len(recipe.stages)):
        if i:
            current = stage_recipe(current, i, overrides, start=i - 1, source=source)
            if recipe.stages[i].enter.plateau_window is not None and not current.eval.every_n_steps:
                raise ConfigError(f"{source}: {_stage_where(recipe, i)}: enter.plateau_window needs validation "
                                  f"rewards in stage {i - 1}: set eval.every_n_steps > 0")
        current.validate(source=f"{source}: {_stage_where(recipe, i)}")
        out.append(current)
    typed = _typed_overrides(out[0])
    for r in out:
        r.stages = copy.deepcopy(typed)
    return out


def _typed_overrides(recipe: Recipe) -> list[StageConfig]:
    """The stages with each override value coerced to its key's type, and each key under its
    current name (:func:`canonical_key`)."""
    stages = copy.deepcopy(recipe.stages)
    for i, stage in enumerate(stages):
        typed = {}
        for key, value in stage.overrides.items():
            data = to_dict(recipe)
            _set_dotted(data, key.split("."), value, f"{_stage_where(recipe, i)} overrides")
            node = data
            for part in canonical_key(key).split("."):
                node = node[part]
            typed[canonical_key(key)] = node
        stage.overrides = typed
    return stages


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_recipe_arguments(parser: argparse.ArgumentParser, default_recipe: str | None = None) -> None:
    """Add ``--recipe``, ``--print-config`` and the trailing ``key.sub=value`` overrides."""
    parser.add_argument("--recipe", default=default_recipe, required=default_recipe is None,
                        help="recipe YAML file (recipes/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Load the recipe named by :func:`add_recipe_arguments`; print it if asked."""
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(f"# resolved recipe: {args.recipe}" + (f" + {' '.join(args.overrides)}" if args.overrides else ""))
        print(to_yaml(recipe), end="")
    return recipe


def resolved_value(recipe: Recipe, dotted: str) -> Any:
    """The value of ``dotted`` (``logging.dir``) in ``recipe``; a ConfigError names an unknown key."""
    node: Any = to_dict(recipe)
    for i, part in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(dotted.split(".")[:i]) or "recipe"
            valid = ", ".join(node) if isinstance(node, dict) else "none: a value, not a section"
            raise ConfigError(f"--get {dotted}: no key {part!r} in {where} (valid: {valid})")
        node = node[part]
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Resolve and check a ProRL recipe.")
    add_recipe_arguments(parser)
    parser.add_argument("--get", action="append", default=[], metavar="KEY",
                        help="print the resolved value of a dotted key, one line per --get (for scripts)")
    args = parser.parse_args(argv)
    try:
        recipe = recipe_from_args(args)
        values = [resolved_value(recipe, key) for key in args.get]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for value in values:
        print(value if isinstance(value, str) else json.dumps(value))
    if not args.print_config and not args.get:
        print(f"{args.recipe}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
