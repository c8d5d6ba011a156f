"""The first screen of a run: set-up lines, the progress bar and the step lines on the console;
library notices (megatron's Apex / Transformer Engine fallbacks, vLLM, torch) in train.log."""

import re

import pytest

from tests.train.conftest import run, train_command

pytestmark = pytest.mark.slow

LIBRARY = ("site-packages", "UserWarning", "FutureWarning", "Apex", "Transformer Engine", "Triton", "NUMA",
           "vllm.", "(MainProcess", "LD_PRELOAD")


def test_console_shows_our_lines_and_train_log_the_rest(tiny_base, tmp_path):
    done = run(train_command(tmp_path, tiny_base, "train.steps=2"))
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-6000:]
    lines = [line for line in re.split(r"[\r\n]", console) if line.strip()]
    for word in LIBRARY:
        assert not [line for line in lines if word in line], (word, console[-4000:])
    assert re.search(r"^step 1 \| reward", console, re.M) and re.search(r"^step 2 \| reward", console, re.M)
    first = next(i for i, line in enumerate(lines) if line.startswith(("ProRL:", "step 1 |")))
    assert first <= 5, lines[:first]  # set-up lines only before the bar
    assert re.search(r"memory plan: fits: peak .* GiB", console), console[-4000:]  # checked before building

    log = (tmp_path / "logs" / "train.log").read_text()
    assert "rank0 INFO" in log and "rank1 INFO" in log
    assert "memory plan:\nMemory plan for tiny-cpu" in log  # the whole table, in the run's log
    assert log.count("Apex is not installed") >= 2, log[:3000]  # megatron's notice, from every rank
    assert re.search(r"rank1 (INFO|WARNING) vllm\.", log)  # vLLM's records, with the rank

    # before the engine takes its memory back, the training passes give theirs up (issue 12, item 11):
    # per step, on every rank: sleep after the rollout, free, wake the weights, sync, wake the KV cache
    for rank in (0, 1):
        events = re.findall(rf"rank{rank} DEBUG prorl_megatron\.\S+: (engine sleep|training memory freed|"
                            r"engine wake up weights|engine wake up kv_cache)", log)
        first_sync = ["engine wake up weights", "engine wake up kv_cache"]  # the fresh engine gets the policy
        assert events == first_sync + ["engine sleep", "training memory freed", *first_sync] * 2, (rank, events)
