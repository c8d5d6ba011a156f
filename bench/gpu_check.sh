#!/usr/bin/env bash
# bench/gpu_check.py on a lent GPU (the device tool), as one command. Give the device the last
# line of this file as the command (or `bash bench/gpu_check.sh`), with carry [".whl"],
# kind nvidia-h200 and timeout_s 480: the script keeps itself to about 5 minutes (--budget-s 300
# skips timed rounds that would not fit) and rewrites $OUT/gpu_check.json after every section.
# .whl/ (ignored through .git/info/exclude) holds megatron-core 0.16.1's cp312 manylinux wheel,
# made here with the device README's `pip download` line; its other needs (torch, numpy,
# packaging) and PyYAML (prorl_megatron.config) are on the device image. vLLM is never imported.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
