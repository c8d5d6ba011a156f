#!/usr/bin/env python3
"""Turn a run's metrics.jsonl into PNG curves, with resets and stages marked; print a summary.

    python tools/plot.py runs/tiny-cpu/logs            # writes runs/tiny-cpu/logs/plots/*.png

Each panel is one metric over training steps; a dashed vertical line marks every reset event,
and a staged run's stages are shaded, each span labelled with the stage's name.
The summary compares the first and the last validation pass@k (the "reasoning boundary").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prorl_megatron.metrics import METRICS_FILE, read_jsonl, series, stop_signal_lead_s  # noqa: E402

PANELS = {  # file name -> metrics drawn together
    "reward": ["reward/mean", "val/pass@1"],
    "pass_at_k": ["val/pass@1", "val/pass@8", "val/pass@16"],
    "kl": ["kl_ref", "approx_kl"],
    "entropy": ["entropy"],
    "clipping": ["clip_frac", "clip_frac_high", "clip_frac_low"],
    "response_length": ["response_length/mean", "response_length/max"],
    "sampling": ["sampling/kept_frac", "sampling/rounds"],
    "grad_norm": ["grad_norm"],
    "time": ["time/rollout", "time/reward", "time/logprob", "time/update", "time/sync", "time/checkpoint"],
}


def stage_spans(records: list[dict]) -> list[tuple[str, int, int]]:
    """(name, first step, last step) of each stage, from the stage events (a stage entered
    after step s runs from step s + 1; the first one is logged at step 0)."""
    events = sorted((r["step"], r["index"], r["stage"]) for r in records if r.get("event") == "stage")
    last = max((r["step"] for r in records if "event" not in r), default=0)
    spans = []
    for i, (step, _, name) in enumerate(events):
        end = events[i + 1][0] if i + 1 < len(events) else last
        spans.append((name, step + 1, max(end, step + 1)))
    return spans


def plot(log_dir: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_dir / METRICS_FILE)
    resets = [r["step"] for r in records if r.get("event") == "reset"]
    spans = stage_spans(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, names in PANELS.items():
        drawn = [(n, *series(records, n)) for n in names]
        drawn = [d for d in drawn if d[1]]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, steps, values in drawn:
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=name)
        for i, (name, first, last) in enumerate(spans):  # steps first..last: [first - 0.5, last + 0.5]
            ax.axvspan(first - 0.5, last + 0.5, color=f"C{i % 10}", alpha=0.08, linewidth=0)
            ax.text(first - 0.5, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
        for i, step in enumerate(resets):
            ax.axvline(step, color="grey", linestyle="--", linewidth=1, label="reference reset" if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{panel}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def summary(log_dir: Path) -> str:
    """Validation pass@k at the first and the last evaluation, and the resets."""
    records = read_jsonl(log_dir / METRICS_FILE)
    evals = [r for r in records if "event" not in r and any(k.startswith("val/pass@") for k in r)]
    lines = []
    if evals:
        first, last = evals[0], evals[-1]
        keys = sorted((k for k in first if k.startswith("val/pass@")), key=lambda k: int(k.split("@")[1]))
        for k in keys:
            ratio = last[k] / first[k] if first[k] else float("inf")
            lines.append(f"{k[4:]:>8}: {first[k]:.3f} (step {first['step']}) -> {last[k]:.3f} "
                         f"(step {last['step']})  x{ratio:.2f}")
    resets = [r for r in records if r.get("event") == "reset"]
    lines.append(f"  resets: {len(resets)}" + (f" at steps {[r['step'] for r in resets]}" if resets else ""))
    spans = stage_spans(records)
    if spans:
        lines.append("  stages: " + ", ".join(f"{name} ({'steps ' if i == 0 else ''}{first}-{last})"
                                             for i, (name, first, last) in enumerate(spans)))
    lines.append(f"  Slurm time-limit warning for these step times: #SBATCH --signal=USR1@{stop_signal_lead_s(records)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", type=Path, help="the run's logging.dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: LOG_DIR/plots)")
    args = parser.parse_args(argv)
    if not (args.log_dir / METRICS_FILE).is_file():
        parser.error(f"{args.log_dir / METRICS_FILE}: not found")
    written = plot(args.log_dir, args.out or args.log_dir / "plots")
    print(summary(args.log_dir))
    print(f"  plots: {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
