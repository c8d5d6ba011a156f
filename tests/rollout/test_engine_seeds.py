"""RolloutEngine's request seeds in a real vLLM engine: spaced by n, by the prompt's index in the round."""

from pathlib import Path

from tests import procs
from tests.rollout.test_rollout import tiny_qwen2  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "rollout" / "seed_worker.py"


# ---- a real vLLM engine: identical neighbouring prompts get different samples ----------------


def test_identical_neighbouring_prompts_get_different_samples(tiny_qwen2):  # noqa: F811
    cmd = procs.torchrun_command(1, WORKER, tiny_qwen2)  # vLLM's external launcher reads RANK etc. from torchrun's
    out = procs.run(cmd, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, (out.stdout + out.stderr)[-6000:]
