"""The real loop end to end on CPU: vLLM rollouts, math-verify rewards, Megatron TP2 / PP2 updates."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prorl_megatron.metrics import read_jsonl
from prorl_megatron.replay import load_steps
from tests.train.conftest import kill_when, run, signal_when, train_command

pytestmark = pytest.mark.slow


def metrics(run_dir: Path) -> dict:
    """(step, event or None) -> record."""
    return {(r["step"], r.get("event")): r for r in read_jsonl(run_dir / "logs" / "metrics.jsonl")}


def ok(done: subprocess.CompletedProcess) -> str:
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    return text


def test_tp2_run_resets_evaluates_checkpoints_and_plots(tiny_base, tmp_path):
    ok(run(train_command(tmp_path, tiny_base, "train.steps=4", "reset.every_n_steps=2", "eval.every_n_steps=2",
                         "checkpoint.every_n_steps=2", "checkpoint.keep_last=1", "rollout.check_sync_every=2")))
    m = metrics(tmp_path)
    assert {s for s, e in m if e is None} == {0, 1, 2, 3, 4}
    assert [s for s, e in m if e == "reset"] == [2, 4]
    assert m[(2, "reset")]["triggers"] == ["periodic"]
    # the KL to the reference is exactly 0 on the step right after a reset, and not before it
    assert m[(3, None)]["kl_ref"] == 0.0
    assert m[(2, None)]["kl_ref"] > 0.0 and m[(4, None)]["kl_ref"] > 0.0
    for step in (0, 2, 4):
        assert 0.0 <= m[(step, None)]["val/pass@1"] <= m[(step, None)]["val/pass@4"] <= 1.0
    step = m[(1, None)]
    for key in ("reward/mean", "pass_rate/math", "response_length/mean", "response_length/truncated_frac",
                "entropy", "clip_frac", "approx_kl", "grad_norm", "sampling/kept_frac", "mismatch_mean",
                "time/rollout", "time/reward", "time/logprob", "time/update", "time/sync", "tokens_per_s"):
        assert key in step, key
    assert step["updates"] == 2 and step["skipped_updates"] == 0
    assert step["mismatch_max"] < 1e-3  # fp32 vLLM vs fp32 Megatron on the same weights
    assert m[(2, None)]["sync/logprob_diff_max"] < 1e-3
    assert 0.0 < step["entropy"] < 3.5

    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000004"]  # keep_last=1
    meta = json.loads((ckpt / "step_00000004" / "prorl_meta.json").read_text())
    assert meta["step"] == 4 and meta["loop"]["counters"]["resets"] == 2 and meta["optimizer_empty"]

    # eval.py reads the training checkpoint's policy; tools/plot.py draws the run
    out = tmp_path / "eval.json"
    ok(run(train_command(tmp_path, tiny_base, "checkpoint.resume=none", module="prorl_megatron.eval")[:-1]
           + ["--checkpoint", str(ckpt / "step_00000004"), "--out", str(out)]))
    table = json.loads(out.read_text())
    assert set(table) >= {"pass@1", "pass@4", "math/pass@1", "reward"}
    assert abs(table["pass@1"] - m[(4, None)]["val/pass@1"]) < 1e-9  # same weights, same seeds
    plotted = ok(run([sys.executable, "tools/plot.py", str(tmp_path / "logs")]))
    assert "resets: 2 at steps [2, 4]" in plotted
    assert (tmp_path / "logs" / "plots" / "reward.png").stat().st_size > 1000


def test_pp2_run_trains_and_its_samples_are_recorded_for_the_replay(tiny_base, tmp_path):
    """The run goes through the replay's recorder (python -m prorl_megatron.replay record: the same
    train(), each step's kept samples written to a file)."""
    command = train_command(tmp_path, tiny_base, "parallel.tensor=1", "parallel.pipeline=2", "train.steps=2",
                            "rollout.check_sync_every=1", "checkpoint.every_n_steps=0", module="prorl_megatron.replay")
    at = command.index("prorl_megatron.replay") + 1
    command[at:at] = ["record", "--out", str(tmp_path / "samples.jsonl")]
    ok(run(command))
    m = metrics(tmp_path)
    for step in (1, 2):
        assert m[(step, None)]["updates"] == 2 and m[(step, None)]["skipped_updates"] == 0
        assert m[(step, None)]["sync/logprob_diff_max"] < 1e-3
        assert m[(step, None)]["grad_norm"] > 0
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000002"  # the final step is saved
    recorded = load_steps(tmp_path / "samples.jsonl")
    assert sorted(recorded) == [1, 2]
    for step, samples in recorded.items():  # what the step trained on: its kept groups, its loss tokens
        assert len({s.group for s in samples}) == m[(step, None)]["sampling/kept_groups"]
        assert sum(len(s.response_ids) for s in samples) == m[(step, None)]["tokens"]


