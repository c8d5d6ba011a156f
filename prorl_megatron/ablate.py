"""Ablation grids: named recipe overrides x seeds, each run trained, evaluated at large k, reported.

A grid file (``recipes/ablations/*.yaml``) names a base recipe, the base model it starts from
(built here if missing, by :mod:`prorl_megatron.demo.tiny_base`), the seeds, the arms (each a
set of recipe overrides) and the comparisons the report draws (each a set of arms)::

    python -m prorl_megatron.ablate --grid recipes/ablations/add4.yaml          # run what is missing, report
    python -m prorl_megatron.ablate --grid recipes/ablations/add4.yaml --report # the report only

Paths in a grid file (and in the recipes it names) are relative to the repository root.
Every run has its own directory ``{runs_dir}/{arm}/seed{seed}``: ``overrides.json`` (what it
was started with: a changed grid refuses to mix with it), ``logs/metrics.jsonl``,
``checkpoints/``, ``train.log`` and ``eval.json`` — pass@k of its last checkpoint on the
validation prompts with ``eval.n_samples`` samples each, and each prompt's counts. A run with an
``eval.json`` is finished and never rerun; a killed run resumes from its last checkpoint. Runs go
``jobs`` at a time (default: the machine's cores / the processes one run takes). The base model
is evaluated the same way (``{runs_dir}/base/eval.json``). The report
(:mod:`prorl_megatron.ablate_report`) is written to ``docs_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


from prorl_megatron.ablate_grid import Arm, Grid, GridError, load_grid, override_args
from prorl_megatron.checkpoint.train_state import find_checkpoint

log = logging.getLogger("prorl_megatron.ablate")
ROOT = Path(__file__).resolve().parent.parent


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def _run_logged(cmd: list[str], log_file: Path, env: dict[str, str]) -> None:
    with open(log_file, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {' '.join(cmd[-6:])} (see {log_file})")


def evaluate_into(grid: Grid, checkpoint: Path, out: Path, seed: int, env: dict[str, str], log_file: Path,
                  arm_overrides: dict[str, Any] | None = None) -> None:
    """pass@k of ``checkpoint`` on the recipe's validation prompts, with each prompt's counts,
    written to ``out`` atomically (a present ``out`` is a finished evaluation). The arm's
    overrides apply (a staged run's checkpoint needs its stage list); the evaluation's own
    settings win over them."""
    tmp = out.with_suffix(".json.tmp")
    overrides = {**grid.common, **(arm_overrides or {}), "seed": seed, "eval.n_samples": grid.eval_n,
                 "eval.ks": list(grid.eval_ks), "logging.dir": str(out.parent / "eval_logs")}
    cmd = [*_torchrun(grid.procs_per_run), "-m", "prorl_megatron.eval", "--recipe", grid.recipe,
           "--checkpoint", str(checkpoint), "--out", str(tmp), "--per-prompt", *override_args(overrides)]
    _run_logged(cmd, log_file, env)
    os.replace(tmp, out)


def run_arm(grid: Grid, arm: Arm, seed: int, env: dict[str, str]) -> str:
    """Train ``arm`` with ``seed`` (resuming a killed run) and evaluate its last checkpoint."""
    run = grid.run_dir(arm.name, seed)
    started_with = {"recipe": grid.recipe, "overrides": override_args({**grid.common, **arm.overrides}), "seed": seed}
    record = run / "overrides.json"
    if record.is_file() and json.loads(record.read_text()) != started_with:
        raise RuntimeError(f"{run}: started with other settings ({record}) than the grid now gives; "
                           "delete the directory to run it afresh")
    if (run / "eval.json").is_file():
        return f"{arm.name} seed {seed}: finished earlier"
    run.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(started_with, indent=1) + "\n")
    start = time.time()
    arm_args = started_with["overrides"]
    paths = override_args({"seed": seed, "checkpoint.dir": str(run / "checkpoints"), "logging.dir": str(run / "logs")})
    _run_logged([*_torchrun(grid.procs_per_run), "-m", "prorl_megatron.train", "--recipe", grid.recipe,
                 *arm_args, *paths], run / "train.log", env)
    last = find_checkpoint(run / "checkpoints", "auto")
    if last is None:
        raise RuntimeError(f"{run / 'checkpoints'}: training ended without a checkpoint")
    evaluate_into(grid, last, run / "eval.json", seed, env, run / "train.log", arm_overrides=arm.overrides)
    return f"{arm.name} seed {seed}: {time.time() - start:.0f} s"


def ensure_base(grid: Grid, env: dict[str, str]) -> None:
    """Build the base model if it is missing, and evaluate it once (with the first seed)."""
    b = grid.base
    _run_logged([sys.executable, "-m", "prorl_megatron.demo.tiny_base", "--task", b.task, "--target", str(b.target),
                 "--seed", str(b.seed), "--out", b.hf_dir], Path(grid.runs_dir) / "base.log", env)
    out = Path(grid.runs_dir) / "base" / "eval.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        evaluate_into(grid, Path(b.hf_dir), out, grid.seeds[0], env, Path(grid.runs_dir) / "base.log")


def run_grid(grid: Grid, jobs: int) -> list[str]:
    """Every (arm, seed) not yet finished, ``jobs`` at a time; returns the failures."""
    Path(grid.runs_dir).mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // (jobs * grid.procs_per_run))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    ensure_base(grid, env)
    todo = [(arm, seed) for seed in grid.seeds for arm in grid.arms]
    failures = []

    def one(item: tuple[Arm, int]) -> None:
        arm, seed = item
        try:
            log.info("%s", run_arm(grid, arm, seed, env))
        except Exception as e:  # one failed run does not stop the others; it is reported at the end
            failures.append(f"{arm.name} seed {seed}: {e}")
            log.error("%s seed %d failed: %s", arm.name, seed, e)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="a grid file, e.g. recipes/ablations/add4.yaml")
    parser.add_argument("--report", action="store_true", help="only write the report from finished runs")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: cores / processes per run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        grid = load_grid(Path(args.grid).resolve())
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.chdir(ROOT)  # the grid's and its recipes' relative paths are the repository's
    failures = []
    if not args.report:
        jobs = args.jobs or max(1, (os.cpu_count() or 1) // grid.procs_per_run)
        failures = run_grid(grid, jobs)
    from prorl_megatron.ablate_report import write_report

    written = write_report(grid)
    for path in written:
        print(f"report: {path}")
    for f in failures:
        print(f"failed: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
