"""Measure one training update's memory on CPU and print it next to the memory plan's figure.

    python -m tests.plan_worker '{"shape": {...}, "dtype": "float32", "recompute": "none",
                                  "rows": 2, "seq": 1024, "chunk": 1024}'

A world of one (gloo). Random weights, a Qwen2-shaped config built from ``shape`` (no HF
directory). Everything the trainer builds is built — policy (DDP, ``train.recompute``),
reference, megatron optimizer — then a small warm-up update creates Adam's state, then on one
micro-batch of ``rows`` x ``seq`` tokens: the logprob pass (policy with entropy, reference; no
grad) and the update (forward + backward through ``run_microbatches`` with a loss,
``finalize_grads``, ``optimizer_step``). Memory is the torch CPU allocator's, from the profiler's
allocation events since before the model was built (so the baseline is exactly zero, and only
tensors count, as in the plan); the peak is taken inside each of the two passes. Prints one JSON
line: measured and planned bytes of both passes.
"""

from __future__ import annotations

import json
import sys

import torch


def peaks(prof, names: list[str]) -> dict[str, int]:
    """The highest allocated bytes inside each ``record_function`` range named in ``names``."""
    events = list(prof.profiler.kineto_results.events())
    ranges = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name() in names}
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    running, out = 0, dict.fromkeys(names, 0)
    for t, nbytes in memory:
        running += nbytes
        for name, (start, end) in ranges.items():
            if start <= t <= end:
                out[name] = max(out[name], running)
    return out


def main(spec: dict) -> dict:
    import transformers
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from torch.profiler import ProfilerActivity, profile, record_function

    from prorl_megatron.config import Recipe
    from prorl_megatron.models.architectures import model_dims
    from prorl_megatron.models.forward import MicroBatch, run_microbatches
    from prorl_megatron.models.gpt import build_gpt_model
    from prorl_megatron.models.policy import (
        _with_precision, build_optimizer, build_reference, finalize_grads, optimizer_step, zero_grads,
    )
    from prorl_megatron.parallel import init_parallel
    from prorl_megatron.plan import estimate

    torch.set_num_threads(spec.get("threads", 2))
    init_parallel(1, 1, seed=0)
    config = transformers.Qwen2Config(**spec["shape"], max_position_embeddings=max(4096, spec["seq"]),
                                      architectures=["Qwen2ForCausalLM"])
    dims = model_dims(config)
    recipe = Recipe()
    recipe.precision.params_dtype = spec["dtype"]
    recipe.parallel.tensor = 1
    recipe.rollout.max_prompt_tokens, recipe.rollout.max_response_tokens = 1, spec["seq"] - 1
    recipe.train.micro_batch_size = spec["rows"]
    recipe.train.recompute = spec["recompute"]
    recipe.train.logprob_chunk_tokens = spec["chunk"]
    plan = estimate(recipe, dims, world_size=1, te=False, on_gpu=False)

    g = torch.Generator().manual_seed(0)
    big = [MicroBatch(torch.randint(0, dims.vocab_size, (spec["rows"], spec["seq"]), generator=g))]
    small = [MicroBatch(torch.randint(0, dims.vocab_size, (1, 8), generator=g))]

    def update(ddp, optimizer, batches):
        zero_grads(ddp, optimizer)
        run_microbatches(ddp, batches, vocab_size=dims.vocab_size, loss_fn=lambda lp, mb: (-lp.mean(), {}),
                         temperature=1.2, chunk_tokens=spec["chunk"])
        finalize_grads(ddp)
        optimizer_step(optimizer)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        # build_policy with train.recompute (what the trainer builds)
        gpt = build_gpt_model(dims, recipe.precision, perform_initialization=True, recompute=spec["recompute"])
        ddp = DistributedDataParallel(gpt.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=recipe.precision.grad_reduce_in_fp32), _with_precision(gpt, recipe.precision))
        _, reference = build_reference(dims, recipe.precision)
        optimizer = build_optimizer(ddp, recipe.train, recipe.precision)
        update(ddp, optimizer, small)  # Adam's state exists from here on, as in every later update
        if spec.get("logprobs", True):
            with record_function("logprobs"), torch.no_grad():
                run_microbatches(ddp, big, vocab_size=dims.vocab_size, with_entropy=True, temperature=1.2,
                                 chunk_tokens=spec["chunk"])
                run_microbatches(reference, big, vocab_size=dims.vocab_size, temperature=1.2,
                                 chunk_tokens=spec["chunk"])
        with record_function("update"):
            update(ddp, optimizer, big)
    passes = ["logprobs", "update"] if spec.get("logprobs", True) else ["update"]
    measured = peaks(prof, passes)
    return {"measured": measured, "planned": {k: plan.own_bytes[k] for k in passes},
            "rows": {r.what: r.bytes for r in plan.rows}}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
