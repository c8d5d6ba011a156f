"""The GPU check's replay source: a step's samples from a file, fed to the trainer's own phases.

This is how ``bench/gpu_check.py`` runs the trainer on a machine without vLLM or the verifiers,
and how a test runs it without sampling. It is no training option: no recipe key selects it,
and ``python -m prorl_megatron.train`` never reads a replay file.

- **Recording** (:class:`Recorder`): ``python -m prorl_megatron.replay record`` trains exactly as
  ``python -m prorl_megatron.train`` does (the same :func:`~prorl_megatron.train.train`) and
  writes each step's kept samples — prompt ids, response ids, the engine's logprobs, the rewards
  trained on, group ids, truncation, domain — to a JSON-lines file. ``data/replay/tiny_cpu.jsonl``
  is 4 steps of the embedded demo recorded so.
- **Synthetic** (:func:`synthetic_steps`): samples shaped like a 1.5B reasoning model's (R1-like
  lengths, random token ids, rewards that give every group a signal), for a model of any shape.
- **Replay** (:func:`replay`): per step, the trainer's phases from the advantages on
  (:func:`~prorl_megatron.train.train_on_samples`: advantages -> training plan -> old and
  reference logprobs -> one update per mini-batch), then the run controller's decision and its
  actions (:func:`~prorl_megatron.train.run_control`: resets, stage entries) and the step's end
  (:func:`~prorl_megatron.train.end_step`: the checkpoint with the optimizer, the metrics
  record, a stop signal). The run holds no sampler (``Run.sampler`` is None): stage
  entries skip the engine, checkpoints carry no prompt-mixture position. A restart
  (:func:`replay_run` with ``restart_from``) restores a checkpoint as a resumed training run does.

    torchrun --nproc_per_node 2 -m prorl_megatron.replay record --out runs/replay.jsonl \\
        --recipe recipes/tiny_cpu.yaml model.hf_path=runs/tiny-base/hf train.steps=4
    torchrun --nproc_per_node 2 -m prorl_megatron.replay run --samples data/replay/tiny_cpu.jsonl \\
        --recipe recipes/tiny_cpu.yaml [--steps 4] [--restart-from DIR/step_00000002] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist

from prorl_megatron.checkpoint.train_state import read_meta
from prorl_megatron.config import Recipe, add_recipe_arguments, recipe_from_args
from prorl_megatron.control.apply import install_signal_handlers
from prorl_megatron.control.decide import Controller
from prorl_megatron.loop import LoopState, Run, restore
from prorl_megatron.metrics import MetricsWriter, PhaseTimer, Progress
from prorl_megatron.rollout.batch import Sample
from prorl_megatron.stages import recipe_to_resume
from prorl_megatron.train import end_step, passes_only, rollout_metrics, run_control, stage_recipes, train_on_samples

FORMAT = "prorl-replay"
VERSION = 1
FIELDS = ("prompt_ids", "response_ids", "rollout_logprobs", "reward", "truncated", "domain", "group")


class ReplayError(ValueError):
    """A replay file is unreadable or lacks a step asked for; the message names the file."""


# --------------------------------------------------------------------------------------
# The file: a header line, then one line per step
# --------------------------------------------------------------------------------------


def _header(source: str) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "source": source}) + "\n"


def _step_line(step: int, samples: list[Sample]) -> str:
    return json.dumps({"step": step, "samples": [{k: getattr(s, k) for k in FIELDS} for s in samples]}) + "\n"


def save_steps(path: str | Path, steps: Mapping[int, list[Sample]], source: str) -> None:
    """Write ``steps`` (step -> its samples) to ``path``; ``source``: where they come from."""
    with Path(path).open("w") as f:
        f.write(_header(source))
        for step in sorted(steps):
            f.write(_step_line(step, steps[step]))


def load_steps(path: str | Path) -> dict[int, list[Sample]]:
    """step -> its samples, from a file of :func:`save_steps` or :class:`Recorder` (a step
    recorded twice, as a step redone after a rollback is, reads as its last record). Floats
    come back exactly (JSON keeps a float's shortest round-trip form)."""
    lines = Path(path).read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except ValueError:
        header = {}
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ReplayError(f"{path}: not a replay file ({FORMAT} version {VERSION})")
    steps: dict[int, list[Sample]] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
            steps[int(record["step"])] = [Sample(**{k: s[k] for k in FIELDS}) for s in record["samples"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ReplayError(f"{path}, line {number}: {type(e).__name__}: {e}") from None
    return steps


class Recorder:
    """``record(step, samples)`` for :func:`~prorl_megatron.train.train`: appends the step's
    samples to ``path`` (global rank 0 writes; every rank holds the same samples). The file is
    started afresh at the first step recorded."""

    def __init__(self, path: str | Path, source: str) -> None:
        self.path, self.source, self.started = Path(path), source, False

    def __call__(self, step: int, samples: list[Sample]) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        if not self.started:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(_header(self.source))
            self.started = True
        with self.path.open("a") as f:
            f.write(_step_line(step, samples))


# --------------------------------------------------------------------------------------
# Synthetic samples shaped like a reasoning model's
# --------------------------------------------------------------------------------------


def _lognormal(g: torch.Generator, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(float(torch.empty(1).log_normal_(math.log(median), sigma, generator=g))))))


def synthetic_steps(steps: int, prompts: int, group: int, vocab_size: int, *, response_median: float = 4096,
                    response_sigma: float = 0.6, max_response: int = 8192, prompt_median: float = 256,
                    prompt_sigma: float = 0.5, max_prompt: int = 1024, seed: int = 0) -> dict[int, list[Sample]]:
    """Steps 1..``steps`` of ``prompts`` GRPO groups of ``group`` samples each, shaped like
    DeepSeek-R1-Distill's rollouts on ProRL's 8k stage: response lengths lognormal (median
    ``response_median`` tokens, sigma ``response_sigma``; with the defaults ~12% reach the cap
    ``max_response``, which marks them truncated), prompt lengths lognormal (median
    ``prompt_median``, capped at ``max_prompt``); token ids uniform in [1, ``vocab_size``) (0 is
    the pad id); engine logprobs -Exp(2) per token (mean -0.5). Every step's first response is
    at the cap (the longest row, which the memory plan is sized for). Rewards are 0 or 1, 0 for
    a truncated response (``rollout.truncated: zero_reward``), and every group holds both (every
    group carries a signal, as after dynamic sampling). Deterministic in ``seed`` (torch's CPU
    generator: the same on every machine)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[int, list[Sample]] = {}
    for step in range(1, steps + 1):
        samples = []
        for p in range(prompts):
            prompt = torch.randint(1, vocab_size, (_lognormal(g, prompt_median, prompt_sigma, 8, max_prompt),),
                                   generator=g).tolist()
            members = []
            for i in range(group):
                first = p == 0 and i == 0
                length = max_response if first else _lognormal(g, response_median, response_sigma, 8, max_response)
                response = torch.randint(1, vocab_size, (length,), generator=g).tolist()
                logprobs = torch.empty(length).exponential_(2.0, generator=g).neg().tolist()
                truncated = length >= max_response
                reward = 0.0 if truncated else float(torch.rand(1, generator=g) < 0.5)
                members.append(Sample(prompt, response, logprobs, reward, truncated, "math", p))
            if len({s.reward for s in members}) == 1:  # give the group its signal on its last untruncated sample
                last = next((s for s in reversed(members) if not s.truncated), members[-1])
                last.reward = 1.0 - last.reward
            samples.extend(members)
        out[step] = samples
    return out


# --------------------------------------------------------------------------------------
# The replay
# --------------------------------------------------------------------------------------


def replay_run(recipe: Recipe, overrides: tuple[str, ...] = (), restart_from: Optional[str | Path] = None) -> Run:
    """A run of ``recipe`` (stage 0's, ``overrides`` the command line's) that samples nothing:
    the trainer (:func:`~prorl_megatron.train.passes_only` of the recipe to resume with), the run
    controller over the stages, the metrics writer on rank 0 (``logging.dir``), the stop-signal
    handlers; restored from checkpoint ``restart_from`` where given (models, optimizer, RNG
    states, loop state), as :func:`~prorl_megatron.train.setup` resumes. Collective."""
    loop = read_meta(restart_from)["loop"] if restart_from is not None else None
    trainer = passes_only(recipe_to_resume(recipe, overrides, loop))
    run = Run(trainer=trainer, sampler=None, state=LoopState(control=Controller(stage_recipes(recipe, overrides))),
              writer=MetricsWriter(recipe.logging.dir, enabled=False), progress=Progress(0, 0, enabled=False),
              overrides=overrides)
    if restart_from is not None:
        restore(run, Path(restart_from))
    run.writer = MetricsWriter(recipe.logging.dir, enabled=dist.get_rank() == 0, resume_step=run.state.step)
    install_signal_handlers(run)
    return run


def replay_step(run: Run, step: int, samples: list[Sample], timer: PhaseTimer) -> dict[str, Any]:
    """Step ``step`` of :func:`~prorl_megatron.train.train_step` from its phase 4 on, on
    ``samples`` (the step's kept samples; none: no update, as in training); returns its metrics
    (the reward and length metrics are of the kept samples only). Collective."""
    start = time.perf_counter()
    metrics: dict[str, Any] = rollout_metrics(samples)
    if samples:
        metrics.update(train_on_samples(run.trainer, run.recipe, samples, run.state.counters, step, timer))
    end_step(run, step, metrics, timer, start, run_control(run, step, metrics))
    return metrics


def replay(run: Run, steps: Mapping[int, list[Sample]], last: int,
           timer: Callable[[], PhaseTimer] = PhaseTimer) -> list[dict[str, Any]]:
    """Replay the steps after the run's own (``run.state.step``) up to ``last``; their metrics.
    ``timer``: makes each step's phase timer (the GPU check's also measures memory peaks)."""
    missing = [s for s in range(run.state.step + 1, last + 1) if s not in steps]
    if missing:
        raise ReplayError(f"no samples for steps {missing}")
    out = []
    while run.state.step < last:
        step = run.state.step = run.state.step + 1
        out.append(replay_step(run, step, steps[step], timer()))
    return out


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="train as prorl_megatron.train does, writing each step's samples")
    rec.add_argument("--out", required=True, help="the replay file to write")
    add_recipe_arguments(rec)
    rep = commands.add_parser("run", help="replay a file's steps through the trainer's phases")
    rep.add_argument("--samples", required=True, help="a replay file")
    rep.add_argument("--steps", type=int, default=None, help="the last step to replay (default: the file's last)")
    rep.add_argument("--restart-from", default=None, help="a checkpoint directory to restore first")
    add_recipe_arguments(rep)
    args = parser.parse_args(argv)
    recipe = recipe_from_args(args)
    if args.command == "record":
        from prorl_megatron import run_log
        from prorl_megatron.train import train

        with run_log.routed(recipe.logging.dir):
            train(recipe, tuple(args.overrides), record=Recorder(args.out, f"{recipe.name}: {recipe.model.hf_path}"))
        return 0
    steps = load_steps(args.samples)
    run = replay_run(recipe, tuple(args.overrides), args.restart_from)
    try:
        replay(run, steps, args.steps if args.steps is not None else max(steps))
    finally:
        run.writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
