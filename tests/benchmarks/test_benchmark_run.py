"""The protocol end to end on CPU: the demo's base model and a checkpoint of a demo-recipe run scored on the
shipped tiny benchmark files (one per domain, in each benchmark's published format) under torchrun with
two engine replicas; killed mid-way and resumed without rescoring; refused with other settings; the
numbers equal ``prorl_megatron.eval``'s on the same prompts and settings; the table and plots."""

import json
import sys
from pathlib import Path

import pytest

from tests import procs

pytestmark = pytest.mark.slow

BENCH = procs.ROOT / "data" / "tiny" / "bench"
NAMES = ["amc", "math500", "livecodebench", "gpqa_diamond", "ifeval", "reasoning_gym"]  # the paper's order


def ok(done) -> str:
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    return text


def benchmark_command(out: Path, *checkpoints: tuple[str, Path], extra: tuple[str, ...] = ()) -> list[str]:
    labels = [a for label, path in checkpoints for a in ("--checkpoint", str(path), "--label", label)]
    return procs.torchrun_command(2, "-m", "prorl_megatron.benchmarks", "run", "--recipe", "recipes/tiny_cpu.yaml",
                                  *labels, "--bench-dir", BENCH, "--out", out, f"logging.dir={out}/logs",
                                  "rollout.engine_tensor_parallel=1",  # two engine replicas split the prompts
                                  "eval.benchmark.n_samples=4", *extra)


def snapshot(out: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/*.json")}


def test_benchmarks_resume_refuse_mixing_match_eval_and_tabulate(tiny_base, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    ok(procs.run(procs.torchrun_command(
        2, "-m", "prorl_megatron.train", "--recipe", "recipes/tiny_cpu.yaml", f"model.hf_path={tiny_base}",
        f"checkpoint.dir={run}/checkpoints", f"logging.dir={run}/logs", "train.steps=2", "train.prompts_per_step=8",
        "train.mini_batch_prompts=4", "train.max_tokens_per_micro_batch=384", "eval.every_n_steps=0",
        "checkpoint.every_n_steps=0"), timeout=600))
    trained = run / "checkpoints" / "step_00000002"
    command = benchmark_command(out, ("base", tiny_base), ("trained", trained))

    with procs.Child(command, env=procs.child_env()) as child:  # killed as the trained model's first result lands
        child.wait_until(lambda: (out / "trained" / "amc.json").is_file(), timeout=600, what="trained/amc.json")
        child.kill()
    before = snapshot(out)
    assert {p.name for p in before if p.parent.name == "base"} == {*(f"{n}.json" for n in NAMES), "results.json"}
    done_trained = {p.stem for p in before if p.parent.name == "trained"}
    assert "amc" in done_trained and len(done_trained) < len(NAMES) and "results" not in done_trained

    text = ok(procs.run(command, timeout=600))
    assert all(snapshot(out)[p] == v for p, v in before.items())  # nothing finished was scored again
    assert f"base: {', '.join(NAMES)} already scored with these settings: skipped" in text
    assert "base amc: pass@1" not in text and "trained amc: pass@1" not in text
    assert "trained reasoning_gym: pass@1" in text or "reasoning_gym" in done_trained
    results = {label: json.loads((out / label / "results.json").read_text()) for label in ("base", "trained")}
    for r in results.values():
        assert list(r["benchmarks"]) == NAMES and list(r["domains"]) == ["math", "code", "stem", "instruction", "logic"]
        assert all(len(b["per_prompt"]) == b["problems"] > 0 for b in r["benchmarks"].values())
        assert r["domains"]["math"]["pass@1"] == pytest.approx(
            (r["benchmarks"]["amc"]["pass@1"] + r["benchmarks"]["math500"]["pass@1"]) / 2)
    table = (out / "table.md").read_text()
    assert "| checkpoint | AMC | MATH | Math avg | LiveCodeBench | GPQA | IFEval | Reasoning Gym |" in table
    assert "| trained: Δ pass@1 [95% CI] |" in table and "| MATH | 32 |" in table
    assert (out / "table.csv").read_text().count("\n") == 3
    assert all((out / f"passk_{d}.png").stat().st_size > 1000 for d in ("math", "code", "stem", "instruction", "logic"))

    # other settings: refused before any engine is built, nothing overwritten
    refused = procs.run(benchmark_command(out, ("base", tiny_base), extra=("eval.benchmark.top_p=0.9",)), timeout=600)
    assert refused.returncode != 0
    assert "scored with other settings (top_p: 0.95 -> 0.9)" in refused.stdout + refused.stderr
    assert all(snapshot(out)[p] == v for p, v in before.items())

    # prorl_megatron.eval on the prompts the protocol scored, with the overrides it recorded: the same numbers
    bench = json.loads((out / "trained" / "math500.json").read_text())
    ok(procs.run(procs.torchrun_command(
        2, "-m", "prorl_megatron.eval", "--recipe", "recipes/tiny_cpu.yaml", f"logging.dir={tmp_path}/eval_logs",
        "rollout.engine_tensor_parallel=1", *bench["eval_overrides"], "--checkpoint", trained,
        "--files", out / "prompts" / "math500.jsonl", "--out", tmp_path / "eval.json", "--per-prompt"), timeout=600))
    standalone = json.loads((tmp_path / "eval.json").read_text())
    assert standalone == bench["table"]

    # the table sub-command redraws it from the saved results, with another base
    shown = ok(procs.run([sys.executable, "-m", "prorl_megatron.benchmarks", "table", out / "trained", out / "base",
                          "--base", "base", "--out", tmp_path / "again"], timeout=300))
    assert "| base: Δ pass@1 [95% CI] |" not in shown and "| trained: Δ pass@1 [95% CI] |" in shown
