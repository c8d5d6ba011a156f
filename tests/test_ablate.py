"""The ablation runner: a grid file's errors, and a two-arm, one-seed grid run end to end."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

import numpy as np

from prorl_megatron.ablate_grid import GridError, load_grid
from prorl_megatron.ablate_report import (Run, bootstrap_interval, coverage_change, equal_samples_line, fill_blocks,
                                          samples_to_reach)

from tests import procs

ROOT = Path(__file__).resolve().parent.parent


def write_grid(path: Path, **changes) -> Path:
    grid = {"name": "g", "recipe": "recipes/tiny_cpu.yaml", "base": {"hf_dir": "x"}, "seeds": [1],
            "arms": {"a": {}, "b": {"overrides": {"algo.eps_high": 0.2, "eval.n_samples": 3}}},
            "comparisons": {"ab": {"arms": ["a", "b"], "x": "samples"}}, "eval": {"n_samples": 4, "ks": [1, 2]}}
    grid.update(changes)
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"seed": [1]}, "unknown key(s) seed"),
    ({"comparisons": {"ab": {"arms": ["a", "c"]}}}, "comparisons.ab.arms: no arm named c"),
    ({"eval": {"n_samples": 100, "ks": [1, 64]}}, "eval.n_samples: 100 < 2 x the largest k (64)"),
    ({"arms": {"a": {"override": {}}}}, "arms.a: unknown key(s) override"),
])
def test_grid_errors_name_the_field(tmp_path, changes, message):
    path = write_grid(tmp_path / "grid.yaml", **changes)
    with pytest.raises(GridError, match=f"{path}: .*{message.replace('(', '.').replace(')', '.')}"):
        load_grid(path)


def test_shipped_grid_arms_make_valid_recipes():
    from prorl_megatron.ablate_grid import override_args
    from prorl_megatron.config import load_recipe

    grid = load_grid(ROOT / "recipes" / "ablations" / "add4.yaml")
    assert len(grid.seeds) >= 3 and max(grid.eval_ks) >= 64
    recipes = {a.name: load_recipe(ROOT / grid.recipe, override_args(a.overrides)) for a in grid.arms}
    assert (recipes["prorl"].algo.eps_high, recipes["clip-0.2-0.2"].algo.eps_high) == (0.4, 0.2)
    assert recipes["no-kl"].algo.kl_coef == 0 and recipes["prorl"].algo.kl_coef >= 0.01
    assert recipes["kl-no-reset"].reset.after_steps is None and recipes["prorl"].reset.after_steps
    assert not recipes["no-dynamic-sampling"].algo.dynamic_sampling and recipes["prorl"].algo.dynamic_sampling
    assert len(recipes["staged"].stages) >= 2


def synthetic_run(arm: str, val: dict[int, float], prompts_per_step: int, steps: int = 4) -> Run:
    metrics = [{"step": 0, "val/pass@1": val.get(0, 0.0)}]
    metrics += [{"step": s, "sampling/prompts": prompts_per_step, **({"val/pass@1": val[s]} if s in val else {})}
                for s in range(1, steps + 1)]
    return Run(arm, 1, np.zeros((1, 1)), {}, metrics, n_per_prompt=8)


def test_samples_to_reach_and_equal_cost_read_the_sample_count_at_each_evaluation():
    thrifty = synthetic_run("off", {0: 0.1, 2: 0.2, 4: 0.3}, prompts_per_step=1)  # 8, 16, 24, 32 samples
    costly = synthetic_run("on", {0: 0.1, 2: 0.3, 4: 0.5}, prompts_per_step=2)  # 16, 32, 48, 64 samples
    assert samples_to_reach(costly, 0.3) == 32 and samples_to_reach(thrifty, 0.3) == 32
    assert samples_to_reach(thrifty, 0.31) is None
    # at 32 samples (the thrifty run's total): off has 0.3, on has 0.3 (its step-2 evaluation)
    line = equal_samples_line({"off": [thrifty], "on": [costly]}, ("off", "on"))
    assert "off 0.3 ± 0; on 0.3 ± 0." in line
    # at 24 samples: off interpolates between 16 (0.2) and 32 (0.3) -> 0.25; on between 0 and 32 -> 0.25
    shorter = synthetic_run("off", {0: 0.1, 2: 0.2, 3: 0.25}, prompts_per_step=1, steps=3)
    assert "off 0.25 ± 0; on 0.25 ± 0." in equal_samples_line({"off": [shorter], "on": [costly]}, ("off", "on"))


def test_bootstrap_interval_covers_the_seed_mean_and_collapses_on_equal_prompts():
    rng = np.random.default_rng(0)
    runs = [Run("a", s, rng.uniform(size=(200, 2)), {}, []) for s in range(3)]
    lo, hi = bootstrap_interval(runs)
    mean = np.mean([r.passk.mean(axis=0) for r in runs], axis=0)
    assert np.all(lo < mean) and np.all(mean < hi) and np.all(hi - lo < 0.1)
    flat = [Run("a", s, np.full((50, 2), 0.25 * (s + 1)), {}, []) for s in range(2)]
    lo, hi = bootstrap_interval(flat)
    assert np.allclose(lo, 0.375) and np.allclose(hi, 0.375)


def test_coverage_change_counts_prompts_gained_and_lost():
    def run(correct):
        return Run("a", 1, np.zeros((len(correct), 1)), {"per_prompt": [{"n": 4, "correct": c} for c in correct]}, [])
    assert coverage_change(run([0, 0, 2, 1, 0]), run([1, 0, 0, 3, 2])) == (2, 1)
    with pytest.raises(ValueError, match="other prompts"):
        coverage_change(run([0, 1]), run([0]))


def test_report_blocks_replace_only_their_body():
    text = "intro\n<!-- ablate:x -->\nold\n<!-- /ablate:x -->\nverdict\n"
    assert fill_blocks(text, {"x": "| new |\n", "y": "unused"}) == \
        "intro\n<!-- ablate:x -->\n| new |\n<!-- /ablate:x -->\nverdict\n"


def test_two_arm_grid_runs_reports_and_does_not_rerun(tiny_base, tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# results\n<!-- ablate:ab -->\n<!-- /ablate:ab -->\nour verdict\n")
    grid = write_grid(
        tmp_path / "grid.yaml", base={"hf_dir": str(tiny_base), "task": "addition", "target": 0.1},
        runs_dir=str(tmp_path / "runs"), docs_dir=str(tmp_path / "docs"), results_md=str(results),
        common={"model.hf_path": str(tiny_base), "parallel.tensor": 1, "rollout.engine_tensor_parallel": 1,
                "train.steps": 2, "train.prompts_per_step": 8, "train.mini_batch_prompts": 8,
                "checkpoint.every_n_steps": 0, "reset.every_n_steps": None, "eval.n_samples": 2, "eval.ks": [1, 2]})
    cmd = [sys.executable, "-m", "prorl_megatron.ablate", "--grid", str(grid)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # started elsewhere than the repository: the grid's recipe path is the repository's
    done = procs.run(cmd, timeout=900, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    for arm in ("a", "b"):
        run = tmp_path / "runs" / arm / "seed1"
        table = json.loads((run / "eval.json").read_text())
        counts = table["per_prompt"]  # the grid's 4 samples, not arm b's eval.n_samples
        assert len(counts) == 256 and all(p["n"] == 4 for p in counts)
        assert sum(p["correct"] for p in counts) / (4 * 256) == pytest.approx(table["pass@1"])
        steps = [json.loads(line)["step"] for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 2
    text = results.read_text()
    assert text.startswith("# results\n<!-- ablate:ab -->\n| arm |")
    assert text.endswith("<!-- /ablate:ab -->\nour verdict\n")
    assert "prompts with 0 of 4 right" in text and "| base model |" in text and "(docs/ab.png)" in text
    assert "| a | 1 |" in text and "| b | 1 |" in text
    assert re.search(r"At equal cost — \d+\.\dk generated samples, .*: a [\d.]+ ± 0; b [\d.]+ ± 0\.", text), text
    assert (tmp_path / "docs" / "ab.png").stat().st_size > 5000

    logs = {arm: (tmp_path / "runs" / arm / "seed1" / "train.log").stat().st_size for arm in ("a", "b")}
    again = procs.run(cmd, timeout=300, cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "a seed 1: finished earlier" in again.stderr and "b seed 1: finished earlier" in again.stderr
    assert logs == {arm: (tmp_path / "runs" / arm / "seed1" / "train.log").stat().st_size for arm in ("a", "b")}

    # a changed arm is not mixed with the run it made before
    write_grid(grid, **{**yaml.safe_load(grid.read_text()), "arms": {"a": {}, "b": {"overrides": {"algo.eps_high": 0.3}}}})
    changed = procs.run(cmd, timeout=300, cwd=ROOT, env=env)
    assert changed.returncode == 1 and "b seed 1: " in changed.stderr and "started with other settings" in changed.stderr
