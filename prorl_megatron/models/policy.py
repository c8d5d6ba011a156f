"""The trained policy, its frozen reference, and the megatron optimizer that updates the policy.

The policy is megatron's usual stack: ``GPTModel`` -> ``Float16Module`` (bf16/fp16 only: it
casts the whole model, norms included, to the training dtype) -> ``DistributedDataParallel``
(contiguous grad buffers, DP all-reduce in ``finalize_model_grads``). The reference is the
same ``GPTModel`` (+ ``Float16Module``) without DDP and without gradients; a reset copies the
policy's local shards into it, parameter by parameter, so nothing is gathered or moved.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prorl_megatron.config import PrecisionConfig, TrainConfig
from prorl_megatron.models.architectures import ModelDims, torch_dtype
from prorl_megatron.models.gpt import build_gpt_model


def _with_precision(model: Any, precision: PrecisionConfig) -> Any:
    from megatron.core.transformer.module import Float16Module

    if precision.params_dtype == "float32":
        return model
    return Float16Module(model.config, model)


def build_policy(dims: ModelDims, precision: PrecisionConfig) -> tuple[Any, Any]:
    """``(gpt, ddp)``: this rank's policy shard and its DDP wrapper (what is trained)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    gpt = build_gpt_model(dims, precision, perform_initialization=False)
    wrapped = _with_precision(gpt, precision)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=precision.grad_reduce_in_fp32)
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
    (0: off) by their global norm.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = torch_dtype(precision.params_dtype)
    config = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        params_dtype=dtype, use_distributed_optimizer=False,
    )
    return get_megatron_optimizer(config, [ddp])


def _inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained]


def optimizer_state_is_empty(optimizer: Any) -> bool:
    """True before the first step and right after :func:`reset_optimizer_state`."""
    return all(len(o.state) == 0 for o in _inner_optimizers(optimizer))


def reset_optimizer_state(optimizer: Any) -> None:
    """Forget the Adam moments and step counts (ProRL's reset); fp32 main weights are kept."""
    for inner in _inner_optimizers(optimizer):
        inner.state.clear()


def optimizer_step(optimizer: Any) -> tuple[bool, float]:
    """Step the optimizer unless the gradients are non-finite; return ``(stepped, grad_norm)``.

    Gradients must be final (after ``finalize_model_grads``). The global gradient norm is
    computed before the step (megatron's own step would clip and apply a NaN); when it is
    not finite nothing is updated. All ranks reach the same verdict (the norm is reduced
    over the model-parallel group and the gradients over data parallel).
    """
    found_inf = optimizer.prepare_grads()
    norm = optimizer.get_grad_norm()
    norm = float("inf") if norm is None and found_inf else float(norm or 0.0)
    if found_inf or not math.isfinite(norm):
        return False, norm
    stepped, step_norm, _ = optimizer.step()
    return bool(stepped), float(step_norm if step_norm is not None else norm)


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


def use_loss_scaling(gpt: Any, optimizer: Any) -> None:
    """fp16 only: let megatron's schedules scale each loss by the optimizer's loss scale."""
    if gpt.config.fp16:
        gpt.config.grad_scale_func = optimizer.scale_loss