@pytest.mark.parametrize("dtype,layout", [
    ("float32", ["parallel.tensor=2"]),
    # DP2: micro-batches balanced over two ranks, Adam's state sharded over them
    ("bfloat16", ["parallel.tensor=1", "train.distributed_optimizer=true"]),
    ("float16", ["parallel.tensor=2"]),
], ids=["float32-tp2", "bfloat16-dp2-distributed-optimizer", "float16-tp2"])
def test_resume_after_kill_matches_an_uninterrupted_run(tiny_base, tmp_path, dtype, layout):
    """6 steps straight == a stop signal during step 2's rollout (step 1 checkpointed then), resume,
    kill -9 in step 4, resume, kill -9 mid-checkpoint in step 5 (right after step 4's reset), resume."""
    overrides = ["train.steps=6", "reset.every_n_steps=2", f"precision.params_dtype={dtype}", *layout]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(run(train_command(straight, tiny_base, *overrides, "checkpoint.every_n_steps=3")))

    command = train_command(killed, tiny_base, *overrides, "checkpoint.every_n_steps=1")
    jsonl = killed / "logs" / "metrics.jsonl"
    ckpt = killed / "ckpt"

    def reached(step):
        return lambda: jsonl.is_file() and any(r["step"] >= step for r in read_jsonl(jsonl))

    # Slurm's time-limit warning arrives as step 2 starts: the rollout is abandoned, step 1 (not
    # checkpointed with every_n_steps=5) is written, and the job script is told to requeue
    status, text = signal_when(train_command(killed, tiny_base, *overrides, "checkpoint.every_n_steps=5"),
                               reached(1))
    assert status != 0 and "the step is redone after the resume" in text, text[-4000:]
    assert (ckpt / "stopped").read_text().strip() == "1" and (ckpt / "latest").read_text().strip() == "step_00000001"
    assert [s for s, e in metrics(killed) if e is None] == [1]

    kill_when(command, reached(3))  # step 3 is logged (after its checkpoint): the kill lands in step 4
    assert (ckpt / "latest").read_text().strip() == "step_00000003"

    kill_when(command, lambda: any(ckpt.glob(".step_00000005.incomplete-*")))  # killed while writing
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert any(ckpt.glob(".step_00000005.incomplete-*")) and not (ckpt / "step_00000005").exists()

    text = ok(run(command))
    assert "resumed from" in text and "step_00000004" in text
    assert not any(ckpt.glob(".*incomplete*"))  # the torn write was cleaned up, never loaded
    a, b = metrics(straight), metrics(killed)
    for key in [(2, None), (3, None), (4, None), (5, None), (6, None), (2, "reset"), (4, "reset"), (6, "reset")]:
        same = {k: v for k, v in a[key].items() if not k.startswith("time/") and k != "tokens_per_s"}
        got = {k: v for k, v in b[key].items() if not k.startswith("time/") and k != "tokens_per_s"}
        assert got == same, key
    assert [s for s, e in b if e is None] == [1, 2, 3, 4, 5, 6]  # one consistent history
