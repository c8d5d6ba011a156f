"""The ablation runner: a grid file's errors, and a two-arm, one-seed grid run end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prorl_megatron.ablate import GridError, load_grid
from prorl_megatron.ablate_report import fill_blocks

ROOT = Path(__file__).resolve().parent.parent


def write_grid(path: Path, **changes) -> Path:
    grid = {"name": "g", "recipe": "recipes/tiny_cpu.yaml", "base": {"hf_dir": "x"}, "seeds": [1],
            "arms": {"a": {}, "b": {"overrides": {"algo.eps_high": 0.2}}},
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
    from prorl_megatron.ablate import override_args
    from prorl_megatron.config import load_recipe

    grid = load_grid(ROOT / "recipes" / "ablations" / "add4.yaml")
    assert len(grid.seeds) >= 3 and grid.eval_n >= 2 * max(grid.eval_ks) and max(grid.eval_ks) >= 64
    recipes = {a.name: load_recipe(ROOT / grid.recipe, override_args(a.overrides)) for a in grid.arms}
    assert (recipes["prorl"].algo.eps_high, recipes["clip-0.2-0.2"].algo.eps_high) == (0.4, 0.2)
    assert recipes["no-kl"].algo.kl_coef == 0 and recipes["prorl"].algo.kl_coef >= 0.01
    assert recipes["kl-no-reset"].reset.every_n_steps is None and recipes["prorl"].reset.every_n_steps
    assert not recipes["no-dynamic-sampling"].algo.dynamic_sampling and recipes["prorl"].algo.dynamic_sampling
    assert len(recipes["staged"].stages) >= 2


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
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    for arm in ("a", "b"):
        run = tmp_path / "runs" / arm / "seed1"
        table = json.loads((run / "eval.json").read_text())
        counts = table["per_prompt"]
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
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "a seed 1: finished earlier" in again.stderr and "b seed 1: finished earlier" in again.stderr
    assert logs == {arm: (tmp_path / "runs" / arm / "seed1" / "train.log").stat().st_size for arm in ("a", "b")}
