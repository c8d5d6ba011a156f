"""The engine-vs-policy parity check: passes a correct sync in every dtype, catches planted mismatches."""

import json

import pytest

from prorl_megatron.rollout.weight_sync import SYNC_TOLERANCES
from tests import procs
from tests.rollout.test_rollout import ROOT, tiny_qwen2  # noqa: F401 (fixture)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_parity_check_passes_a_sync_and_catches_wrong_weights(tiny_qwen2, tmp_path, dtype):  # noqa: F811
    cmd = procs.torchrun_command(2, ROOT / "tests" / "rollout" / "sync_check_worker.py", tiny_qwen2, tmp_path, dtype)
    done = procs.run(cmd, timeout=900)
    text = done.stdout + done.stderr
    assert done.returncode == 0 and procs.reported(text, "OK") == {0, 1}, text[-5000:]
    stats = json.loads((tmp_path / f"stats-{dtype}.json").read_text())
    print(dtype, stats["synced"])  # the measurement behind SYNC_TOLERANCES
    tolerance = SYNC_TOLERANCES[dtype]
    for key in ("synced", "resynced"):
        assert stats[key]["mean"] <= tolerance.mean / 3 and stats[key]["p90"] <= tolerance.p90 / 3, stats[key]
    for planted in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert "does not hold the policy's weights" in stats[planted]
