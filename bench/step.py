"""Where a training step's time goes, and (on a GPU) the update phase's MFU and logprob memory.

    python bench/step.py phases [--steps 12] [key.sub=value ...]   # the demo recipe on this machine
    torchrun --standalone --nproc_per_node 1 bench/step.py update [--seq 8192] [--small]

``phases`` runs ``prorl_megatron.train`` (2 processes, recipes/tiny_cpu.yaml, the demo's base
model) for a few steps and reports the mean seconds of each phase over the steps after the
first, with each phase as a fraction of the step (the baseline of the same run).

``update`` builds a random Qwen2-shaped 1.5B model (DeepSeek-R1-Distill-Qwen-1.5B's shape,
bf16, TP1) and times forward+backward of the policy loss through ``run_microbatches`` on
sequences of ``--seq`` tokens: MFU = model FLOPs (6 x parameters x tokens + attention) / time
/ the device's peak bf16 FLOP/s. It then compares the peak memory of the chunked,
vocab-parallel logprob pass with a naive pass that materialises full float32 logits.
``--small`` shrinks everything (a smoke run of the code path; no CUDA needed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense, SXM


def phases(args: argparse.Namespace) -> dict:
    from prorl_megatron.metrics import read_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "prorl_megatron.train", "--recipe", "recipes/tiny_cpu.yaml", f"train.steps={args.steps}",
               f"checkpoint.dir={tmp}/ckpt", f"logging.dir={tmp}/logs", "eval.every_n_steps=0",
               "checkpoint.every_n_steps=4", "logging.console_every=0", *args.overrides]
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-4000:])
        records = [r for r in read_jsonl(Path(tmp) / "logs" / "metrics.jsonl") if "event" not in r and r["step"] > 1]
    keys = sorted({k for r in records for k in r if k.startswith("time/")})
    mean = {k: sum(r.get(k, 0.0) for r in records) / len(records) for k in keys}
    step = mean.pop("time/step")
    return {"steps_measured": len(records), "step_s": round(step, 3),
            "phases": {k[5:]: {"s": round(v, 3), "fraction_of_step": round(v / step, 3)} for k, v in mean.items()},
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in records) / len(records), 1)}


def model_flops(dims, tokens: int, seq: int) -> float:
    """Forward+backward FLOPs: 6 per parameter per token, plus causal attention (QK^T and AV)."""
    per_layer = (dims.hidden_size * dims.head_dim * (dims.num_heads + 2 * dims.num_kv_heads)
                 + dims.num_heads * dims.head_dim * dims.hidden_size + 3 * dims.hidden_size * dims.ffn_hidden_size)
    params = dims.num_layers * per_layer + dims.padded_vocab_size * dims.hidden_size  # output layer
    attention = dims.num_layers * 2 * 2 * dims.num_heads * dims.head_dim * seq / 2  # causal: half
    return 3 * (2 * params + attention) * tokens


def update(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from prorl_megatron.algo import policy_loss
    from prorl_megatron.config import PrecisionConfig, TrainConfig
    from prorl_megatron.models.architectures import model_dims
    from prorl_megatron.models.forward import MicroBatch, run_microbatches
    from prorl_megatron.models.logprobs import hidden_states_output, logprobs_from_hidden, next_token_labels
    from prorl_megatron.models.policy import build_optimizer, build_policy, finalize_grads, optimizer_step, zero_grads
    from prorl_megatron.parallel import init_parallel

    small = args.small
    shape = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2) if small else \
        dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
             num_attention_heads=12, num_key_value_heads=2)
    config = transformers.Qwen2Config(**shape, max_position_embeddings=max(args.seq, 4096),
                                      tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])
    dims = model_dims(config)
    layout = init_parallel(1, 1, seed=0)
    cuda = layout.device.type == "cuda"
    dtype = "bfloat16" if cuda or not small else "float32"
    precision = PrecisionConfig(params_dtype=dtype)
    gpt, ddp = build_policy(dims, precision)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.02)
    optimizer = build_optimizer(ddp, TrainConfig(lr=1e-6), precision)
    seq = args.seq
    ids = torch.randint(0, dims.vocab_size, (1, seq), device=layout.device)

    def loss_fn(logprobs, mb):
        mask = torch.ones_like(logprobs, dtype=torch.bool)
        loss, _ = policy_loss(logprobs, logprobs.detach(), torch.ones_like(logprobs), mask)
        return loss, {}

    def one_update():
        zero_grads(ddp, optimizer)
        run_microbatches(ddp, [MicroBatch(ids) for _ in range(args.micro_batches)], vocab_size=dims.vocab_size,
                         loss_fn=loss_fn, chunk_tokens=args.chunk_tokens)
        finalize_grads(ddp)
        optimizer_step(optimizer)

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    one_update()  # warm-up
    synchronize()
    start = time.perf_counter()
    for _ in range(args.repeats):
        one_update()
    synchronize()
    seconds = (time.perf_counter() - start) / args.repeats
    tokens = seq * args.micro_batches
    result = {"model": "qwen2-1.5b-shape" if not small else "small", "dtype": dtype, "seq": seq,
              "tokens_per_update": tokens, "update_s": round(seconds, 4),
              "tokens_per_s": round(tokens / seconds, 1), "model_tflops_per_s": round(model_flops(dims, tokens, seq)
                                                                                      / seconds / 1e12, 2)}
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        result["device"] = name
        if peak:
            result["mfu"] = round(model_flops(dims, tokens, seq) / seconds / peak, 4)

    # logprob pass memory: chunked vocab-parallel vs full float32 logits (forward+backward of one sequence)
    def chunked():
        positions = torch.arange(seq, device=ids.device)[None]
        with hidden_states_output(gpt):
            hidden = gpt(ids, positions, None)
        return logprobs_from_hidden(gpt, hidden, next_token_labels(ids), dims.vocab_size,
                                    chunk_tokens=args.chunk_tokens)

    def naive():
        positions = torch.arange(seq, device=ids.device)[None]
        logits = gpt(ids, positions, None).float()[..., : dims.vocab_size]  # [B, S, V]
        return torch.log_softmax(logits, -1).gather(-1, next_token_labels(ids)[..., None])[..., 0]

    if cuda:
        for name, fn in (("chunked", chunked), ("naive_full_logits", naive)):
            zero_grads(ddp, optimizer)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn().sum().backward()
            torch.cuda.synchronize()
            result[f"logprob_peak_gib/{name}"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        result["logprob_peak_ratio_naive_over_chunked"] = round(
            result["logprob_peak_gib/naive_full_logits"] / result["logprob_peak_gib/chunked"], 2)
    else:
        chunked().sum().backward()  # the code path runs; memory is only measured on CUDA
        naive().sum().backward()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("phases")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("overrides", nargs="*")
    u = sub.add_parser("update")
    u.add_argument("--seq", type=int, default=8192)
    u.add_argument("--micro-batches", type=int, default=2)
    u.add_argument("--chunk-tokens", type=int, default=4096)
    u.add_argument("--repeats", type=int, default=3)
    u.add_argument("--small", action="store_true")
    args = parser.parse_args()
    result = phases(args) if args.mode == "phases" else update(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
