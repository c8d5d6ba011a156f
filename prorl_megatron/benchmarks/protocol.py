"""The paper's evaluation protocol: every benchmark scored on every checkpoint, resumable per benchmark.

For each checkpoint — a Megatron checkpoint (a training step, or a converted model) or a HF
directory — its tokenizer renders the prompts (``eval.benchmark.apply_chat_template``), one vLLM engine
holds its weights (:func:`prorl_megatron.eval.load_checkpoint_engine`; under torchrun with
``rollout.engine_tensor_parallel`` below the world size, the engine's data-parallel replicas split the
prompts), and each benchmark is scored by :func:`prorl_megatron.eval.evaluate` — ``prorl_megatron.eval``'s
own evaluation, with its seeds — under :func:`benchmark_recipe`: the recipe with the protocol's samples
per prompt, temperature, top-p and response length. So ``prorl_megatron.eval --files
OUT/prompts/<benchmark>.jsonl`` with the overrides a result records (``eval_overrides``) gives the same
numbers. The response length is ``eval.benchmark.max_response_tokens`` where the model's context holds
it after the benchmark's longest prompt, and what it holds otherwise.

What is written to ``OUT`` (rank 0; each file atomically):

- ``prompts/<benchmark>.jsonl``: the rows scored, in the project's schema;
- ``<label>/<benchmark>.json``: one benchmark's result as soon as it is scored: the settings it was
  scored with, the pass@k table and each problem's sample and correct counts. A rerun skips every
  benchmark whose result holds the same settings (a killed evaluation resumes at the first benchmark
  not finished, and builds no engine for a checkpoint with none left) and refuses one scored with
  other settings;
- ``<label>/results.json``: the checkpoint's results, every benchmark and the per-domain averages
  (the mean over the domain's benchmarks, as the paper's "Avg." columns);
- the table and plots over the checkpoints of the run (:mod:`prorl_megatron.benchmarks.report`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from prorl_megatron import benchmarks
from prorl_megatron.benchmarks.records import Loaded, LoadOptions
from prorl_megatron.data.dataset import DataError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PROMPTS_DIR = "prompts"


class ProtocolError(RuntimeError):
    """A benchmark cannot be scored as asked, or a rerun would mix results of other settings."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint to score and the label of its results (a directory name under ``OUT``)."""

    path: Path
    label: str

    @property
    def megatron(self) -> bool:
        return (self.path / "prorl_meta.json").is_file()

    def step(self) -> Optional[int]:
        """The training step of a Megatron training checkpoint (None for a HF directory or a converted model)."""
        from prorl_megatron.checkpoint.dist_ckpt import read_meta

        return read_meta(self.path).get("step") if self.megatron else None


def default_label(path: Path) -> str:
    """``runs/x/checkpoints/step_00000060`` -> ``x-step60``; ``runs/tiny-base/hf`` -> ``tiny-base``; else the name."""
    path = path.resolve()
    step = re.fullmatch(r"step_(\d+)", path.name)
    if step and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-step{int(step.group(1))}"
    return path.parent.name if path.name == "hf" else path.name


def checkpoints_from(paths: list[str], labels: Optional[list[str]] = None) -> list[Checkpoint]:
    """Checked checkpoints with unique labels (``labels``: one per path, else :func:`default_label`)."""
    if labels and len(labels) != len(paths):
        raise ProtocolError(f"{len(labels)} labels for {len(paths)} checkpoints: give one --label per --checkpoint")
    out = []
    for i, name in enumerate(paths):
        path = Path(name)
        if not (path / "prorl_meta.json").is_file() and not (path / "config.json").is_file():
            raise ProtocolError(f"{path}: neither a Megatron checkpoint (prorl_meta.json) nor a HF directory "
                                "(config.json)")
        label = labels[i] if labels else default_label(path)
        if not re.fullmatch(r"[\w.+-]+", label):
            raise ProtocolError(f"{path}: label {label!r} must be a plain file name (letters, digits, . + - _)")
        out.append(Checkpoint(path, label))
    seen = [c.label for c in out]
    twice = sorted({x for x in seen if seen.count(x) > 1})
    if twice:
        raise ProtocolError(f"checkpoints share the labels {twice}: give each a --label")
    return out


