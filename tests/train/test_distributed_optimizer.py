"""``train.distributed_optimizer``: megatron's DistributedOptimizer at DP2 on CPU/gloo, bf16 parameters.

Real processes (torchrun, gloo), one tiny Qwen2; the checks are in ``dist_optimizer_worker.py``:
DP2 (sharded state, the same updates as the plain optimizer, the non-finite skip on both ranks,
checkpoint round trip, reference reset, checkpoint right after a reset), then the DP2
checkpoints loaded at DP1, then a DP1 checkpoint loaded at DP2.
"""

import sys

import pytest

from tests import procs
from tests.megatron.conftest import ROOT, env
from tests.megatron.tiny_models import make_tiny_hf

WORKER = ROOT / "tests" / "train" / "dist_optimizer_worker.py"


def run_worker(nproc: int, hf_dir, out_dir, mode: str) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    out = procs.run([*launcher, str(WORKER), str(hf_dir), str(out_dir), mode], timeout=600, env=env())
    text = out.stdout + out.stderr
    assert out.returncode == 0 and procs.reported(text, f"OK {mode}") == set(range(nproc)), text[-6000:]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf("qwen2_tied", tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.fixture(scope="module")
def dp2_run(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_opt")
    run_worker(2, hf_dir, out, "dp2")
    return out


@pytest.fixture(scope="module")
def dp1_run(hf_dir, dp2_run):
    run_worker(1, hf_dir, dp2_run, "dp1")
    return dp2_run


def test_sharded_updates_skip_reset_and_checkpoints_at_dp2(dp2_run):
    """(a) shards and parity with the plain optimizer, (d) non-finite skip, (b) DP2 round trip,
    (c) reset == fresh optimizer, (e) checkpoint right after a reset."""
    assert (dp2_run / "ckpt" / "step_00000003").is_dir() and (dp2_run / "ckpt" / "step_00000004").is_dir()


def test_dp2_checkpoints_resume_at_dp1(dp1_run):
    """(b) the DP2 checkpoints (with moments, and just reset) load at DP1 and continue exactly."""
    assert (dp1_run / "ckpt1" / "step_00000004").is_dir()


def test_dp1_checkpoint_resumes_at_dp2(hf_dir, dp1_run):
    run_worker(2, hf_dir, dp1_run, "dp1to2")
