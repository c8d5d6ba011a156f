"""Generation that does not wait, measured on this machine (issue 24 item 6): the colocated loop's
waves (the rounds of dynamic sampling, today's default) against streaming (prompts drawn ahead,
the step cut when its batch is full: stragglers aborted, or carried on a version later).

    python bench/async.py [--recipes tiny_cpu,add4_cpu] [--steps 75] [--seeds 1,2,3] [--json]

Each (recipe, mode, seed) is one real training run of ``--steps`` steps (torchrun, 2 processes,
the recipe's layout), one at a time so that they have the machine alike, under
``runs/bench-async/``; a run with its metrics already there is read, not rerun. Figures per run,
from its metrics.jsonl: steps/s (over the steps' wall time), samples/s (generated samples over
that time), the generation side's share of a step (rollout + reward over the step: with the
engine and the trainer on the same cores, "busy" is the share of time each phase holds them),
samples generated per group that trained, the share of steps whose batch was full, validation
pass@1 at the last step; then the mean and
spread over seeds. The separate placement (engines on their own processes) is not built: no row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prorl_megatron.metrics import read_jsonl  # noqa: E402

MODES = {  # mode -> recipe overrides
    "waves (today)": [],
    "stream, abort": ["rollout.overdraw=0.5"],
    "stream, resume k=1": ["rollout.overdraw=0.5", "rollout.partial=resume", "rollout.max_staleness=1"],
}
BASES = {"tiny_cpu": ["python", "-m", "prorl_megatron.demo.tiny_base", "--out", "runs/tiny-base/hf"],
         "add4_cpu": ["python", "-m", "prorl_megatron.demo.tiny_base", "--task", "add4", "--target", "0.05",
                      "--out", "runs/add4-base/hf"]}


def run_dir(recipe: str, mode: str, seed: int) -> Path:
    return ROOT / "runs" / "bench-async" / recipe / mode.replace(" ", "").replace(",", "-").replace("=", "") / \
        f"seed{seed}"


def train(recipe: str, mode: str, seed: int, steps: int) -> Path:
    """One run (skipped when its metrics are complete); returns its directory."""
    out = run_dir(recipe, mode, seed)
    metrics = out / "logs" / "metrics.jsonl"
    if metrics.is_file() and any(r.get("step") == steps and "event" not in r for r in read_jsonl(metrics)):
        return out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "prorl_megatron.train", "--recipe", f"recipes/{recipe}.yaml", f"seed={seed}", f"train.steps={steps}",
           f"logging.dir={out}/logs", f"checkpoint.dir={out}/ckpt", "checkpoint.every_n_steps=0",
           "checkpoint.resume=none", *MODES[mode]]
    print(f"[bench] {recipe} {mode} seed {seed}: training {steps} steps", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return out


def figures(out: Path, n: int, target: int) -> dict[str, float]:
    """One run's figures (see the module docstring) from its metrics."""
    steps = [r for r in read_jsonl(out / "logs" / "metrics.jsonl") if "event" not in r and r["step"] > 0]
    wall = sum(r["time/step"] for r in steps)
    generated = sum(r["sampling/prompts"] - r.get("sampling/aborted_groups", 0) for r in steps) * n
    trained = sum(r["sampling/kept_groups"] for r in steps)
    generation = sum(r.get("time/rollout", 0.0) + r.get("time/reward", 0.0) for r in steps)
    last = steps[-1]
    return {"steps_per_s": len(steps) / wall, "samples_per_s": generated / wall, "generation_share": generation / wall,
            "samples_per_trained_group": generated / max(trained, 1),
            "full_batch_frac": sum(r["sampling/kept_groups"] == target for r in steps) / len(steps),
            "val_pass@1": last.get("val/pass@1", float("nan"))}


def summary(rows: list[dict[str, float]]) -> dict[str, str]:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        mean = statistics.fmean(values)
        out[key] = f"{mean:.3g}" + (f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else "")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="tiny_cpu,add4_cpu")
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from prorl_megatron.config import load_recipe

    table = []
    for recipe in args.recipes.split(","):
        subprocess.run(BASES[recipe], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                       stdout=subprocess.DEVNULL)
        cfg = load_recipe(ROOT / "recipes" / f"{recipe}.yaml")
        for mode in MODES:
            rows = [figures(train(recipe, mode, int(s), args.steps), cfg.rollout.n, cfg.train.prompts_per_step)
                    for s in args.seeds.split(",")]
            table.append({"recipe": recipe, "mode": mode, **summary(rows)})
    if args.json:
        print(json.dumps(table))
        return 0
    keys = list(table[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in table:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