def protocol_ks(cfg: Any) -> list[int]:
    """The ks of pass@k: ``eval.benchmark.ks``, or 1, 2, 4, ... below ``n_samples``, and ``n_samples``."""
    if cfg.ks:
        return sorted(set(cfg.ks))
    ks, k = [], 1
    while k < cfg.n_samples:
        ks.append(k)
        k *= 2
    return ks + [cfg.n_samples]


def benchmark_recipe(recipe: Any, response_tokens: int) -> Any:
    """``recipe`` with the protocol in the fields :func:`prorl_megatron.eval.evaluate` reads: ``eval``'s
    samples, ks, temperature and top-p, ``rollout.max_response_tokens`` and ``data.apply_chat_template``."""
    cfg = recipe.eval.benchmark
    return dataclasses.replace(
        recipe,
        eval=dataclasses.replace(recipe.eval, n_samples=cfg.n_samples, ks=protocol_ks(cfg), temperature=cfg.temperature,
                                 top_p=cfg.top_p),
        rollout=dataclasses.replace(recipe.rollout, max_response_tokens=response_tokens),
        data=dataclasses.replace(recipe.data, apply_chat_template=cfg.apply_chat_template),
    )


def load_options(recipe: Any) -> LoadOptions:
    cfg = recipe.eval.benchmark
    return LoadOptions(instructions=cfg.instructions, choice_seed=cfg.choice_seed)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it: ``path`` is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 and its result (or its :class:`ProtocolError`) on every rank (collective):
    every rank takes the same decisions, whatever filesystem each sees."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except ProtocolError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ProtocolError(value)
    return value


def settings_of(recipe: Any, checkpoint: Checkpoint, loaded: Loaded, response_tokens: int) -> dict[str, Any]:
    """What a benchmark's result depends on; a result with other settings is never mixed in."""
    cfg = recipe.eval.benchmark
    return {"checkpoint": str(checkpoint.path.resolve()), "step": checkpoint.step(), "benchmark": loaded.name,
            "file": loaded.path.name, "sha256": loaded.sha256, "rows": len(loaded.rows),
            "skipped_rows": len(loaded.skipped), "seed": recipe.seed, "params_dtype": recipe.precision.params_dtype,
            "n_samples": cfg.n_samples, "ks": protocol_ks(cfg), "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_response_tokens": response_tokens, "apply_chat_template": cfg.apply_chat_template,
            "instructions": cfg.instructions, "choice_seed": cfg.choice_seed,
            "strip_think": recipe.rewards.strip_think}


def eval_overrides(settings: dict[str, Any], longest_prompt: int) -> list[str]:
    """``prorl_megatron.eval`` overrides that score ``prompts/<benchmark>.jsonl`` as the protocol did."""
    return [f"seed={settings['seed']}", f"precision.params_dtype={settings['params_dtype']}",
            f"eval.n_samples={settings['n_samples']}", f"eval.ks=[{','.join(map(str, settings['ks']))}]",
            f"eval.temperature={settings['temperature']}", f"eval.top_p={settings['top_p']}",
            f"rollout.max_prompt_tokens={longest_prompt}",
            f"rollout.max_response_tokens={settings['max_response_tokens']}",
            f"data.apply_chat_template={str(settings['apply_chat_template']).lower()}",
            f"rewards.strip_think={str(settings['strip_think']).lower()}"]


def finished(path: Path, settings: dict[str, Any]) -> bool:
    """Whether ``path`` holds a result scored with ``settings``; :class:`ProtocolError` if it holds one
    scored with other settings."""
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text()).get("settings", {})
    except ValueError as e:
        raise ProtocolError(f"{path}: unreadable result ({e}); delete it to rescore") from None
    if stored == settings:
        return True
    changed = "; ".join(f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(stored) | set(settings))
                        if stored.get(k) != settings.get(k))
    raise ProtocolError(f"{path} was scored with other settings ({changed}): refusing to mix results; score into "
                        "another --out, or delete it to rescore")


@dataclass
class Plan:
    """One benchmark on one checkpoint: its encoded prompts, response length and settings."""

    loaded: Loaded
    prompts: list[Any]  # EncodedPrompt
    longest: int  # tokens of the longest prompt
    response_tokens: int
    settings: dict[str, Any]
    result: Path  # OUT/<label>/<benchmark>.json
    context: int = 0  # the model's context (max_position_embeddings)


