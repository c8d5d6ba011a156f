#!/usr/bin/env bash
# Check (and where allowed install) the system packages, then create (or reuse) the project's
# virtual environment in .venv and install the pinned CPU dependencies into it. Sourced by
# scripts/demo.sh and scripts/test.sh with what they need (`source setup_env.sh demo|test`); safe
# to re-run: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PRORL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

PYTHON="$PYTHON" bash "$ROOT/scripts/system_packages.sh" "${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.prorl-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing prorl-megatron and its pinned CPU dependencies (torch 2.13.0 CPU build)"
    PYTHON="$VENV/bin/python" PRORL_INSTALL_LOG="$VENV/pip-install.log" bash "$ROOT/scripts/install.sh" cpu
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
