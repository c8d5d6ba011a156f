"""Weight sync and rollout throughput on this machine (one process; run under torchrun).

    torchrun --standalone --nproc_per_node 1 bench/weight_sync.py [--hidden 512 --layers 8 --vocab 16384]

Sync: ``sync_weights`` (Megatron -> HF names -> vLLM in-place reload) against a plain copy of
the same bytes (every Megatron parameter copied into a preallocated buffer), in the same run;
``export_only_s`` is the Megatron side alone (gather + unfuse), the rest is vLLM's reload.
Rollout: tokens/s through ``RolloutEngine.generate`` against raw ``vllm.LLM.generate`` with the
same prompts and sampling parameters, in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prorl_megatron.checkpoint.hf_io import HFReader  # noqa: E402
from prorl_megatron.checkpoint.transfer import export_hf_weights, load_hf_weights  # noqa: E402
from prorl_megatron.config import PrecisionConfig, RolloutConfig  # noqa: E402
from prorl_megatron.models.architectures import model_dims, read_hf_config  # noqa: E402
from prorl_megatron.models.gpt import build_gpt_model  # noqa: E402
from prorl_megatron.parallel import init_parallel  # noqa: E402
from prorl_megatron.rollout.engine import RolloutEngine  # noqa: E402
from prorl_megatron.rollout.weight_sync import sync_weights  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    import transformers

    init_parallel(1, 1, seed=0)
    fp32 = PrecisionConfig(params_dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.Qwen2Config(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])
        transformers.Qwen2ForCausalLM(config).save_pretrained(tmp)
        dims = model_dims(read_hf_config(tmp))
        model = build_gpt_model(dims, fp32, perform_initialization=False)
        load_hf_weights(model, HFReader(tmp).get, dims)
        rollout = RolloutConfig(n=args.n, temperature=1.0, max_prompt_tokens=64, max_response_tokens=args.max_tokens,
                                cpu_kvcache_gib=2.0)
        engine = RolloutEngine(tmp, rollout, fp32, seed=0, tokenizer=False)

        sync_weights(model, dims, engine, "float32")  # warm-up
        stats = sync_weights(model, dims, engine, "float32")
        sync_s = best_of(3, lambda: sync_weights(model, dims, engine, "float32"))
        export_s = best_of(3, lambda: sum(1 for _ in export_hf_weights(model, dims)))
        params = [p.detach() for p in model.parameters()]
        buffers = [torch.empty_like(p) for p in params]

        def plain_copy():  # the same bytes, memcpy'd tensor by tensor
            for buffer, param in zip(buffers, params):
                buffer.copy_(param)

        copy_s = best_of(3, plain_copy)

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, args.vocab, (16,), generator=g).tolist() for _ in range(args.prompts)]
        engine.generate(prompts[:2], max_tokens=4)  # warm-up
        tokens = {}

        def adapter():
            out = engine.generate(prompts, seed=1)
            tokens["adapter"] = sum(len(s.response_ids) for group in out for s in group)

        def raw():
            params = [SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, logprobs=0, seed=1 + i)
                      for i in range(len(prompts))]
            out = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            tokens["raw"] = sum(len(c.token_ids) for o in out for c in o.outputs)

        adapter_s, raw_s = best_of(2, adapter), best_of(2, raw)
    result = {
        "model_bytes": stats.bytes, "tensors": stats.tensors,
        "sync_s": round(sync_s, 4), "plain_copy_s": round(copy_s, 4), "sync_over_copy": round(sync_s / copy_s, 2),
        "export_only_s": round(export_s, 4),  # gather + unfuse into HF tensors, no engine
        "adapter_tokens_per_s": round(tokens["adapter"] / adapter_s, 1),
        "raw_vllm_tokens_per_s": round(tokens["raw"] / raw_s, 1),
        "adapter_over_raw": round((tokens["adapter"] / adapter_s) / (tokens["raw"] / raw_s), 3),
    }
    print(json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
