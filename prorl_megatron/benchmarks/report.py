"""The paper's table over several checkpoints, pass@k plots per domain, and the change against a base.

From checkpoints' ``results.json`` (:mod:`.protocol`), in the order given; the first is the base
unless ``base`` names another label. Written to ``out``:

- ``table.md``: pass@1 (%) per benchmark in the paper's column order (:data:`~prorl_megatron.benchmarks.
  BENCHMARKS`), each domain's average — the mean of its benchmarks, the paper's "Avg." — after its
  benchmarks when it has several; the same for pass@n (n = samples per prompt: the reasoning
  boundary); then each checkpoint's change against the base per benchmark, of pass@1 and pass@n, with
  the 95% bootstrap interval over problems (the per-problem differences resampled with replacement,
  :func:`~prorl_megatron.ablate_report.bootstrap_mean_interval`);
- ``table.csv``: the pass@1 table;
- ``passk_<domain>.png``: pass@k against k for each benchmark of the domain and their average, the
  base dashed, the other checkpoints solid.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from prorl_megatron.ablate_report import bootstrap_mean_interval, per_prompt_passk
from prorl_megatron.benchmarks import BENCHMARKS, BY_NAME, DOMAIN_ORDER
from prorl_megatron.benchmarks.protocol import RESULTS_FILE

DOMAIN_TITLES = {"math": "Math", "code": "Code", "stem": "STEM", "instruction": "Instruction", "logic": "Logic"}


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Each path's ``results.json`` (a file, or a checkpoint's result directory holding it)."""
    out = []
    for name in paths:
        path = Path(name)
        path = path / RESULTS_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results (run `python -m prorl_megatron.benchmarks run` first)")
        out.append(json.loads(path.read_text()))
    labels = [r["label"] for r in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"results with the same label: {labels}")
    return out


def columns(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``("bench", name)`` for every benchmark any result has, in the paper's order, with ``("avg",
    domain)`` after the benchmarks of a domain that has several."""
    present = [b for b in BENCHMARKS if any(b.name in r["benchmarks"] for r in results)]
    cols: list[tuple[str, str]] = []
    for domain in DOMAIN_ORDER:
        names = [b.name for b in present if b.domain == domain]
        cols += [("bench", n) for n in names] + ([("avg", domain)] if len(names) > 1 else [])
    return cols


def title(col: tuple[str, str]) -> str:
    kind, key = col
    return BY_NAME[key].title if kind == "bench" else f"{DOMAIN_TITLES[key]} avg"


def value(result: dict[str, Any], col: tuple[str, str], metric: str) -> Optional[float]:
    """A cell: a benchmark's ``metric``, or the mean over the domain's benchmarks the result has."""
    kind, key = col
    if kind == "bench":
        bench = result["benchmarks"].get(key)
        return bench.get(metric) if bench else None
    values = [b.get(metric) for b in result["benchmarks"].values() if b["domain"] == key]
    return None if not values or None in values else float(np.mean(values))


def boundary_metric(results: list[dict[str, Any]]) -> str:
    """``pass@n`` for the smallest samples-per-prompt n of the results (every result has it)."""
    return f"pass@{min(r['protocol']['n_samples'] for r in results)}"


def table_rows(results: list[dict[str, Any]], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table of ``metric`` in percent (one row per checkpoint)."""
    cols = columns(results)
    rows = [[r["label"]] + ["—" if (v := value(r, c, metric)) is None else f"{100 * v:.1f}" for c in cols]
            for r in results]
    return ["checkpoint"] + [title(c) for c in cols], rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def change(base: dict[str, Any], other: dict[str, Any], k: int, seed: int = 0) -> tuple[float, float, float]:
    """``other``'s pass@k minus ``base``'s on one benchmark (both results of it), with the 95% bootstrap
    interval over problems; the problems must be the same, in the same order."""
    if [p["id"] for p in base["per_prompt"]] != [p["id"] for p in other["per_prompt"]]:
        raise ValueError("the two results were scored on different problems")
    diff = per_prompt_passk(other, (k,)) - per_prompt_passk(base, (k,))  # [P, 1]
    lo, hi = bootstrap_mean_interval(diff[None], seed)
    return float(diff.mean()), float(lo[0]), float(hi[0])


