"""Where a run's numbers go: JSONL always, TensorBoard and W&B when enabled, a progress bar.

``metrics.jsonl`` has one JSON object per line: ``{"step": k, ...metrics}`` per training step,
and ``{"step": k, "event": "reset", ...}`` for events. Only global rank 0 writes. On resume,
lines from steps after the checkpoint (work that was lost with the killed run) are dropped,
so the file tells one consistent history.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from prorl_megatron.collect import collective_device

METRICS_FILE = "metrics.jsonl"


class TrackingError(RuntimeError):
    """TensorBoard or W&B was asked for but is not installed."""


def check_trackers(tensorboard: bool, wandb: bool) -> None:
    """Fail before any model is built when an enabled tracker cannot be imported."""
    import importlib.util

    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrackingError("logging.tensorboard=true needs the `tensorboard` package (pip install tensorboard)")
    if wandb and importlib.util.find_spec("wandb") is None:
        raise TrackingError("logging.wandb=true needs the `wandb` package (pip install wandb)")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics file (a torn last line from a killed run is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def series(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric ``name`` over the step records that have a number for it (events skipped)."""
    points = [(r["step"], r[name]) for r in records if "event" not in r and isinstance(r.get(name), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def stop_signal_lead_s(records: list[dict[str, Any]], margin: float = 1.5, floor_s: int = 300) -> int:
    """Seconds before a time limit the stop signal must come so that the checkpoint is on disk
    in time (Slurm's ``--signal=USR1@N``), from a run's measured phase times.

    The trainer reads the signal after each rollout round (abandoning the step) and at the end
    of the step, so the longest wait is the longer of the rollout (+ reward scoring) and the
    rest of the step (logprob, update, sync, eval), then one checkpoint write; times ``margin``,
    at least ``floor_s``, rounded up to a minute.
    """
    def t(record: dict[str, Any], *phases: str) -> float:
        return sum(float(record.get(f"time/{p}", 0.0)) for p in phases)

    steps = [r for r in records if "event" not in r and "time/step" in r]
    if not steps:
        return floor_s
    wait = max(max(t(r, "rollout", "reward"), t(r, "logprob", "update", "sync", "eval")) for r in steps)
    write = max(t(r, "checkpoint") for r in steps)
    return max(floor_s, 60 * math.ceil(margin * (wait + write) / 60))


class MetricsWriter:
    """Writes step metrics and events on rank 0 (a no-op elsewhere)."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, resume_step: int = 0, tensorboard: bool = False,
                 wandb: bool = False, wandb_project: str = "", run_name: str = "",
                 config: Optional[dict[str, Any]] = None) -> None:
        self.enabled = enabled
        self.path = Path(log_dir) / METRICS_FILE
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_until(resume_step)
        self._file = self.path.open("a")
        self._tb_dir = str(Path(log_dir) / "tensorboard")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir, purge_step=resume_step + 1)
        if wandb:
            import wandb as wandb_module

            self._wandb = wandb_module.init(project=wandb_project, name=run_name, config=config, resume="allow",
                                            id=run_name)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def event(self, step: int, kind: str, **info: Any) -> None:
        self.write(step, {"event": kind, **info})

    def discard_after(self, step: int) -> None:
        """Drop the records of the steps after ``step`` (a rollback discarded them), from the
        JSONL file and TensorBoard. W&B's step axis only moves forward: it leaves out the redone
        steps up to the last one it was sent (as after a resume)."""
        if not self.enabled:
            return
        self._file.close()
        self._keep_until(step)
        self._file = self.path.open("a")
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(self._tb_dir, purge_step=step + 1)

    def _keep_until(self, step: int) -> None:
        if self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class PhaseTimer:
    """Wall seconds per named phase of a step: ``with timer("rollout"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


class TokenSums:
    """Per-token (or per-row) sums gathered over micro-batches and reduced over the world.

    Only ranks that own a distinct copy of the values (last pipeline stage, TP rank 0)
    ``add``; :meth:`means` sums every rank's contributions, so each value counts once.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.maxima: dict[str, float] = {}

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] += total
        self.counts[name] += count

    def add_max(self, name: str, value: float) -> None:
        self.maxima[name] = max(self.maxima.get(name, -math.inf), value)

    def means(self, names: list[str], max_names: list[str] = ()) -> dict[str, float]:
        """Collective: ``name -> sum / count`` for ``names`` and the max of ``max_names``."""
        device = collective_device()  # NCCL takes no CPU tensors
        values = torch.tensor([[self.sums[n], self.counts[n]] for n in names] or [[0.0, 0.0]], dtype=torch.float64,
                              device=device)
        dist.all_reduce(values)
        maxima = torch.tensor([self.maxima.get(n, -math.inf) for n in max_names] or [0.0], dtype=torch.float64,
                              device=device)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        out = {n: float(s / c) if c > 0 else 0.0 for n, (s, c) in zip(names, values.tolist())}
        out.update({n: float(v) for n, v in zip(max_names, maxima.tolist())})
        return out


class Progress:
    """A tqdm bar on rank 0: step, reward, KL and the ETA; it and :meth:`write`'s lines go to
    the console (:func:`~prorl_megatron.run_log.console`), not to the run's log."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "ProRL", unit: str = "step") -> None:
        self._bar = None
        self.enabled = enabled
        if enabled:
            from tqdm import tqdm

            from prorl_megatron.run_log import console

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=console())

    def update(self, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix(reward=f"{metrics.get('reward/mean', 0):.3f}", kl=f"{metrics.get('kl_ref', 0):.4f}",
                              refresh=False)
        self._bar.update(1)

    def advance(self, **postfix: str) -> None:
        """One more unit done (a benchmark scored, ...), ``postfix`` shown beside the bar."""
        if self._bar is None:
            return
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def rewind(self, step: int) -> None:
        """Back to ``step`` (after a rollback)."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self._bar.fp)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
