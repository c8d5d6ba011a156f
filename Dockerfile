# prorl-megatron for GPU clusters: an NGC PyTorch base (CUDA torch, Transformer Engine, apex),
# then the pinned vLLM and megatron-core and this project, installed by scripts/install.sh gpu
# (CI runs the same script's CPU path on every change).
#
#   docker build -t prorl-megatron:latest .
#   enroot import -o prorl-megatron.sqsh dockerd://prorl-megatron:latest   # for pyxis/enroot
#
# NGC_TAG must be an image whose torch is the version vllm (pyproject's `gpu` extra) was built
# against — torch 2.14 for vllm 0.33.0; the install script fails the build if pip would have to
# replace the image's torch or if vLLM's compiled kernels do not load.
ARG NGC_TAG=26.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

# bubblewrap: the sandbox for model-written code (rewards.code_sandbox=bwrap)
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap procps \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/prorl-megatron
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY prorl_megatron/ prorl_megatron/
RUN PYTHON=python bash scripts/install.sh gpu
COPY . .

ENV PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1
# The job script runs `python -m prorl_megatron.train` inside this image with the project
# directory mounted at the same path (slurm/prorl_1p5b.sh, PRORL_CONTAINER=...).
CMD ["python", "-m", "prorl_megatron.train", "--help"]
