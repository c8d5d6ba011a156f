"""The reward pool: batch order, and verifiers that crash, hang or raise never stop a batch."""

import time

import pytest

from prorl_megatron.rewards.pool import PoolSettings, RewardPool, ScoreRequest
from prorl_megatron.rewards.sandbox import Limits

SETTINGS = PoolSettings(
    timeout_s=2.0, limits=Limits(cpu_s=2, wall_s=3),
    extra_verifiers=(("sleeps", "tests.rewards.helpers:sleeps"), ("dies", "tests.rewards.helpers:dies"),
                     ("raises", "tests.rewards.helpers:raises")),
)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(2, SETTINGS) as p:
        yield p


def test_mixed_batch_in_order(pool):
    requests = [
        ScoreRequest("math", "<think>x</think> \\boxed{4}", {"answer": "4"}),
        ScoreRequest("math", "<think>never closed \\boxed{4}", {"answer": "4"}),
        ScoreRequest("code", "```python\nprint(int(input()) * 2)\n```", {"style": "stdio", "tests": [
            {"input": "2", "output": "4"}]}),
        ScoreRequest("stem", "(B)", {"answer": "B", "choices": ["x", "y"]}),
        ScoreRequest("math", "done</think>\\boxed{5}", {"answer": "4"}, prompt_opened_think=True),
        ScoreRequest("astrology", "x", {}),
    ]
    scores = pool.score(requests)
    assert [s.reward for s in scores] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert scores[1].info["reason"] == "unfinished <think> block"
    assert scores[5].info["reason"].startswith("unknown domain 'astrology'")


def test_failing_verifiers_yield_zero_and_are_counted(pool):
    before = dict(pool.failures)
    requests = [ScoreRequest("sleeps", "", {}), ScoreRequest("math", "\\boxed{1}", {"answer": "1"}),
                ScoreRequest("dies", "", {}), ScoreRequest("raises", "", {}),
                ScoreRequest("math", "\\boxed{2}", {"answer": "2"})]
    start = time.monotonic()
    scores = pool.score(requests)
    assert time.monotonic() - start < 15
    assert [s.reward for s in scores] == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert scores[0].info["reason"] == "verifier timed out after 2 s"
    assert scores[2].info["reason"].startswith("verifier process died (exit code -9)")
    assert scores[3].info["reason"] == "verifier error: RuntimeError: boom"
    for kind in ("timeout", "crash", "error"):
        assert pool.failures[kind] == before.get(kind, 0) + 1, kind
    # the pool still works after replacing its workers
    assert [s.reward for s in pool.score([ScoreRequest("math", "\\boxed{3}", {"answer": "3"})])] == [1.0]


def test_pool_settings_follow_the_recipe():
    from prorl_megatron.config import RewardsConfig
    from prorl_megatron.rewards.pool import pool_settings

    settings = pool_settings(RewardsConfig(timeout_s=7.0, code_cpu_s=3.0, code_memory_mib=512))
    assert settings.timeout_s == 7.0 and settings.isolate and not settings.allow_unsandboxed
    assert (settings.limits.cpu_s, settings.limits.memory_mib) == (3.0, 512)
    unsafe = pool_settings(RewardsConfig(code_sandbox="none", allow_unsandboxed=True))
    assert not unsafe.isolate and unsafe.allow_unsandboxed
    with RewardPool(1, unsafe) as pool:  # runs the program on the host, with its limits
        score = pool.score([ScoreRequest("code", "```python\nprint(1)\n```",
                                         {"style": "stdio", "tests": [{"input": "", "output": "1"}]})])[0]
        assert score.reward == 1.0 and score.info["sandboxed"] is False


def test_workers_ignore_slurms_warning_signal_and_dead_idle_workers_are_replaced(pool):
    import os
    import signal

    os.kill(pool._slots[0].process.pid, signal.SIGUSR1)  # Slurm signals every process of the step
    time.sleep(0.5)
    assert pool._slots[0].process.is_alive()
    before = pool.failures["crash"]
    os.kill(pool._slots[1].process.pid, signal.SIGKILL)  # killed from outside while idle
    pool._slots[1].process.join(timeout=10)
    requests = [ScoreRequest("math", f"\\boxed{{{i}}}", {"answer": str(i)}) for i in range(4)]
    assert [s.reward for s in pool.score(requests)] == [1.0] * 4  # nothing lost, nothing scored 0
    assert pool.failures["crash"] == before + 1
