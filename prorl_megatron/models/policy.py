"""The trained policy, its frozen reference, and the megatron optimizer that updates the policy.

The policy is megatron's usual stack: ``GPTModel`` -> ``Float16Module`` (bf16/fp16 only: it
casts the whole model, norms included, to the training dtype) -> ``DistributedDataParallel``
(contiguous grad buffers, DP all-reduce in ``finalize_model_grads``). The reference is the
same ``GPTModel`` (+ ``Float16Module``) without DDP and without gradients; a reset copies the
policy's local shards into it, parameter by parameter, so nothing is gathered or moved.

With ``train.distributed_optimizer`` the optimizer is megatron's ``DistributedOptimizer``
(ZeRO-1): DDP reduce-scatters the gradients instead of all-reducing them, each data-parallel
rank keeps the fp32 main weights and Adam's moments of its contiguous 1/DP slice of the grad
buffer only, updates that slice, and all-gathers the updated weights into every rank's model.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from prorl_megatron.config import PrecisionConfig, TrainConfig
from prorl_megatron.models.architectures import ModelDims, torch_dtype
from prorl_megatron.models.gpt import build_gpt_model


def _with_precision(model: Any, precision: PrecisionConfig) -> Any:
    from megatron.core.transformer.module import Float16Module

    if precision.params_dtype == "float32":
        return model
    return Float16Module(model.config, model)


def build_policy(dims: ModelDims, precision: PrecisionConfig,
                 train: Optional[TrainConfig] = None) -> tuple[Any, Any]:
    """``(gpt, ddp)``: this rank's policy shard and its DDP wrapper (what is trained).

    ``train`` (None: its defaults) chooses the activation recompute and whether DDP prepares
    its buffers for the distributed optimizer (reduce-scatter; :func:`build_optimizer` must agree).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    train = train if train is not None else TrainConfig()
    gpt = build_gpt_model(dims, precision, perform_initialization=False, recompute=train.recompute)
    wrapped = _with_precision(gpt, precision)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
                                               use_distributed_optimizer=train.distributed_optimizer)
    return gpt, DistributedDataParallel(gpt.config, ddp_config, wrapped)


def build_reference(dims: ModelDims, precision: PrecisionConfig) -> tuple[Any, Any]:
    """``(gpt, module)``: the frozen reference shard; ``module`` is what is run."""
    gpt = build_gpt_model(dims, precision, perform_initialization=False)
    for p in gpt.parameters():
        p.requires_grad_(False)
    return gpt, _with_precision(gpt, precision).eval()


