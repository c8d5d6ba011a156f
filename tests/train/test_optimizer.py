import subprocess
import sys

import pytest

from tests.megatron.conftest import ROOT, env, hf_models  # noqa: F401 (fixture)

CASES = [("float32", "torch"), ("bfloat16", "torch"), ("float16", "torch"), ("bfloat16", "group-step")]


@pytest.mark.parametrize("dtype,adam", CASES, ids=[f"{d}-{a}" for d, a in CASES])
def test_nonfinite_guard_reset_and_optimizer_checkpoint_round_trip(hf_models, tmp_path, dtype, adam):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "train" / "optimizer_worker.py"),
                          str(hf_models["qwen2_tied"]), str(tmp_path), dtype, adam],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and f"OK {dtype} {adam}" in out.stdout, (out.stdout + out.stderr)[-5000:]
