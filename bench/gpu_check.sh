#!/usr/bin/env bash
# bench/gpu_check.py on a lent GPU (the device tool), as one command. Give the device the last
# line of this file as the command (or `bash bench/gpu_check.sh`), with carry [".whl"],
# kind nvidia-h200 and timeout_s 600: the script keeps itself to --budget-s 450 (7.5 minutes:
# the bf16 and fp16 straight runs and restarts first, the figures only where time is left) and
# rewrites $OUT/gpu_check.json after every launch; its log is $OUT/gpu_check.log.
# .whl/ (ignored through .git/info/exclude) holds megatron-core 0.16.1's cp312 manylinux wheel,
# made here with the device README's `pip download` line; its other needs (torch, numpy,
# packaging, psutil, safetensors, transformers' config reader) and PyYAML are on the device image.
# vLLM and the verifiers are never imported. Scratch (a random 1.5B-shaped HF model, checkpoints
# of ~14-28 GB, two at a time) goes to a temporary directory, removed at the end.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
