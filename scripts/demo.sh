#!/usr/bin/env bash
# The embedded tiny default on CPU, end to end (~5-10 minutes on 2 cores):
#   1. builds the tiny base model once (runs/tiny-base/hf: a 2-layer Qwen2 warmed up on addition),
#   2. trains it with ProRL — vLLM rollouts, math-verify rewards, Megatron TP=2 over two processes,
#      a scheduled reference reset — for recipes/tiny_cpu.yaml's 75 steps,
#   3. plots the metrics and prints validation pass@1 / pass@8 before and after.
# Extra arguments are recipe overrides, e.g. `bash scripts/demo.sh train.steps=30`; the summary
# reads the run where the overrides put it (logging.dir, checkpoint.dir). Every demo is a fresh
# run: its directories are emptied first when they lie under runs/, and refused when they lie
# elsewhere and hold something (the recipe would otherwise resume that run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" demo
cd "$ROOT"
RECIPE=recipes/tiny_cpu.yaml
# the recipe as the overrides resolve it (a bad override stops here, naming the key)
mapfile -t resolved < <(python -m prorl_megatron.config --recipe "$RECIPE" --get model.hf_path --get logging.dir \
  --get checkpoint.dir --get eval.n_samples --get eval.temperature "$@" || echo FAILED)
if [ "${#resolved[@]}" -ne 5 ]; then
    exit 2
fi
BASE="${resolved[0]}" LOGS="${resolved[1]}" CKPT="${resolved[2]}"
for dir in "$LOGS" "$CKPT"; do
    case "$(realpath -m "$dir")/" in
    "$ROOT/runs/"?*) rm -rf "$dir" ;;
    *)
        if [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
            echo "error: $dir is not empty: the demo starts a fresh run; remove it or choose another directory" >&2
            exit 2
        fi
        ;;
    esac
done
case "$(realpath -m "$BASE")/" in  # the demo's own base model is (re)built there; another is used as it is
"$ROOT/runs/"?*) python -m prorl_megatron.demo.tiny_base --out "$BASE" ;;
*) [ -f "$BASE/config.json" ] || { echo "error: model.hf_path=$BASE: no config.json there" >&2; exit 2; } ;;
esac
OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
  -m prorl_megatron.train --recipe "$RECIPE" "$@"
echo
echo "validation (held-out sums, ${resolved[3]} samples each, temperature ${resolved[4]}):"
python tools/plot.py "$LOGS"
echo "  metrics: $LOGS/metrics.jsonl   checkpoints: $CKPT"
