"""An ablation grid file (``recipes/ablations/*.yaml``): its typed form and its parsing.

A grid names a base recipe, a base model (built if missing), the seeds, the arms (recipe
overrides per arm) and the comparisons the report draws. :func:`load_grid` refuses unknown keys
and arms a comparison names but the grid lacks, naming the file and the field. Shared by the
runner (prorl_megatron/ablate.py) and the report (prorl_megatron/ablate_report.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class GridError(ValueError):
    """A grid file that cannot be run: says which file and which field."""


@dataclass(frozen=True)
class Arm:
    name: str
    about: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """Arms the report puts side by side, for one claim (``x``: ``step`` or ``samples``, the
    x axis of its validation curve)."""

    name: str
    title: str
    arms: tuple[str, ...]
    x: str = "step"


@dataclass(frozen=True)
class BaseModel:
    hf_dir: str
    task: str = "addition"
    target: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class Grid:
    name: str
    recipe: str
    base: BaseModel
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    comparisons: tuple[Comparison, ...]
    runs_dir: str
    docs_dir: str
    eval_n: int
    eval_ks: tuple[int, ...]
    procs_per_run: int = 1
    common: dict[str, Any] = field(default_factory=dict)  # overrides every run gets
    results_md: Optional[str] = None  # a document whose <!-- ablate:NAME --> blocks the report fills
    # dynamic sampling's comparison: the generated samples each run needed to reach this
    # multiple of the base model's validation pass@1
    pass1_target_ratio: float = 2.0

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def run_dir(self, arm: str, seed: int) -> Path:
        return Path(self.runs_dir) / arm / f"seed{seed}"


_GRID_KEYS = {"name", "recipe", "base", "seeds", "arms", "comparisons", "runs_dir", "docs_dir", "eval",
              "procs_per_run", "common", "results_md", "pass1_target_ratio"}


def load_grid(path: str | Path) -> Grid:
    """Parse a grid file; unknown keys and arms a comparison names but the grid lacks are errors."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise GridError(f"{path}: {e}") from e

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise GridError(f"{path}: {what}")

    need(isinstance(data, dict), "a grid is a mapping")
    unknown = sorted(set(data) - _GRID_KEYS)
    need(not unknown, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_GRID_KEYS))})")
    for key in ("name", "recipe", "base", "seeds", "arms"):
        need(key in data, f"missing key {key!r}")
    need(isinstance(data["arms"], dict) and data["arms"], "arms: a mapping of arm name -> {about, overrides}")
    arms = []
    for name, spec in data["arms"].items():
        need(str(name) != "all", "arms.all: 'all' names the report's table of every arm; rename the arm")
        spec = spec or {}
        bad = sorted(set(spec) - {"about", "overrides"})
        need(not bad, f"arms.{name}: unknown key(s) {', '.join(bad)} (known: about, overrides)")
        arms.append(Arm(str(name), str(spec.get("about", "")), dict(spec.get("overrides") or {})))
    names = {a.name for a in arms}
    comparisons = []
    for name, spec in (data.get("comparisons") or {}).items():
        need(isinstance(spec, dict) and spec.get("arms"), f"comparisons.{name}: {{title, arms: [...], x}} with arms")
        bad = sorted(set(spec) - {"title", "arms", "x"})
        need(not bad, f"comparisons.{name}: unknown key(s) {', '.join(bad)} (known: arms, title, x)")
        missing = [a for a in spec["arms"] if a not in names]
        need(not missing, f"comparisons.{name}.arms: no arm named {', '.join(missing)}")
        need(spec.get("x", "step") in ("step", "samples"), f"comparisons.{name}.x: 'step' or 'samples'")
        comparisons.append(Comparison(str(name), str(spec.get("title", name)), tuple(spec["arms"]),
                                      spec.get("x", "step")))
    base = data["base"]
    need(isinstance(base, dict) and "hf_dir" in base, "base: {hf_dir, task, target, seed}")
    bad = sorted(set(base) - {"hf_dir", "task", "target", "seed"})
    need(not bad, f"base: unknown key(s) {', '.join(bad)}")
    ev = data.get("eval") or {}
    bad = sorted(set(ev) - {"n_samples", "ks"})
    need(not bad, f"eval: unknown key(s) {', '.join(bad)} (known: n_samples, ks)")
    ks = tuple(int(k) for k in ev.get("ks", [1, 2, 4, 8, 16, 32, 64]))
    need(bool(ks) and min(ks) >= 1, "eval.ks: a non-empty list of k >= 1")
    n = int(ev.get("n_samples", 2 * max(ks)))
    need(n >= 2 * max(ks), f"eval.n_samples: {n} < 2 x the largest k ({max(ks)}): pass@k would be too noisy")
    seeds = tuple(int(s) for s in data["seeds"])
    need(len(seeds) == len(set(seeds)) and seeds, "seeds: a non-empty list of distinct integers")
    grid_dir = f"runs/ablate-{data['name']}"
    return Grid(name=str(data["name"]), recipe=str(data["recipe"]), base=BaseModel(**base), seeds=seeds,
                arms=tuple(arms), comparisons=tuple(comparisons), runs_dir=str(data.get("runs_dir", grid_dir)),
                docs_dir=str(data.get("docs_dir", f"{grid_dir}/report")), eval_n=n, eval_ks=ks,
                procs_per_run=int(data.get("procs_per_run", 1)), common=dict(data.get("common") or {}),
                results_md=data.get("results_md"), pass1_target_ratio=float(data.get("pass1_target_ratio", 2.0)))


def override_args(overrides: dict[str, Any]) -> list[str]:
    """``key=value`` command-line overrides; values in YAML flow style (lists and mappings too)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=1 << 30).strip().removesuffix('...').strip()}"
            for k, v in overrides.items()]
