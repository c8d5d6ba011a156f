"""Policy weights -> vLLM after every update, and the check that they arrived.

The contract is one iterator of (HF name, full tensor): :func:`prorl_megatron.checkpoint.
transfer.export_hf_weights` moves the policy in buckets of bounded size — one TP all-gather
on the owning pipeline stage and one PP broadcast per bucket — and unfuses QKV / gate-up with
the shared mapping table; the engine loads the stream in place (each engine rank keeps only
its own TP shard of each tensor). Beyond the model itself, one bucket is the most that exists
at a time. The engine must be awake (GPU sleep mode) while loading.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from prorl_megatron.checkpoint.transfer import export_hf_weights
from prorl_megatron.models.architectures import ModelDims, torch_dtype
from prorl_megatron.models.forward import MicroBatch, run_microbatches


class SyncMismatch(RuntimeError):
    """The engine's logprobs differ from the policy's beyond tolerance after a sync."""


@dataclass
class SyncStats:
    tensors: int
    bytes: int
    seconds: float


def sync_weights(model: Any, dims: ModelDims, engine: Any, dtype: str, bucket_bytes: int = 256 << 20) -> SyncStats:
    """Stream the policy's weights into the engine (collective over the whole world).

    ``dtype``: the engine's dtype (e.g. the recipe's ``precision.params_dtype``);
    ``bucket_bytes``: the recipe's ``rollout.sync_bucket_mib`` in bytes.
    """
    start = time.perf_counter()
    counted = {"tensors": 0, "bytes": 0}

    def stream():
        for name, tensor in export_hf_weights(model, dims, dtype=torch_dtype(dtype), bucket_bytes=bucket_bytes):
            counted["tensors"] += 1
            counted["bytes"] += tensor.numel() * tensor.element_size()
            yield name, tensor

    engine.wake_up()
    engine.load_weights(stream())
    return SyncStats(counted["tensors"], counted["bytes"], time.perf_counter() - start)


def check_sync(model: Any, dims: ModelDims, engine: Any, probe: Sequence[Sequence[int]],
               atol: float = 1e-3) -> float:
    """Compare the engine's prompt logprobs on ``probe`` with the policy's; return the max |diff|.

    Raises :class:`SyncMismatch` naming the difference when it exceeds ``atol``. Collective:
    all ranks call it; the comparison happens on the last pipeline stage and its verdict is
    shared with every rank.
    """
    engine_lp = engine.prompt_logprobs(probe)
    length = max(len(p) for p in probe)
    device = next(model.parameters()).device
    worst = torch.zeros((), device=device)
    batches = [MicroBatch(torch.tensor([list(p)], dtype=torch.long, device=device)) for p in probe]
    with torch.no_grad():
        policy_lp = run_microbatches(model, batches, vocab_size=dims.vocab_size)
    if policy_lp:  # only the last pipeline stage has logprobs
        for got, want in zip(policy_lp, engine_lp):
            diff = (got[0].float() - torch.tensor(want, dtype=torch.float32, device=device)).abs().max()
            worst = torch.maximum(worst, diff)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    value = float(worst)
    if not value <= atol:
        raise SyncMismatch(f"after weight sync the engine's logprobs differ from the policy's by up to "
                           f"{value:.3g} (tolerance {atol:g}) on a {len(probe)}-sequence probe of length {length}")
    return value
