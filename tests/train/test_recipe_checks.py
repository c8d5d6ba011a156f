"""Recipe and input problems stop the trainer before any model is built, naming what and where."""

import sys

from tests import procs
from tests.train.conftest import env


def train(*overrides, logs=None):
    """The trainer alone (one process); ``logs``: its logging.dir (train.log), else the recipe's."""
    logging_dir = [f"logging.dir={logs}"] if logs else []
    return procs.run([sys.executable, "-m", "prorl_megatron.train", "--recipe", "recipes/tiny_cpu.yaml",
                      *overrides, *logging_dir], timeout=300, env=env())


def test_bad_data_row_is_named_by_file_and_row(tiny_base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "domain": "math", "prompt": "1+1=", "ground_truth": {"answer": "2"}}\n'
                   '{"id": "b", "domain": "poetry", "prompt": "x", "ground_truth": {}}\n')
    out = train(f"model.hf_path={tiny_base}", f"data.train_files=[{bad}]", f"checkpoint.dir={tmp_path}/c",
                logs=tmp_path)
    assert out.returncode == 2
    assert "bad.jsonl" in out.stderr and "domain" in out.stderr
    log = (tmp_path / "train.log").read_text()
    assert "Setting up optimizer" not in log + out.stderr + out.stdout  # nothing was built
    assert "bad.jsonl" in log  # the error is in the run's log too


def test_missing_model_and_bad_resume_target(tiny_base, tmp_path):
    out = train(f"model.hf_path={tmp_path}/nothing-here", logs=tmp_path)
    assert out.returncode == 2 and "nothing-here/config.json not found" in out.stderr
    out = train(f"model.hf_path={tiny_base}", f"checkpoint.resume={tmp_path}/gone", logs=tmp_path)
    assert out.returncode == 2 and "gone: checkpoint directory not found" in out.stderr


def test_unknown_recipe_key_is_named():
    out = train("algo.eps_hihg=0.3")
    assert out.returncode == 2 and "eps_hihg" in out.stderr


def test_rollout_correction_without_its_band_is_named():
    out = train("rollout.correction=icepop")
    assert out.returncode == 2 and "rollout.correction=icepop needs its band" in out.stderr


def test_a_recipe_that_cannot_fit_is_refused_with_the_plan(tiny_base, tmp_path):
    """The memory plan runs before anything is built (here: host RAM over the processes)."""
    out = train(f"model.hf_path={tiny_base}", "train.max_tokens_per_micro_batch=400000000", "parallel.tensor=1",
                "rollout.engine_tensor_parallel=1",
                f"checkpoint.dir={tmp_path}/c", logs=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "does not fit" in out.stderr and "train.max_tokens_per_micro_batch" in out.stderr
    assert "Setting up optimizer" not in (tmp_path / "train.log").read_text()  # nothing was built
