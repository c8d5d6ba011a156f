"""The ablation report: tables and plots from finished runs' ``eval.json`` and ``metrics.jsonl``.

For each comparison of a grid (:mod:`prorl_megatron.ablate`) it writes a figure
``{docs_dir}/{comparison}.png`` (pass@k against k; validation pass@1 against steps or generated
samples; policy entropy and KL to the reference against steps) and a markdown table; all of them
go to ``{docs_dir}/report.md``, and into the grid's ``results_md`` between the lines
``<!-- ablate:NAME -->`` and ``<!-- /ablate:NAME -->`` (the text around them is kept).

Figures are means over seeds; the curves' bands are the seeds' min-max, the pass@k panel's the
bootstrap interval below. In tables a cell is
``mean ± std`` over seeds; a pass@k cell adds ``[lo, hi]``, the 95% bootstrap interval over
prompts (prompts resampled with replacement, the same resample for every seed of an arm, pass@k
averaged over prompts and then over seeds). pass@k per prompt is the unbiased estimator
(:func:`~prorl_megatron.algo.sampling.pass_at_k`) on that prompt's ``n`` samples.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from prorl_megatron.ablate_grid import Grid
from prorl_megatron.algo.sampling import pass_at_k
from prorl_megatron.metrics import read_jsonl, series

BOOTSTRAP_RESAMPLES = 2000
CURVE_KEYS = ("entropy", "kl_ref")
TAIL_STEPS = 10  # "final" entropy / KL: the mean of a run's last this many steps


@dataclass
class Run:
    """One finished run: its pass@k per prompt [P, K], its metrics rows and ``rollout.n``."""

    arm: str
    seed: int
    passk: np.ndarray
    table: dict[str, Any]
    metrics: list[dict[str, Any]]
    n_per_prompt: int = 0

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        steps, values = series(self.metrics, key)
        return np.array(steps), np.array(values, dtype=float)

    def generated_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative samples the rollouts generated, by step (dynamic sampling's extra rounds
        included; not validation samples, nor steps a health rollback discarded)."""
        steps, prompts = self.series("sampling/prompts")
        return steps, np.cumsum(prompts) * self.n_per_prompt

    def total_generated(self) -> float:
        return float(self.generated_samples()[1][-1]) if self.series("sampling/prompts")[0].size else math.nan


def per_prompt_passk(table: dict[str, Any], ks: tuple[int, ...]) -> np.ndarray:
    """[P, K] unbiased pass@k of each prompt from an evaluation's ``per_prompt`` counts."""
    return np.array([[pass_at_k(p["n"], p["correct"], k) for k in ks] for p in table["per_prompt"]])


def load_runs(grid: Grid) -> tuple[Optional[Run], dict[str, list[Run]]]:
    """The base model's evaluation (as a run without metrics) and each arm's finished runs."""
    from prorl_megatron.ablate_grid import override_args
    from prorl_megatron.config import load_recipe

    def load(directory: Path, arm: str, seed: int, n_per_prompt: int = 0) -> Optional[Run]:
        ev = directory / "eval.json"
        if not ev.is_file():
            return None
        table = json.loads(ev.read_text())
        metrics_file = directory / "logs" / "metrics.jsonl"
        metrics = read_jsonl(metrics_file) if metrics_file.is_file() else []
        return Run(arm, seed, per_prompt_passk(table, grid.eval_ks), table, metrics, n_per_prompt)

    base = load(Path(grid.runs_dir) / "base", "base", grid.seeds[0])
    arms = {}
    for a in grid.arms:
        n = load_recipe(grid.recipe, override_args({**grid.common, **a.overrides})).rollout.n
        arms[a.name] = [r for s in grid.seeds if (r := load(grid.run_dir(a.name, s), a.name, s, n))]
    return base, arms


