"""bench/gpu_check.py's dry run on CPU (``--cpu-smoke``): the script a lent GPU runs, on a tiny
model in 2 processes under gloo (data parallel, megatron's DistributedOptimizer). bf16 here, whose
restart check is this suite's bf16 replay check; the script's loop runs each dtype alike, and
tests/test_replay.py restarts an fp16 run over TP2 on recorded samples."""

import json
import sys

from tests import procs


def test_the_gpu_check_runs_the_trainer_and_its_restart_reproduces_the_steps(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = procs.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--dtypes", "bfloat16", "--out", out,
                      "--work", tmp_path / "work"], timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    r = json.loads(out.read_text())
    assert r["status"] == "done"
    bf16 = r["replay"]["bfloat16"]
    check = bf16["restart_check"]
    assert check["passed"] and check["bitwise"] and check["records"] == ["3", "4", "4/stage", "5"]
    assert bf16["setup"]["optimizer"] == ["DistributedOptimizer"] and bf16["setup"]["data_parallel"] == 2
    assert bf16["setup"]["backend"].startswith("cpu:gloo")
    assert bf16["steps"]["steps"] == [2, 3, 4, 5] and bf16["steps"]["update_tokens_per_s"] > 0
    plans = r["plans"]
    assert plans["rounds"] and plans["ratio_new_over_old/logprob_plus_update"] > 0
    assert plans["old_plan"]["padding_fraction_rank0"] > plans["new_plan"]["padding_fraction_rank0"]
    assert r["recompute"]["selective"]["pass"] == 2 and r["recompute"]["none"]["pass"] == 2
    head = r["logprob_memory"]  # CUDA peaks only; here the code path
    assert set(head) >= {"chunked/forward_backward", "full_logits/no_grad", "chunked_with_entropy/no_grad"}
    assert not (tmp_path / "work" / "bfloat16-straight" / "ckpt").exists()  # checkpoints are removed after the check
