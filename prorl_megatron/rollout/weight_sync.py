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

    engine.wake_up(["weights"])  # the KV cache only after the load: their peaks do not add up
    engine.load_weights(stream())
    engine.wake_up(["kv_cache"])
    return SyncStats(counted["tensors"], counted["bytes"], time.perf_counter() - start)


@dataclass(frozen=True)
class SyncTolerance:
    """How far the engine's logprobs of a probe's tokens may be from the policy's after a sync.

    Statistics over every token of the probe, not the maximum: in bf16 a token the model
    finds very unlikely (logprob ~ -20) differs by ~0.1 from rounding alone, while a real
    mismatch (a wrong shard, stale or missing weights) moves the typical token.
    """

    mean: float  # of |engine - policy| over the probe's tokens
    p90: float  # 90th percentile of the same


# Measured (tests/rollout/test_sync_check.py: a tiny Qwen2 with peaked logits, TP2 policy and
# engine, probes sampled at temperature 1.2) after a correct sync, mean / p90: float32 2.8e-6 /
# 6.2e-6, float16 0.008 / 0.018, bfloat16 0.067 / 0.17. Planted mismatches (a TP shard swapped,
# two attention heads swapped) give >= 3.5 / 6.9 in every dtype. Tolerances: >= 3.5x the
# measured noise, >= 14x below the planted mismatches.
SYNC_TOLERANCES = {
    "float32": SyncTolerance(mean=1e-4, p90=2e-4),
    "float16": SyncTolerance(mean=0.04, p90=0.1),
    "bfloat16": SyncTolerance(mean=0.25, p90=0.6),
}


def sync_tolerance(params_dtype: str) -> SyncTolerance:
    """The parity check's tolerance for the recipe's dtype. float32 on a GPU computes its matmuls
    in TF32 where allowed (NGC images force it: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1), whose
    10-bit mantissa is float16's: it gets float16's tolerance there."""
    return SYNC_TOLERANCES["float16" if params_dtype == "float32" and torch.cuda.is_available() else params_dtype]


def sync_statistics(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """``mean``, ``p90`` and ``max`` of ``|got - want|`` (1-D, one entry per probe token)."""
    diff = (got.float() - want.float()).abs()
    return {"mean": float(diff.mean()), "p90": float(torch.quantile(diff, 0.9)), "max": float(diff.max())}


def check_sync(model: Any, dims: ModelDims, engine: Any, probe: Sequence[Sequence[int]],
               tolerance: SyncTolerance) -> dict[str, float]:
    """Compare the engine's prompt logprobs on ``probe`` with the policy's; return
    :func:`sync_statistics` (every rank gets the last pipeline stage's).

    Raises :class:`SyncMismatch` naming the statistics when the mean or the 90th percentile
    exceeds ``tolerance``. Collective: all ranks call it.
    """
    engine_lp = engine.prompt_logprobs(probe)
    device = next(model.parameters()).device
    stats = torch.zeros(3, device=device)
    batches = [MicroBatch(torch.tensor([list(p)], dtype=torch.long, device=device)) for p in probe]
    with torch.no_grad():
        policy_lp = run_microbatches(model, batches, vocab_size=dims.vocab_size)
    if policy_lp:  # only the last pipeline stage has logprobs
        got = torch.cat([lp[0].float() for lp in policy_lp])
        want = torch.tensor([x for seq in engine_lp for x in seq], dtype=torch.float32, device=device)
        stats = torch.tensor(list(sync_statistics(got, want).values()), device=device)
    torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
    result = dict(zip(("mean", "p90", "max"), stats.tolist()))
    if not (result["mean"] <= tolerance.mean and result["p90"] <= tolerance.p90):
        raise SyncMismatch(
            f"after weight sync the engine's logprobs differ from the policy's: mean |diff| {result['mean']:.3g} "
            f"(tolerance {tolerance.mean:g}), 90th percentile {result['p90']:.3g} (tolerance {tolerance.p90:g}), "
            f"max {result['max']:.3g}, over the {len(want) if policy_lp else '?'} tokens of a {len(probe)}-sequence "
            "probe: the engine does not hold the policy's weights")
    return result
