"""Where a training step's time goes: the demo recipe on this machine.

    python bench/step.py phases [--steps 12] [key.sub=value ...]

``phases`` runs ``prorl_megatron.train`` (2 processes, recipes/tiny_cpu.yaml, the demo's base
model) for a few steps and reports the mean seconds of each phase over the steps after the
first, with each phase as a fraction of the step (the baseline of the same run).

The 1.5B update on a GPU (tokens/s, MFU, memory against the plan, the chunked logprob
pass against full logits) is ``bench/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def phases(args: argparse.Namespace) -> dict:
    from prorl_megatron.metrics import read_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "prorl_megatron.train", "--recipe", "recipes/tiny_cpu.yaml", f"train.steps={args.steps}",
               f"checkpoint.dir={tmp}/ckpt", f"logging.dir={tmp}/logs", "eval.every_n_steps=0",
               "checkpoint.every_n_steps=4", "logging.console_every=0", *args.overrides]
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-4000:])
        records = [r for r in read_jsonl(Path(tmp) / "logs" / "metrics.jsonl") if "event" not in r and r["step"] > 1]
    keys = sorted({k for r in records for k in r if k.startswith("time/")})
    mean = {k: sum(r.get(k, 0.0) for r in records) / len(records) for k in keys}
    step = mean.pop("time/step")
    return {"steps_measured": len(records), "step_s": round(step, 3),
            "phases": {k[5:]: {"s": round(v, 3), "fraction_of_step": round(v / step, 3)} for k, v in mean.items()},
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in records) / len(records), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("phases")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = phases(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
