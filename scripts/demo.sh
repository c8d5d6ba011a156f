#!/usr/bin/env bash
# The embedded tiny default on CPU, end to end (~5-10 minutes on 2 cores):
#   1. builds the tiny base model once (runs/tiny-base/hf: a 2-layer Qwen2 warmed up on addition),
#   2. trains it with ProRL — vLLM rollouts, math-verify rewards, Megatron TP=2 over two processes,
#      a scheduled reference reset — for recipes/tiny_cpu.yaml's 60 steps,
#   3. plots the metrics and prints validation pass@1 / pass@8 before and after.
# Extra arguments are recipe overrides, e.g. `bash scripts/demo.sh train.steps=30`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" demo
cd "$ROOT"
RUN=runs/tiny-cpu
python -m prorl_megatron.demo.tiny_base --out runs/tiny-base/hf
rm -rf "$RUN"  # a fresh run every time (the recipe would otherwise resume the previous one)
OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
  -m prorl_megatron.train --recipe recipes/tiny_cpu.yaml "$@"
echo
echo "validation (256 held-out sums, 8 samples each, temperature 1.0):"
python tools/plot.py "$RUN/logs"
echo "  metrics: $RUN/logs/metrics.jsonl   checkpoints: $RUN/checkpoints"