def bootstrap_mean_interval(values: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% interval [K] lo, hi of the mean over prompts, then runs, of ``values`` [S, P, K] (runs,
    prompts, ks): prompts resampled with replacement, the same resample for every run."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[1], size=(BOOTSTRAP_RESAMPLES, values.shape[1]))
    means = values[:, idx, :].mean(axis=2).mean(axis=0)  # [B, K]
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def bootstrap_interval(runs: list[Run], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% interval [K] lo, hi of the seed-mean pass@k, prompts resampled with replacement."""
    return bootstrap_mean_interval(np.stack([r.passk for r in runs]), seed)  # [S, P, K]


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "—"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    std = std if std > 1e-9 * abs(float(np.mean(values))) else 0.0  # equal values: no rounding noise
    return f"{np.mean(values):.3g} ± {std:.2g}"


def tail_mean(run: Run, key: str) -> float:
    _, values = run.series(key)
    return float(values[-TAIL_STEPS:].mean()) if len(values) else float("nan")


def unsolved(run: Run) -> int:
    """Held-out prompts none of whose samples was right."""
    return sum(p["correct"] == 0 for p in run.table["per_prompt"])


def coverage_change(base: Run, run: Run) -> tuple[int, int]:
    """(prompts the base never solved that ``run`` solved at least once, and the reverse)."""
    if len(base.table["per_prompt"]) != len(run.table["per_prompt"]):
        raise ValueError(f"{run.arm} seed {run.seed}: evaluated on other prompts than the base model")
    pairs = list(zip(base.table["per_prompt"], run.table["per_prompt"]))
    return (sum(b["correct"] == 0 < r["correct"] for b, r in pairs),
            sum(r["correct"] == 0 < b["correct"] for b, r in pairs))


def mean_of(run: Run, key: str) -> float:
    _, values = run.series(key)
    return float(values.mean()) if len(values) else float("nan")


def reset_steps(run: Run) -> list[int]:
    """Steps after which the reference (and optimizer) was reset."""
    return [int(s) for s in run.series("reset")[0]]


def samples_to_reach(run: Run, target: float) -> Optional[float]:
    """Generated samples up to the first evaluation at which validation pass@1 >= ``target``."""
    steps, pass1 = run.series("val/pass@1")
    gen_steps, generated = run.generated_samples()
    for step, value in zip(steps, pass1):
        if step > 0 and value >= target:
            return float(generated[gen_steps <= step][-1]) if (gen_steps <= step).any() else 0.0
    return None


def val_curve_by_samples(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Validation pass@1 against the samples generated before each evaluation."""
    steps, pass1 = run.series("val/pass@1")
    gen_steps, generated = run.generated_samples()
    return np.interp(steps, gen_steps, generated, left=0.0), pass1


def equal_samples_line(arms: dict[str, list[Run]], names: tuple[str, ...]) -> str:
    """Each arm's validation pass@1 (interpolated) at the sample count the thriftiest run reached."""
    runs = [r for name in names for r in arms.get(name, []) if r.metrics]
    if not runs:
        return ""
    budget = min(r.total_generated() for r in runs)
    cells = []
    for name in names:
        values = [float(np.interp(budget, *val_curve_by_samples(r)))
                  for r in arms.get(name, []) if r.metrics]
        cells.append(f"{name} {mean_std(values)}")
    return (f"At equal cost — {budget / 1000:.1f}k generated samples, the fewest any run here generated — "
            f"validation pass@1 (interpolated between evaluations): " + "; ".join(cells) + ".")


def table_rows(grid: Grid, base: Optional[Run], arms: dict[str, list[Run]], names: tuple[str, ...],
               show_ks: tuple[int, ...]) -> str:
    """The markdown table of ``names`` (and the base model)."""
    ki = [grid.eval_ks.index(k) for k in show_ks]
    target = grid.pass1_target_ratio * base.table["pass@1"] if base else None
    head = (["arm", "seeds"] + [f"pass@{k}" for k in show_ks]
            + [f"prompts with 0 of {grid.eval_n} right (vs base: +solved / −lost)", "upper-clipped tokens (mean)",
               "entropy (last 10)",
               "KL to ref (last 10)", "samples generated (k)",
               f"samples to val pass@1 ≥ {target:.4f} (k)" if target else "samples to target"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base:
        cells = [f"{base.passk[:, i].mean():.3f}" for i in ki]
        lines.append("| base model | — | " + " | ".join(cells) + f" | {unsolved(base)} | — | — | — | — | — |")
    for name in names:
        runs = arms.get(name, [])
        if not runs:
            lines.append(f"| {name} | 0 | " + " | ".join(["not run"] * (len(head) - 2)) + " |")
            continue
        lo, hi = bootstrap_interval(runs)
        cells = [f"{mean_std([float(r.passk[:, i].mean()) for r in runs])} [{lo[i]:.3f}, {hi[i]:.3f}]" for i in ki]
        total = [r.total_generated() / 1000 for r in runs if r.metrics]
        reach = [samples_to_reach(r, target) if target else None for r in runs]
        reached = [x / 1000 for x in reach if x is not None]
        reach_cell = (mean_std(reached) + (f" ({len(reached)}/{len(runs)} reached)" if len(reached) < len(runs) else "")
                      if reached else f"not reached (0/{len(runs)})")
        changed = np.array([coverage_change(base, r) for r in runs]) if base else None
        coverage = mean_std([unsolved(r) for r in runs]) + (
            f" (+{changed[:, 0].mean():.0f} / −{changed[:, 1].mean():.0f})" if base else "")
        cells += [coverage, mean_std([mean_of(r, "clip_frac_high") for r in runs]),
                  mean_std([tail_mean(r, "entropy") for r in runs]), mean_std([tail_mean(r, "kl_ref") for r in runs]),
                  mean_std(total), reach_cell]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def band(ax, xs: list[np.ndarray], ys: list[np.ndarray], label: str, color: Any) -> None:
    """Mean over runs of curves sampled at (possibly) different x, with the min-max band."""
    length = min(len(y) for y in ys)
    if length == 0:
        return
    x = np.mean([v[:length] for v in xs], axis=0)
    y = np.stack([v[:length] for v in ys])
    ax.plot(x, y.mean(axis=0), label=label, color=color, lw=1.4)
    if len(ys) > 1:
        ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=color, alpha=0.18, lw=0)


def plot_comparison(grid: Grid, base: Optional[Run], arms: dict[str, list[Run]], names: tuple[str, ...],
                    x_axis: str, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), dpi=72)
    colors = plt.get_cmap("tab10").colors
    ks = np.array(grid.eval_ks)
    if base:
        axes[0].plot(ks, base.passk.mean(axis=0), color="k", ls="--", lw=1.2, label="base model")
    for i, name in enumerate(names):
        runs = arms.get(name, [])
        if not runs:
            continue
        color = colors[i % len(colors)]
        lo, hi = bootstrap_interval(runs)
        mean_passk = np.mean([r.passk.mean(axis=0) for r in runs], axis=0)
        axes[0].plot(ks, mean_passk, color=color, marker="o", ms=3, label=name)
        axes[0].fill_between(ks, lo, hi, color=color, alpha=0.18, lw=0)
        val = [r.series("val/pass@1") for r in runs]
        if x_axis == "samples":
            xs = [val_curve_by_samples(r)[0] / 1000 for r in runs]
        else:
            xs = [s for s, _ in val]
        band(axes[1], xs, [v for _, v in val], name, color)
        for ax, key in zip(axes[2:], CURVE_KEYS):
            curves = [r.series(key) for r in runs]
            band(ax, [s for s, _ in curves], [v for _, v in curves], name, color)
        for step in reset_steps(runs[0]):  # the first seed's resets (stage entries included)
            axes[3].axvline(step, color=color, ls=":", lw=0.8)
    axes[0].set(xscale="log", xlabel="k", ylabel="pass@k (held out)", ylim=(0, 1))
    axes[0].set_xticks(ks, [str(k) for k in ks])
    axes[1].set(xlabel="samples generated (thousands)" if x_axis == "samples" else "step", ylabel="val pass@1")
    axes[2].set(xlabel="step", ylabel="policy entropy (nats/token)")
    axes[3].set(xlabel="step (dotted: resets, first seed)", ylabel="KL to reference (k3)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def fill_blocks(text: str, blocks: dict[str, str]) -> str:
    """Replace each ``<!-- ablate:NAME -->...<!-- /ablate:NAME -->`` block's body in ``text``."""
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- ablate:{re.escape(name)} -->\n).*?(<!-- /ablate:{re.escape(name)} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)
    return text


def write_report(grid: Grid) -> list[Path]:
    """Write the figures and ``report.md`` to ``grid.docs_dir`` (and fill ``grid.results_md``);
    returns the files written."""
    base, arms = load_runs(grid)
    docs = Path(grid.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    show_ks = tuple(k for k in grid.eval_ks if k in (1, 4, 16, 64)) or grid.eval_ks
    written, blocks = [], {}
    comparisons = grid.comparisons or ()
    results_dir = Path(grid.results_md).parent if grid.results_md else docs
    for c in comparisons:
        figure = docs / f"{c.name}.png"
        plot_comparison(grid, base, arms, c.arms, c.x, c.title, figure)
        written.append(figure)
        link = Path(os.path.relpath(figure.resolve(), results_dir.resolve()))
        extra = f"\n\n{equal_samples_line(arms, c.arms)}" if c.x == "samples" else ""
        blocks[c.name] = (table_rows(grid, base, arms, c.arms, show_ks) + extra
                          + f"\n\n![{c.title}]({link.as_posix()})\n")
    everything = table_rows(grid, base, arms, tuple(a.name for a in grid.arms), grid.eval_ks)
    blocks["all"] = everything + "\n"
    report = [f"# Ablation grid `{grid.name}` (generated by `python -m prorl_megatron.ablate --grid ... --report`)", "",
              f"Recipe `{grid.recipe}`, seeds {list(grid.seeds)}, "
              f"pass@k from {grid.eval_n} samples per held-out prompt.",
              "", "## All arms", "", everything, ""]
    for c in comparisons:
        report += [f"## {c.title}", "", table_rows(grid, base, arms, c.arms, show_ks), "",
                   equal_samples_line(arms, c.arms) if c.x == "samples" else "",
                   f"![{c.title}]({c.name}.png)", ""]
    (docs / "report.md").write_text("\n".join(report))
    written.append(docs / "report.md")
    if grid.results_md and Path(grid.results_md).is_file():
        path = Path(grid.results_md)
        path.write_text(fill_blocks(path.read_text(), blocks))
        written.append(path)
    return written
