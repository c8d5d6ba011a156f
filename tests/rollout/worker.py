"""vLLM rollout + weight sync checks under torchrun (gloo), against HF on the same weights.

    torchrun --nproc_per_node N tests/rollout/worker.py --tp T --pp P --engine-tp E HF_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from prorl_megatron.checkpoint.hf_io import HFReader, HFWriter, copy_metadata
from prorl_megatron.checkpoint.transfer import export_hf_weights, load_hf_weights
from prorl_megatron.config import PrecisionConfig, RolloutConfig
from prorl_megatron.models.architectures import model_dims, read_hf_config
from prorl_megatron.models.forward import MicroBatch, run_microbatches
from prorl_megatron.models.gpt import build_gpt_model
from prorl_megatron.parallel import init_parallel
from prorl_megatron.rollout.engine import RolloutEngine, WeightLoadError
from prorl_megatron.rollout.weight_sync import SyncTolerance, check_sync, sync_weights
from tests.procs import report_rank

FP32 = PrecisionConfig(params_dtype="float32")
EXACT = SyncTolerance(mean=1e-4, p90=1e-4)  # fp32 on both sides
PROMPTS = [[3, 17, 42, 5], [99, 1], [7, 7, 7, 120, 4, 60]]


def fail(message: str) -> None:
    sys.exit(f"FAIL rank {dist.get_rank()}: {message}")


def update(model, dims) -> None:
    """One real gradient step: megatron DDP, finalize_model_grads, SGD on the main grads."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    ddp.zero_grad_buffer()
    ids = torch.tensor(PROMPTS[2])[None]
    run_microbatches(ddp, [MicroBatch(ids)], vocab_size=dims.vocab_size,
                     loss_fn=lambda lp, b: (-lp.mean(), {}))
    finalize_model_grads([ddp])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.main_grad, alpha=-2.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--engine-tp", type=int, default=1)
    parser.add_argument("hf_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    layout = init_parallel(args.tp, args.pp, seed=1)
    dims = model_dims(read_hf_config(args.hf_dir))
    model = build_gpt_model(dims, FP32, perform_initialization=False)
    load_hf_weights(model, HFReader(args.hf_dir).get, dims)
    cfg = RolloutConfig(n=3, temperature=1.2, max_prompt_tokens=16, max_response_tokens=6,
                        engine_tensor_parallel=args.engine_tp, cpu_kvcache_gib=1.0)
    engine = RolloutEngine(args.hf_dir, cfg, FP32, seed=0, tokenizer=False)

    # the API: n samples per prompt, token ids, per-token logprobs, finish reasons
    out = engine.generate(PROMPTS, seed=11)
    if [len(samples) for samples in out] != [3, 3, 3]:
        fail(f"expected 3 samples per prompt, got {[len(s) for s in out]}")
    for samples in out:
        for s in samples:
            if not (len(s.response_ids) == len(s.logprobs) and 1 <= len(s.response_ids) <= 6):
                fail(f"bad rollout {s}")
            if not all(lp <= 0.0 for lp in s.logprobs) or s.finish_reason not in ("stop", "length"):
                fail(f"bad logprobs/finish reason {s}")
            if s.truncated != (s.finish_reason == "length"):
                fail("truncated flag")
    again = engine.generate(PROMPTS, seed=11)
    if [[s.response_ids for s in x] for x in again] != [[s.response_ids for s in x] for x in out]:
        fail("seeded sampling is not reproducible")

    check_sync(model, dims, engine, PROMPTS, EXACT)  # the same weights before any update
    update(model, dims)
    before = engine.prompt_logprobs(PROMPTS)
    stats = sync_weights(model, dims, engine, "float32", bucket_bytes=64 << 10)  # several buckets
    diff = check_sync(model, dims, engine, PROMPTS, EXACT)["max"]
    after = engine.prompt_logprobs(PROMPTS)
    moved = max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x, y))
    if moved < 1e-3:
        fail(f"the update did not reach the engine (logprobs moved by {moved})")

    # export the updated policy as an HF checkpoint (rank 0 writes) for the HF comparison
    out_dir = Path(args.out_dir)
    writer = HFWriter(out_dir / "hf") if dist.get_rank() == 0 else None
    for name, tensor in export_hf_weights(model, dims):
        if writer:
            writer.add(name, tensor)
    if writer:
        writer.finish()
        copy_metadata(args.hf_dir, out_dir / "hf")
    greedy = engine.generate(PROMPTS, n=1, temperature=0.0, max_tokens=6)
    if dist.get_rank() == 0:
        (out_dir / "greedy.json").write_text(json.dumps([g[0].response_ids for g in greedy]))
        (out_dir / "stats.json").write_text(json.dumps({"tensors": stats.tensors, "bytes": stats.bytes,
                                                        "max_diff": diff, "moved": moved}))

    # a wrong mapping fails loudly: a stream missing one tensor
    try:
        engine.load_weights((n, t) for n, t in export_hf_weights(model, dims)
                            if n != "model.layers.1.mlp.down_proj.weight")
    except WeightLoadError as e:
        if "model.layers.1.mlp.down_proj.weight" not in str(e):
            fail(f"the error does not name the missing tensor: {e}")
    else:
        fail("a stream without a tensor was accepted")
    dist.barrier()
    report_rank("OK", dist.get_rank(), f"tp{args.tp} pp{args.pp} engine-tp{args.engine_tp} max-diff {diff:.2e}")
    # the engine holds gloo groups of its own: leave without a collective teardown
    sys.stdout.flush()


if __name__ == "__main__":
    main()
