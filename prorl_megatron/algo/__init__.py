"""The ProRL algorithm as pure torch functions: no distributed, Megatron or vLLM imports.

- :mod:`~prorl_megatron.algo.advantages`: GRPO, RLOO, REINFORCE++-baseline;
- :mod:`~prorl_megatron.algo.losses`: clipped surrogate (decoupled eps, dual clip,
  importance weights), KL estimators, loss aggregation, the whole objective;
- :mod:`~prorl_megatron.algo.sampling`: dynamic-sampling filter, pass@k;
- :mod:`~prorl_megatron.algo.triggers`: when a run intervenes (reference resets, stage entries,
  health checks): one trigger type;
- :mod:`~prorl_megatron.algo.rollout_correction`: train/rollout logprob mismatch, TIS,
  IcePop and sequence-masked TIS weights;
- :mod:`~prorl_megatron.algo.length_penalty`: ProRL v2's scheduled cosine length penalty.
"""

from prorl_megatron.algo import advantages, length_penalty, losses, rollout_correction, sampling, triggers
from prorl_megatron.algo.advantages import (
    compute_advantages,
    grpo_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from prorl_megatron.algo.length_penalty import scheduled_cosine_length_rewards
from prorl_megatron.algo.losses import aggregate, kl_penalty, policy_kl_loss, policy_loss
from prorl_megatron.algo.rollout_correction import (
    correction_weights,
    icepop_weights,
    logprob_mismatch,
    seq_mask_tis_weights,
    tis_weights,
)
from prorl_megatron.algo.sampling import keep_informative_groups, pass_at_k
from prorl_megatron.algo.triggers import Fired, Threshold, Trigger, TriggerSpec

__all__ = [
    "advantages",
    "length_penalty",
    "losses",
    "rollout_correction",
    "sampling",
    "triggers",
    "compute_advantages",
    "grpo_advantages",
    "rloo_advantages",
    "reinforce_pp_baseline_advantages",
    "aggregate",
    "kl_penalty",
    "policy_loss",
    "policy_kl_loss",
    "Fired",
    "Threshold",
    "Trigger",
    "TriggerSpec",
    "logprob_mismatch",
    "tis_weights",
    "icepop_weights",
    "seq_mask_tis_weights",
    "correction_weights",
    "scheduled_cosine_length_rewards",
    "keep_informative_groups",
    "pass_at_k",
]
