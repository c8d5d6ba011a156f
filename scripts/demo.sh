#!/usr/bin/env bash
# The embedded tiny default on CPU: sets up .venv, prints the resolved tiny recipe and runs
# the algorithm self-check (ProRL's algorithm core end to end on a tabular policy).
# Extra arguments are recipe overrides, e.g. `bash scripts/demo.sh algo.eps_high=0.28`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec python -m prorl_megatron.selfcheck --recipe recipes/tiny_cpu.yaml --print-config "$@"
