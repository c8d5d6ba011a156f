"""Multi-process checks of the Megatron model against Hugging Face, run under torchrun (gloo).

    torchrun --nproc_per_node N tests/megatron/worker.py --tp T --pp P SCENARIO HF_DIR [HF_DIR ...]

Scenarios (each exits non-zero with a message on the first mismatch):
- ``parity``: HF -> sharded Megatron -> gathered HF tensors is bit-exact; logprobs (two
  micro-batches, temperature 0.7) through megatron's pipeline schedule equal HF's; gradients
  of a weighted logprob sum (megatron DDP, finalize_model_grads) equal HF's.
- ``save CKPT``: load HF weights and save a dist checkpoint to CKPT (one HF_DIR).
- ``load CKPT``: load CKPT at this layout; its logprobs equal HF's (one HF_DIR).
- ``bucket-memory``: the peak of memory allocated while exporting the model for weight sync
  is bounded by the bucket size (torch profiler's allocation events).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from prorl_megatron.checkpoint import dist_ckpt
from prorl_megatron.checkpoint.hf_io import HFReader
from prorl_megatron.checkpoint.transfer import export_hf_weights, load_hf_weights
from prorl_megatron.config import PrecisionConfig
from prorl_megatron.models.architectures import model_dims, read_hf_config
from prorl_megatron.models.forward import MicroBatch, run_microbatches
from prorl_megatron.models.gpt import build_gpt_model
from prorl_megatron.parallel import destroy_parallel, init_parallel
from tests.procs import report_rank

TEMPERATURE = 0.7
FP32 = PrecisionConfig(params_dtype="float32")


def hf_model(hf_dir):
    import transformers

    config = read_hf_config(hf_dir)
    model = getattr(transformers, config.architectures[0]).from_pretrained(hf_dir, dtype=torch.float32)
    return model.eval()


def batches(vocab: int) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(7)
    return [MicroBatch(torch.randint(0, vocab, (2, 12), generator=g)) for _ in range(2)]


def hf_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits.float() / TEMPERATURE  # [B, S, V]
    return torch.log_softmax(logits, dim=-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


def check_close(name, got, want, atol=2e-5, rtol=1e-4):
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        diff = (got - want).abs().max().item()
        sys.exit(f"MISMATCH {name}: max |diff| {diff:.3g} (shape {list(got.shape)})")


def megatron_model(hf_dir):
    dims = model_dims(read_hf_config(hf_dir))
    model = build_gpt_model(dims, FP32, perform_initialization=False)
    reader = HFReader(hf_dir)
    load_hf_weights(model, reader.get, dims)
    return model, dims


def logprob_parity(model, dims, hf, layout, label):
    data = batches(dims.vocab_size)
    with torch.no_grad():
        got = run_microbatches(model, data, vocab_size=dims.vocab_size, temperature=TEMPERATURE, chunk_tokens=7)
        if layout.is_last_stage:
            for i, batch in enumerate(data):
                check_close(f"{label} logprobs micro-batch {i}", got[i], hf_logprobs(hf, batch.input_ids))
        else:
            assert got == [], got


def grad_parity(hf_dir, dims, hf, layout):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model = build_gpt_model(dims, FP32, perform_initialization=False)
    load_hf_weights(model, HFReader(hf_dir).get, dims)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    ddp.zero_grad_buffer()
    data = batches(dims.vocab_size)
    g = torch.Generator().manual_seed(3)
    for b in data:
        b.extras["weights"] = torch.randn(b.input_ids.shape[0], b.input_ids.shape[1] - 1, generator=g)

    def loss_fn(logprobs, batch):
        return (logprobs * batch.extras["weights"]).sum(), {}

    run_microbatches(ddp, data, vocab_size=dims.vocab_size, loss_fn=loss_fn, temperature=TEMPERATURE, chunk_tokens=7)
    finalize_model_grads([ddp])
    hf.zero_grad()
    total = sum((hf_logprobs(hf, b.input_ids) * b.extras["weights"]).sum() for b in data) / len(data)
    total.backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    seen = 0
    for name, grad in export_hf_weights(model, dims, grads=True):
        check_close(f"grad {name}", grad, hf_grads[name], atol=1e-5, rtol=1e-3)
        seen += 1
    assert seen == len(hf_grads) - (1 if "lm_head.weight" in hf_grads and dims.tied_embeddings else 0), seen


def check_bit_exact(model, dims, hf_dir, label, bucket_bytes=256 << 20):
    """Every HF tensor gathered from the sharded model equals the original, bit for bit."""
    reader = HFReader(hf_dir)
    names = []
    for name, tensor in export_hf_weights(model, dims, bucket_bytes=bucket_bytes):
        want = reader.get(name)
        if tensor.dtype != want.dtype or not torch.equal(tensor, want):
            sys.exit(f"MISMATCH {label}: {name}")
        names.append(name)
    expected = [n for n in reader.names() if not (dims.tied_embeddings and n == "lm_head.weight")]
    if sorted(names) != sorted(expected):
        sys.exit(f"MISMATCH {label}: names differ: {sorted(set(expected) ^ set(names))}")


def export_peak_bytes(model, dims, bucket_bytes):
    """Peak bytes allocated (and not yet freed) while iterating the weight-sync export."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in export_hf_weights(model, dims, bucket_bytes=bucket_bytes):
            pass
    running = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            running += event.nbytes()
            peak = max(peak, running)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("scenario", choices=["parity", "save", "load", "bucket-memory"])
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    layout = init_parallel(args.tp, args.pp, seed=1)
    tag = f"TP{args.tp}PP{args.pp}"
    if args.scenario == "parity":
        for hf_dir in args.paths:
            model, dims = megatron_model(hf_dir)
            hf = hf_model(hf_dir)
            check_bit_exact(model, dims, hf_dir, f"{tag} round trip {hf_dir}")
            # one tensor per bucket, and buckets of a few tensors
            check_bit_exact(model, dims, hf_dir, f"{tag} round trip, 1-byte buckets", bucket_bytes=1)
            check_bit_exact(model, dims, hf_dir, f"{tag} round trip, 40 kB buckets", bucket_bytes=40_000)
            logprob_parity(model, dims, hf, layout, f"{tag} {dims.architecture} {hf_dir}")
            grad_parity(hf_dir, dims, hf, layout)
    elif args.scenario == "bucket-memory":
        model, dims = megatron_model(args.paths[0])
        params_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * args.tp
        largest = max(p.numel() * p.element_size() for p in model.parameters()) * args.tp
        small = max(largest, 1 << 20)
        # the profiler also sees allocations of other threads (gloo's); the export's own peak is
        # deterministic, so the least of three measurements is the one that excludes them
        peak_small = min(export_peak_bytes(model, dims, small) for _ in range(3))
        peak_all = export_peak_bytes(model, dims, 1 << 40)
        # a bucket lives as local shards, gathered shards, full tensors and unfused HF tensors
        if not (peak_small <= 12 * small and 3 * peak_small <= peak_all):
            sys.exit(f"MISMATCH bucket {small} B: export peak {peak_small} B (one bucket: {peak_all} B)")
        if not peak_all >= params_bytes // args.pp:
            sys.exit(f"MISMATCH one bucket: export peak {peak_all} B below this stage's model size")
        print(f"bucket {small} B -> peak {peak_small} B; one bucket -> peak {peak_all} B "
              f"(model {params_bytes} B)")
    else:
        hf_dir, ckpt = args.paths
        dims = model_dims(read_hf_config(hf_dir))
        if args.scenario == "save":
            model, dims = megatron_model(hf_dir)
            dist_ckpt.save_model(model, ckpt, hf_dir, dist_ckpt.dims_meta(dims))
        else:
            model = build_gpt_model(dims, FP32, perform_initialization=True)
            dist_ckpt.load_model(model, ckpt)
            check_bit_exact(model, dims, hf_dir, f"{tag} loaded {ckpt}")
            logprob_parity(model, dims, hf_model(hf_dir), layout, f"{tag} loaded {ckpt}")
    destroy_parallel()
    report_rank("OK", int(os.environ.get("RANK", 0)), f"{args.scenario} {tag}")


if __name__ == "__main__":
    main()