def plan_checkpoint(checkpoint: Checkpoint, loaded: list[Loaded], recipe: Any, out: Path) -> list[Plan]:
    """Encode every benchmark's prompts with the checkpoint's tokenizer and fix each one's response length:
    the protocol's, or what the model's context holds after the benchmark's longest prompt."""
    from transformers import AutoTokenizer

    from prorl_megatron.data.chat import encode
    from prorl_megatron.eval import checkpoint_hf_dir
    from prorl_megatron.models.architectures import model_dims, read_hf_config

    cfg = recipe.eval.benchmark
    hf_dir = str(checkpoint_hf_dir(checkpoint.path))
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=recipe.model.trust_remote_code)
    context = model_dims(read_hf_config(hf_dir)).max_position_embeddings
    plans = []
    for bench in loaded:
        prompts = [encode(r, tokenizer, cfg.apply_chat_template) for r in bench.rows]
        longest = max(prompts, key=lambda p: len(p.ids))
        response = min(cfg.max_response_tokens, context - len(longest.ids))
        if response < 1:
            raise ProtocolError(f"{bench.name}: the prompt of {longest.row.source} is {len(longest.ids)} tokens, which "
                                f"leaves no room for a response in the model's {context}-token context")
        settings = json.loads(json.dumps(settings_of(recipe, checkpoint, bench, response)))
        plans.append(Plan(bench, prompts, len(longest.ids), response, settings,
                          out / checkpoint.label / f"{bench.name}.json", context))
    return plans


def engine_recipe(recipe: Any, plans: list[Plan]) -> Any:
    """``recipe`` with a ``rollout`` whose engine holds every planned prompt with its response (and no more
    than the model's context: vLLM refuses a longer one)."""
    longest = max(p.longest for p in plans)
    response = min(max(p.response_tokens for p in plans), plans[0].context - longest)
    return dataclasses.replace(recipe, rollout=dataclasses.replace(recipe.rollout, max_prompt_tokens=longest,
                                                                   max_response_tokens=response))


def score_checkpoint(checkpoint: Checkpoint, plans: list[Plan], todo: list[int], recipe: Any, pool: Any,
                     progress: Any) -> None:
    """Score the plans ``todo`` (indices; collective), each result written as soon as it is scored."""
    from prorl_megatron.eval import evaluate, load_checkpoint_engine

    done = [p.loaded.name for i, p in enumerate(plans) if i not in todo]
    if done:
        log.info("%s: %s already scored with these settings: skipped", checkpoint.label, ", ".join(done))
    if not todo:
        return
    engine = load_checkpoint_engine(checkpoint.path, engine_recipe(recipe, [plans[i] for i in todo]))
    try:
        for i in todo:
            plan = plans[i]
            start = time.perf_counter()
            table = evaluate(engine, pool, plan.prompts, benchmark_recipe(recipe, plan.response_tokens),
                             per_prompt=True)
            seconds = time.perf_counter() - start
            if is_rank0():
                bench = benchmarks.get(plan.loaded.name)
                write_json(plan.result, {
                    "settings": plan.settings, "label": checkpoint.label, "benchmark": bench.name, "title": bench.title,
                    "domain": bench.domain, "fields": plan.loaded.fields, "skipped": plan.loaded.skipped,
                    "longest_prompt_tokens": plan.longest, "seconds": round(seconds, 1),
                    "eval_overrides": eval_overrides(plan.settings, plan.longest), "table": table})
            line = (f"{checkpoint.label} {plan.loaded.name}: pass@1 {table['pass@1']:.4f} over {len(plan.prompts)} "
                    f"problems x {plan.settings['n_samples']} samples ({seconds:.0f} s)")
            log.info(line, extra={"console": False})  # the log file; the console gets it above the bar
            progress.write(line)
            progress.advance(checkpoint=checkpoint.label, benchmark=plan.loaded.name)
    finally:
        engine.shutdown()


