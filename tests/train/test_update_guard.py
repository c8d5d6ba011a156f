"""The trainer's update on non-finite gradients: skipped, counted, and its gradient norm logged as
measured, so the health watch's ``nonfinite`` check sees it (tests/train/update_worker.py)."""

from tests import procs
from tests.megatron.conftest import ROOT, env
from tests.megatron.tiny_models import make_tiny_hf


def test_a_skipped_nonfinite_update_logs_a_nonfinite_gradient_norm(tmp_path, dtype="bfloat16"):
    hf_dir = make_tiny_hf("qwen2_tied", tmp_path / "hf")
    out = procs.run(procs.torchrun_command(1, ROOT / "tests" / "train" / "update_worker.py", hf_dir, dtype),
                    timeout=600, env=env())
    text = out.stdout + out.stderr
    assert out.returncode == 0 and procs.reported(text, "OK") == {0}, text[-6000:]
