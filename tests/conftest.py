import os
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests import procs  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """GPU tests (marker ``gpu``) are skipped where no CUDA device is present."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # torch missing or broken: GPU tests cannot run anyway
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The demo's base model, warmed up only to 10% greedy accuracy (enough reward signal)."""
    out = tmp_path_factory.mktemp("tiny-base") / "hf"
    done = procs.run([sys.executable, "-m", "prorl_megatron.demo.tiny_base", "--out", str(out), "--target", "0.1"],
                     timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out
