"""`sbatch slurm/prorl_1p5b.sh` on a real single-node Slurm (CPU overrides: 1 node, 2 tasks,
the tiny recipe): the job trains, logs and checkpoints; a checkpoint signal mid-run makes it
checkpoint, requeue itself and resume with the step count continuing."""

import os
import sys
import time
from pathlib import Path

import pytest

from prorl_megatron.metrics import read_jsonl
from tests.slurm.cluster import Cluster, missing

# Skipped only on a developer machine without Slurm; CI (.ci/run sets PRORL_REQUIRE_SLURM=1) fails instead.
REQUIRED = os.environ.get("PRORL_REQUIRE_SLURM") == "1"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(missing()) and not REQUIRED, reason=missing() or "ok")]

SCRIPT = "slurm/prorl_1p5b.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    assert not missing(), missing()
    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def sbatch(cluster: Cluster, run_dir: Path, hf_dir: Path, *overrides: str, wait: bool) -> tuple[str, str]:
    """Submit the project's script with CPU overrides; return (job id, sbatch output)."""
    venv = Path(sys.prefix)
    env_vars = f"ALL,PRORL_RECIPE=recipes/tiny_cpu.yaml,PRORL_RUN_DIR={run_dir},PRORL_VENV={venv}"
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
           "--time=30:00", f"--output={run_dir}/slurm-%j.out", f"--export={env_vars}",
           *(["--wait"] if wait else []), SCRIPT,
           f"model.hf_path={hf_dir}", "train.prompts_per_step=8", "train.mini_batch_prompts=4",
           "train.max_tokens_per_micro_batch=384", "eval.every_n_steps=0", "logging.console_every=1", *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    done = cluster.run(*cmd, timeout=1200)
    job = done.stdout.strip().split(";")[0].splitlines()[0] if done.stdout.strip() else ""
    return job, done.stdout + done.stderr + f"\nexit {done.returncode}"


def job_output(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(run_dir.glob("slurm-*.out")))


def test_sbatch_trains_logs_and_checkpoints(cluster, tiny_base, tmp_path):
    run_dir = tmp_path / "run"
    job, out = sbatch(cluster, run_dir, tiny_base, "train.steps=3", "checkpoint.every_n_steps=2", wait=True)
    assert out.strip().endswith("exit 0"), out + job_output(run_dir) + cluster.logs()
    steps = [r["step"] for r in read_jsonl(run_dir / "logs" / "metrics.jsonl") if "event" not in r]
    assert steps == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    log = (run_dir / "jobs" / f"{job}-restart0.log").read_text()
    assert f"job {job} (restart 0)" in log and "2 tasks" in log and "trainer exited with status 0" in log


def test_checkpoint_signal_requeues_and_resumes(cluster, tiny_base, tmp_path):
    run_dir = tmp_path / "run"
    job, out = sbatch(cluster, run_dir, tiny_base, "train.steps=6", "checkpoint.every_n_steps=0", wait=False)
    assert job, out
    metrics = run_dir / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and any(r.get("step", 0) >= 2 for r in read_jsonl(metrics))):
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            job_output(run_dir) + cluster.logs()
        time.sleep(0.5)
    signalled = cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@1200 sends before the limit
    assert signalled.returncode == 0, signalled.stderr
    deadline = time.monotonic() + 900
    while not (run_dir / "jobs" / f"{job}-restart1.log").is_file() or cluster.job_state(job) != "COMPLETED":
        assert time.monotonic() < deadline, job_output(run_dir) + cluster.logs()
        assert cluster.job_state(job) not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), \
            job_output(run_dir) + cluster.logs()
        time.sleep(1)
    first = (run_dir / "jobs" / f"{job}-restart0.log").read_text()
    second = (run_dir / "jobs" / f"{job}-restart1.log").read_text()
    assert "stop signal received: checkpointed step" in first and "requeueing job" in first
    stopped_at = int(first.split("checkpointed step ")[1].split()[0])
    assert 2 <= stopped_at < 6
    assert "resumed from" in second and f"step_{stopped_at:08d}" in second
    steps = [r["step"] for r in read_jsonl(metrics) if "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the count continued after the requeue
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
