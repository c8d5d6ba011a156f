"""Moving weights between HF-named tensors and a (sharded) Megatron model, tensor by tensor.

:func:`load_hf_weights` fills this process's TP/PP shard from an HF checkpoint, reading each
HF tensor once; :func:`export_hf_weights` yields full HF-named tensors from the sharded model
(TP all-gather per tensor, the owning pipeline stage broadcasts) — the iterator that both the
HF exporter and weight sync to vLLM consume. Neither holds more than one full tensor (plus
its TP shards) beyond the model itself.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from prorl_megatron.checkpoint import hf_mapping as M
from prorl_megatron.models.architectures import ModelDims

# HF checkpoints may carry buffers that are not weights (old rotary caches): never "unexpected".
_IGNORED_HF = re.compile(r".*\.rotary_emb\.inv_freq$")


def _parallel_coords(model_parallel: Optional[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """(tp_rank, tp_size, pp_rank, pp_size), from megatron's parallel_state unless given."""
    if model_parallel is not None:
        return model_parallel
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size())


def te_names(model: torch.nn.Module) -> bool:
    """True when the model uses Transformer Engine's fused-norm parameter names."""
    return any(name.endswith("linear_qkv.layer_norm_weight") for name, _ in model.named_parameters())


def check_hf_checkpoint(names: list[str], shape_of: Callable[[str], tuple[int, ...]], dims: ModelDims) -> None:
    """Raise naming every tensor the model needs but the checkpoint lacks, every tensor it
    cannot place, and every tensor of the wrong shape — before any weight is read."""
    wanted = {n: shape for rule in M.rules(dims) for n, shape in zip(rule.hf, M.hf_shapes(rule, dims))}
    have = set(names)
    missing = sorted(set(wanted) - have)
    unexpected = sorted(n for n in have - set(wanted) if not _IGNORED_HF.match(n)
                        and not (dims.tied_embeddings and n == "lm_head.weight"))
    misshaped = [f"{n}: expected shape {list(wanted[n])}, got {list(shape_of(n))}"
                 for n in sorted(have & set(wanted)) if tuple(shape_of(n)) != wanted[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:20])}")
    problems += misshaped
    if problems:
        raise M.MappingError("HF checkpoint does not match the model: " + "; ".join(problems))


def load_hf_weights(model: torch.nn.Module, get_tensor: Callable[[str], torch.Tensor], dims: ModelDims,
                    model_parallel: Optional[tuple[int, int, int, int]] = None,
                    progress: Optional[Callable[[str], None]] = None) -> None:
    """Copy this stage's TP shard of every HF tensor into ``model``'s parameters.

    Args:
        get_tensor: reads one HF tensor by name (e.g. ``HFReader.get``).
        model_parallel: (tp_rank, tp_size, pp_rank, pp_size); default: megatron's parallel_state.
    Raises:
        MappingError naming any parameter left unset, any mapped name the model lacks, and
        any shape mismatch.
    """
    tp_rank, tp_size, pp_rank, pp_size = _parallel_coords(model_parallel)
    params = dict(model.named_parameters())
    unset = set(params)
    for rule, local in M.stage_rules(dims, pp_rank, pp_size, te_names(model)):
        if local not in params:
            raise M.MappingError(f"{local} (from {', '.join(rule.hf)}): the model has no such parameter")
        part = M.shard(rule, M.to_mcore(rule, [get_tensor(n) for n in rule.hf], dims), tp_rank, tp_size)
        param = params[local]
        if tuple(param.shape) != tuple(part.shape):
            raise M.MappingError(f"{local}: the model's shard is {list(param.shape)}, "
                                 f"the checkpoint gives {list(part.shape)} (TP rank {tp_rank} of {tp_size})")
        with torch.no_grad():
            param.copy_(part)
        unset.discard(local)
        if progress is not None:
            progress(local)
    if unset:
        raise M.MappingError(f"model parameters not set from the checkpoint: {', '.join(sorted(unset))}")


def _value_or_grad(name: str, param: torch.nn.Parameter, grads: bool) -> torch.Tensor:
    if not grads:
        return param.detach()
    grad = getattr(param, "main_grad", None)
    grad = param.grad if grad is None else grad
    if grad is None:
        raise M.MappingError(f"{name}: no gradient to export")
    return grad.detach()


def export_hf_weights(model: torch.nn.Module, dims: ModelDims, dtype: Optional[torch.dtype] = None,
                      grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the whole model, in HF order, on every rank.

    Collective: every rank of the model-parallel group must iterate to the end together.
    Each tensor is all-gathered over TP on its owning stage and broadcast over PP from it.
    ``grads=True`` exports the parameters' gradients (``main_grad`` under megatron DDP,
    else ``.grad``) in the same layout instead of the weights.
    """
    from megatron.core import parallel_state as ps

    tp_rank, tp_size, pp_rank, pp_size = _parallel_coords(None)
    params = dict(model.named_parameters())
    per_stage = dims.num_layers // pp_size
    device = next(iter(params.values())).device
    param_dtype = next(iter(params.values())).dtype
    local_names = {rule.mcore: local for rule, local in M.stage_rules(dims, pp_rank, pp_size, te_names(model))}
    for rule in M.rules(dims, te_names(model)):
        if rule.layer is not None:
            owner = rule.layer // per_stage
        else:
            owner = 0 if rule.mcore.startswith("embedding.") else pp_size - 1
        if pp_rank == owner:
            local = _value_or_grad(local_names[rule.mcore], params[local_names[rule.mcore]], grads)
            if tp_size > 1 and rule.kind != "replicated":
                shards = [torch.empty_like(local) for _ in range(tp_size)]
                dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
                full = M.unshard(rule, shards)
                del shards
            else:
                full = local
        else:
            full = torch.empty(M.mcore_shape(rule, dims), dtype=param_dtype, device=device)
        if pp_size > 1:
            group = ps.get_pipeline_model_parallel_group()
            dist.broadcast(full, src=dist.get_global_rank(group, owner), group=group)
        for name, tensor in M.to_hf(rule, full, dims):
            yield name, tensor if dtype is None else tensor.to(dtype)
