"""The README's first command, `bash scripts/demo.sh`, with overrides: it trains (fp16 end to end)
and its summary reads the run where the overrides put it."""

import sys
from pathlib import Path

import pytest

from tests import procs

pytestmark = pytest.mark.slow


@pytest.fixture
def venv_env() -> dict[str, str]:
    """The demo's own set-up on this environment (no reinstall): only where it was set up by it."""
    venv = Path(sys.prefix)
    if not (venv / ".prorl-installed").is_file():
        pytest.skip(f"{venv} was not set up by scripts/setup_env.sh")
    return procs.child_env(PRORL_VENV=str(venv), PRORL_NO_SYSTEM_INSTALL="1")


def test_demo_summary_follows_the_overridden_directories(tiny_base, tmp_path, venv_env):
    logs, ckpt = tmp_path / "X", tmp_path / "Y"
    command = ["bash", "scripts/demo.sh", f"model.hf_path={tiny_base}", "precision.params_dtype=float16",
               "train.steps=2", "train.prompts_per_step=8", "train.mini_batch_prompts=4", "eval.n_samples=2",
               "eval.ks=[1,2]", f"logging.dir={logs}", f"checkpoint.dir={ckpt}"]
    done = procs.run(command, timeout=900, env=venv_env)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    assert "validation (held-out sums, 2 samples each, temperature 1.0):" in done.stdout
    assert "pass@1" in done.stdout and f"metrics: {logs}/metrics.jsonl   checkpoints: {ckpt}" in done.stdout
    assert (logs / "plots" / "reward.png").is_file() and (ckpt / "latest").read_text().strip() == "step_00000002"

    again = procs.run(command, timeout=120, env=venv_env)  # a fresh run would resume this one: refused
    assert again.returncode == 2 and f"error: {logs} is not empty" in again.stderr, again.stderr[-3000:]
