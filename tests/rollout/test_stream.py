"""The step stream on a real vLLM engine (tests/rollout/stream_worker.py): waves sample what the
rounds did; drawing ahead fills the batch with the first groups to complete and aborts the rest."""

import pytest

from tests import procs
from tests.rollout.test_rollout import ROOT, tiny_qwen2  # noqa: F401 (fixture)


@pytest.mark.parametrize("engine_tp", [2, 1], ids=["one-replica-tp2", "two-replicas"])
def test_stream_waves_and_drawing_ahead(tiny_qwen2, engine_tp):  # noqa: F811
    out = procs.run(procs.torchrun_command(2, ROOT / "tests" / "rollout" / "stream_worker.py", tiny_qwen2, engine_tp),
                    timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and procs.reported(text, "OK") == {0, 1}, text[-6000:]
