import sys

import pytest

from tests import procs
from tests.megatron.conftest import ROOT, env, hf_models  # noqa: F401 (fixture)

CASES = [("float32", "torch"), ("bfloat16", "torch"), ("float16", "torch"), ("bfloat16", "group-step")]


@pytest.mark.parametrize("dtype,adam", CASES, ids=[f"{d}-{a}" for d, a in CASES])
def test_nonfinite_guard_reset_and_optimizer_checkpoint_round_trip(hf_models, tmp_path, dtype, adam):
    out = procs.run([sys.executable, str(ROOT / "tests" / "train" / "optimizer_worker.py"),
                     str(hf_models["qwen2_tied"]), str(tmp_path), dtype, adam], timeout=600, env=env())
    assert out.returncode == 0 and f"OK {dtype} {adam}" in out.stdout, (out.stdout + out.stderr)[-5000:]
