"""Moving weights between HF-named tensors and a (sharded) Megatron model, tensor by tensor.

:func:`load_hf_weights` fills this process's TP/PP shard from an HF checkpoint, reading each
HF tensor once; :func:`export_hf_weights` yields full HF-named tensors from the sharded model
(TP all-gather per tensor, the owning pipeline stage broadcasts) — the iterator that both the
HF exporter and weight sync to vLLM consume. Neither holds more than one full tensor (plus
its TP shards) beyond the model itself.
"""

from __future__ import annotations

import math
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


def _owner_stage(rule: M.Rule, dims: ModelDims, pp_size: int) -> int:
    if rule.layer is not None:
        return rule.layer // (dims.num_layers // pp_size)
    return 0 if rule.mcore.startswith("embedding.") else pp_size - 1


def _buckets(rules: list[M.Rule], dims: ModelDims, pp_size: int, bucket_bytes: int,
             element_size: int) -> Iterator[list[M.Rule]]:
    """Consecutive rules of one owning stage, up to ``bucket_bytes`` of full tensors each."""
    bucket: list[M.Rule] = []
    size = 0
    for rule in rules:
        nbytes = math.prod(M.mcore_shape(rule, dims)) * element_size
        if bucket and (size + nbytes > bucket_bytes
                       or _owner_stage(rule, dims, pp_size) != _owner_stage(bucket[0], dims, pp_size)):
            yield bucket
            bucket, size = [], 0
        bucket.append(rule)
        size += nbytes
    if bucket:
        yield bucket


def export_hf_weights(model: torch.nn.Module, dims: ModelDims, dtype: Optional[torch.dtype] = None,
                      grads: bool = False, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the whole model, in HF order, on every rank.

    Collective: every rank of the model-parallel group must iterate to the end together.
    Tensors travel in buckets of at most ``bucket_bytes`` of full tensors (one larger tensor
    forms a bucket of its own): one TP all-gather of the bucket's flattened shards on its
    owning pipeline stage, one PP broadcast of the flattened full tensors from it. So beyond
    the model, a bucket is the most that exists at once. ``grads=True`` exports the
    parameters' gradients (``main_grad`` under megatron DDP, else ``.grad``, as float32)
    in the same layout instead of the weights.
    """
    from megatron.core import parallel_state as ps

    tp_rank, tp_size, pp_rank, pp_size = _parallel_coords(None)
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    wire_dtype = torch.float32 if grads else next(iter(params.values())).dtype
    fused = te_names(model)
    local_names = {rule.mcore: local for rule, local in M.stage_rules(dims, pp_rank, pp_size, fused)}
    element_size = torch.empty((), dtype=wire_dtype).element_size()
    for bucket in _buckets(M.rules(dims, fused), dims, pp_size, bucket_bytes, element_size):
        owner = _owner_stage(bucket[0], dims, pp_size)
        shapes = [M.mcore_shape(rule, dims) for rule in bucket]
        if pp_rank == owner:
            locals_ = [_value_or_grad(local_names[r.mcore], params[local_names[r.mcore]], grads).to(wire_dtype)
                       for r in bucket]
            fulls = _gather_tp(bucket, locals_, tp_size, ps) if tp_size > 1 else locals_
        else:
            fulls = [torch.empty(shape, dtype=wire_dtype, device=device) for shape in shapes]
        if pp_size > 1:
            flat = torch.cat([f.reshape(-1) for f in fulls]) if pp_rank == owner else \
                torch.empty(sum(math.prod(s) for s in shapes), dtype=wire_dtype, device=device)
            group = ps.get_pipeline_model_parallel_group()
            dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
            fulls = [piece.view(shape) for piece, shape in
                     zip(flat.split([math.prod(s) for s in shapes]), shapes)]
        for rule, full in zip(bucket, fulls):
            for name, tensor in M.to_hf(rule, full, dims):
                yield name, tensor if dtype is None else tensor.to(dtype)
        del fulls


def _gather_tp(bucket: list[M.Rule], locals_: list[torch.Tensor], tp_size: int, ps) -> list[torch.Tensor]:
    """Full tensors of a bucket from every TP rank's shards, with one all-gather."""
    split = [r.kind != "replicated" for r in bucket]
    sharded = [t.reshape(-1) for t, s in zip(locals_, split) if s]
    if not sharded:
        return locals_
    flat = torch.cat(sharded)
    gathered = [torch.empty_like(flat) for _ in range(tp_size)]
    dist.all_gather(gathered, flat, group=ps.get_tensor_model_parallel_group())
    sizes = [t.numel() for t in sharded]
    per_rank = [g.split(sizes) for g in gathered]  # [rank][tensor]
    out, k = [], 0
    for rule, local, is_split in zip(bucket, locals_, split):
        if is_split:
            out.append(M.unshard(rule, [per_rank[r][k].view(local.shape) for r in range(tp_size)]))
            k += 1
        else:
            out.append(local)
    return out