def change_rows(results: list[dict[str, Any]], base: dict[str, Any], metric: str
                ) -> tuple[list[str], list[list[str]]]:
    """Per benchmark: problems, the base's ``metric`` and each other checkpoint's change, in points."""
    k = int(metric.split("@")[1])
    others = [r for r in results if r is not base]
    header = ["benchmark", "problems", f"{base['label']} {metric}"] + [f"{r['label']}: Δ {metric} [95% CI]"
                                                                         for r in others]
    rows = []
    for bench in BENCHMARKS:
        if bench.name not in base["benchmarks"]:
            continue
        b = base["benchmarks"][bench.name]
        cells = [bench.title, str(b["problems"]), f"{100 * b[metric]:.1f}"]
        for r in others:
            if bench.name not in r["benchmarks"]:
                cells.append("—")
                continue
            delta, lo, hi = change(b, r["benchmarks"][bench.name], k)
            cells.append(f"{100 * delta:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
        rows.append(cells)
    return header, rows


def plot_domains(results: list[dict[str, Any]], base: dict[str, Any], out: Path) -> list[Path]:
    """``passk_<domain>.png`` per domain: pass@k against k per benchmark (and the domain average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    written = []
    for domain in DOMAIN_ORDER:
        cols = [c for c in columns(results) if (c[0] == "bench" and BY_NAME[c[1]].domain == domain)
                or c == ("avg", domain)]
        if not cols:
            continue
        fig, axes = plt.subplots(1, len(cols), figsize=(3.4 * len(cols), 3.2), dpi=80, squeeze=False)
        for ax, col in zip(axes[0], cols):
            for i, r in enumerate(results):
                ks = [k for k in r["ks"] if value(r, col, f"pass@{k}") is not None]
                if ks:
                    ax.plot(ks, [value(r, col, f"pass@{k}") for k in ks], marker="o", ms=3, color=colors[i % 10],
                            ls="--" if r is base else "-", label=r["label"])
            ks = sorted({k for r in results for k in r["ks"]})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks], minor=False)
            ax.minorticks_off()
            ax.set(xlabel="k", ylabel="pass@k", ylim=(0, 1), title=title(col))
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{DOMAIN_TITLES[domain]}: pass@k (base dashed)", fontsize=10)
        fig.tight_layout()
        path = out / f"passk_{domain}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def write_report(results: list[dict[str, Any]], out: Path, base_label: Optional[str] = None) -> list[Path]:
    """Write ``table.md``, ``table.csv`` and the plots to ``out``; return the files written."""
    if base_label is not None and base_label not in [r["label"] for r in results]:
        raise ValueError(f"--base {base_label!r} is none of the results' labels {[r['label'] for r in results]}")
    base = next(r for r in results if base_label is None or r["label"] == base_label)
    out.mkdir(parents=True, exist_ok=True)
    boundary = boundary_metric(results)
    protocol = base["protocol"]
    response = sorted({b["max_response_tokens"] for r in results for b in r["benchmarks"].values()})
    capped = "" if response == [protocol["max_response_tokens"]] else \
        f", capped by the model's context at {'-'.join(str(t) for t in sorted({response[0], response[-1]}))}"
    text = [f"# Benchmarks: {', '.join(r['label'] for r in results)}", "",
            f"pass@1 in percent: the mean over {protocol['n_samples']} samples per problem (temperature "
            f"{protocol['temperature']}, top-p {protocol['top_p']}, up to {protocol['max_response_tokens']} response "
            f"tokens{capped}); a domain's average is the mean of its benchmarks.", "",
            markdown(*table_rows(results, "pass@1")), "", f"## {boundary} (percent)", "",
            markdown(*table_rows(results, boundary))]
    if len(results) > 1:
        text += ["", f"## Change against {base['label']} (points; 95% bootstrap interval over problems)", "",
                 markdown(*change_rows(results, base, "pass@1")), "", markdown(*change_rows(results, base, boundary))]
    (out / "table.md").write_text("\n".join(text) + "\n")
    header, rows = table_rows(results, "pass@1")
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    (out / "table.csv").write_text(buffer.getvalue())
    return [out / "table.md", out / "table.csv", *plot_domains(results, base, out)]
