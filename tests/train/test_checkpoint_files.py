"""Which checkpoint a run resumes from, and what it refuses (no torch.distributed needed)."""

import json

import pytest

from prorl_megatron.checkpoint.hf_io import CheckpointError
from prorl_megatron.checkpoint.train_state import find_checkpoint


def complete(root, step):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "prorl_meta.json").write_text(json.dumps({"step": step}))
    return d


def test_fresh_run_has_nothing_to_resume(tmp_path):
    assert find_checkpoint(tmp_path / "none-yet", "auto") is None
    assert find_checkpoint(tmp_path, "none") is None


def test_auto_follows_latest_and_ignores_torn_writes(tmp_path):
    complete(tmp_path, 3)
    newer = complete(tmp_path, 4)
    (tmp_path / ".step_00000005.incomplete-abc").mkdir()  # killed mid-write: never a candidate
    (tmp_path / "latest").write_text("step_00000004\n")
    assert find_checkpoint(tmp_path, "auto") == newer


def test_latest_pointing_at_an_incomplete_directory_is_reported_by_path(tmp_path):
    (tmp_path / "step_00000007").mkdir()
    (tmp_path / "latest").write_text("step_00000007\n")
    with pytest.raises(CheckpointError, match="step_00000007: incomplete checkpoint"):
        find_checkpoint(tmp_path, "auto")


def test_missing_corrupt_and_explicit_targets(tmp_path):
    (tmp_path / "latest").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="latest: corrupt pointer"):
        find_checkpoint(tmp_path, "auto")
    with pytest.raises(CheckpointError, match="nowhere: checkpoint directory not found"):
        find_checkpoint(tmp_path, str(tmp_path / "nowhere"))
    bad = complete(tmp_path, 2)
    (bad / "prorl_meta.json").write_text("{torn")
    with pytest.raises(CheckpointError, match="prorl_meta.json: corrupt"):
        find_checkpoint(tmp_path, str(bad))