def checkpoint_results(checkpoint: Checkpoint, plans: list[Plan], recipe: Any) -> dict[str, Any]:
    """The checkpoint's ``results.json``: every benchmark's result and the per-domain averages."""
    cfg = recipe.eval.benchmark
    ks = protocol_ks(cfg)
    results: dict[str, Any] = {"label": checkpoint.label, "checkpoint": str(checkpoint.path.resolve()),
                               "step": checkpoint.step(), "ks": ks, "benchmarks": {}, "domains": {},
                               "protocol": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "ks"}}
    for plan in plans:
        stored = json.loads(plan.result.read_text())
        table = stored["table"]
        results["benchmarks"][plan.loaded.name] = {
            "title": stored["title"], "domain": stored["domain"], "file": str(plan.loaded.path),
            "problems": len(table["per_prompt"]), "skipped_rows": len(stored["skipped"]), "fields": stored["fields"],
            "max_response_tokens": plan.response_tokens, "eval_overrides": stored["eval_overrides"],
            **{key: table[key] for key in [f"pass@{k}" for k in ks] + ["reward", "response_length"]},
            "per_prompt": table["per_prompt"]}
    for domain in benchmarks.DOMAIN_ORDER:
        names = [b.name for b in benchmarks.BENCHMARKS if b.domain == domain and b.name in results["benchmarks"]]
        if names:
            results["domains"][domain] = {"benchmarks": names, **{
                f"pass@{k}": sum(results["benchmarks"][n][f"pass@{k}"] for n in names) / len(names) for k in ks}}
    return results


def load_all(files: list[tuple[Any, Path]], recipe: Any, on_bad_row: str) -> list[Loaded]:
    """Every benchmark's rows (each rank loads them: cheap, and no rows to send); stops on a file the
    protocol cannot score (a bad row without ``skip``, an EvalPlus test the sandbox cannot import)."""
    from prorl_megatron.benchmarks.code import missing_test_modules
    from prorl_megatron.rewards.sandbox import SANDBOX_PYTHON

    loaded = []
    for bench, path in files:
        try:
            one = benchmarks.load(bench, path, load_options(recipe), on_bad_row)
        except DataError as e:
            raise ProtocolError(f"benchmark {bench.name}: {e}") from None
        missing = missing_test_modules(one.rows) if bench.domain == "code" else []
        if missing:
            raise ProtocolError(f"benchmark {bench.name}: its test programs import {', '.join(missing)}, which the "
                                f"code sandbox's interpreter {SANDBOX_PYTHON} cannot import (Debian: apt-get install "
                                f"python3-{missing[0]}): every sample would fail")
        log.info("%s: %d problems from %s (fields read: %s)%s", bench.name, len(one.rows), path, ", ".join(one.fields),
                 f"; skipped {len(one.skipped)} bad rows (--on-bad-row skip)" if one.skipped else "")
        loaded.append(one)
    return loaded


def run(recipe: Any, checkpoints: list[Checkpoint], files: list[tuple[Any, Path]], out: Path,
        on_bad_row: str = "error") -> list[Path]:
    """Score every benchmark on every checkpoint (collective); return the ``results.json`` files (rank 0)."""
    from prorl_megatron.metrics import Progress
    from prorl_megatron.parallel import init_parallel
    from prorl_megatron.rewards.pool import RewardPool, pool_settings

    init_parallel(recipe.parallel.tensor, recipe.parallel.pipeline, seed=recipe.seed)
    loaded = load_all(files, recipe, on_bad_row)
    if is_rank0():
        for bench in loaded:
            write_atomic(out / PROMPTS_DIR / f"{bench.name}.jsonl",
                         "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in bench.rows))
    plans = {c.label: plan_checkpoint(c, loaded, recipe, out) for c in checkpoints}
    # what is left to score, decided before anything starts: results of other settings stop the run here
    todo = on_rank0(lambda: {label: [i for i, p in enumerate(ps) if not finished(p.result, p.settings)]
                             for label, ps in plans.items()})
    total = sum(len(p) for p in plans.values())
    progress = Progress(total, total - sum(map(len, todo.values())), enabled=is_rank0(), desc="benchmarks",
                        unit="benchmark")
    written = []
    try:
        with RewardPool(recipe.rewards.workers, pool_settings(recipe.rewards),
                        code=any(benchmarks.get(b.name).domain == "code" for b in loaded)) as pool:
            for checkpoint in checkpoints:
                score_checkpoint(checkpoint, plans[checkpoint.label], todo[checkpoint.label], recipe, pool, progress)
                if is_rank0():
                    path = out / checkpoint.label / RESULTS_FILE
                    text = json.dumps(checkpoint_results(checkpoint, plans[checkpoint.label], recipe), indent=1) + "\n"
                    if not path.is_file() or path.read_text() != text:  # a resumed run leaves a finished one be
                        write_atomic(path, text)
                    written.append(path)
    finally:
        progress.close()
    return written