def build_optimizer(ddp: Any, train: TrainConfig, precision: PrecisionConfig) -> Any:
    """megatron's optimizer for the policy: Adam with decoupled weight decay, constant lr.

    bf16/fp16 parameters get fp32 main copies; gradients are clipped to ``train.clip_grad``
    (0: off) by their global norm. fp16: megatron's schedules scale each loss by the
    optimizer's dynamic loss scale (which :func:`optimizer_step` unscales).
    ``train.distributed_optimizer``: main weights and moments sharded over data parallel; ``ddp``
    must have been built for it (:func:`build_policy` with the same ``train``).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if ddp.ddp_config.use_distributed_optimizer != train.distributed_optimizer:
        raise ValueError(f"train.distributed_optimizer={train.distributed_optimizer}, but the policy's DDP was built "
                         f"with use_distributed_optimizer={ddp.ddp_config.use_distributed_optimizer}: pass the same "
                         "TrainConfig to build_policy")
    dtype = torch_dtype(precision.params_dtype)
    config = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        params_dtype=dtype, use_distributed_optimizer=train.distributed_optimizer,
        initial_loss_scale=precision.initial_loss_scale,
    )
    optimizer = get_megatron_optimizer(config, [ddp])
    if config.fp16:
        ddp.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _chained(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    return [o.optimizer for o in _chained(optimizer)]


def optimizer_state_is_empty(optimizer: Any) -> bool:
    """True before the first step and right after :func:`reset_optimizer_state`.

    A parameter with an empty entry counts as without state: torch's ``state`` is a defaultdict,
    and megatron's distributed optimizer makes such entries by looking a parameter's state up.
    """
    return all(not state for o in _inner_optimizers(optimizer) for state in o.state.values())


def reset_optimizer_state(optimizer: Any) -> None:
    """ProRL's reset: Adam continues exactly as a freshly built one would.

    Adam's moments and step count are forgotten wherever the class keeps them: torch's Adam(W)
    per parameter in ``state``; apex's and Transformer Engine's FusedAdam (what megatron picks
    on a GPU image) as ``step`` in each param group, which they create on their first step.
    Kept: the fp32 main weights (bf16/fp16; parameters of the inner optimizer, not state) and
    the fp16 loss scale (already calibrated; a fresh one would skip updates to find it again).
    """
    for inner in _inner_optimizers(optimizer):
        inner.state.clear()
        for group in inner.param_groups:
            group.pop("step", None)


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """The constant learning rate of every param group (a stage change, or a resume whose
    recipe's ``train.lr`` differs from the one the loaded optimizer state carries)."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            group["lr"] = lr


def _grad_scaler(optimizer: Any) -> Any:
    """megatron's loss scaler (fp16; None in bf16 and fp32, where the FP32 optimizer has none)."""
    return getattr(_chained(optimizer)[0], "grad_scaler", None)


def loss_scale(optimizer: Any) -> Optional[float]:
    """The current fp16 loss scale (None without a scaler, as in bf16 and fp32)."""
    scaler = _grad_scaler(optimizer)
    return None if scaler is None else float(scaler.scale)


def still_calibrating(optimizer: Any) -> bool:
    """fp16's dynamic loss scaler starts high and halves on each overflow, skipping that update:
    such a skip is calibration, not divergence, while the scale is above its minimum."""
    scaler = _grad_scaler(optimizer)
    return scaler is not None and hasattr(scaler, "min_scale") and float(scaler.scale) > float(scaler.min_scale)


def optimizer_step(optimizer: Any) -> tuple[bool, float]:
    """Step the optimizer unless the gradients are non-finite; return ``(stepped, grad_norm)``.

    Gradients must be final (after ``finalize_model_grads``). This is megatron's own step cut
    at the norm: ``prepare_grads`` (once: it copies the grads to the fp32 main grads and, in
    fp16, unscales them and updates the loss scale), the global norm, and only when it is finite
    the clipping by that norm and ``step_with_ready_grads``. All ranks reach the same verdict
    (the norm is reduced over the model-parallel group, the gradients over data parallel).
    """
    from megatron.core.optimizer.optimizer import clip_grad_by_total_norm_fp32  # as megatron's ChainedOptimizer.step

    if optimizer.prepare_grads():
        return False, float("inf")
    norm = optimizer.get_grad_norm()
    norm = float(norm if norm is not None else 0.0)
    if not math.isfinite(norm):
        return False, norm
    for chained in _chained(optimizer):
        params = chained.get_parameters()
        if params and chained.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, max_norm=chained.config.clip_grad, total_norm=norm,
                                         use_decoupled_grad=chained.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), norm


@torch.no_grad()
def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every parameter of ``source`` into ``target`` (same architecture, same shards)."""
    src = dict(source.named_parameters())
    dst = dict(target.named_parameters())
    if src.keys() != dst.keys():
        raise ValueError(f"models differ: {sorted(src.keys() ^ dst.keys())[:5]}")
    for name, p in dst.items():
        p.copy_(src[name])


def zero_grads(ddp: Any, optimizer: Any) -> None:
    """Clear the DDP grad buffers and the optimizer's main grads before a mini-batch."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()


def finalize_grads(ddp: Any) -> None:
    """Data-parallel all-reduce of the accumulated grads (+ tied embedding grads across PP)."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([ddp])
