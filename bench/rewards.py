"""Verifier throughput: math answers per second, and the code sandbox's overhead per test.

    python bench/rewards.py [--math 2000] [--tests 100] [--workers 2]

Math: a GRPO-shaped batch — prompts x 16 samples sharing each prompt's ground truth, answers
mixed right/wrong as fractions, decimals and LaTeX variants — scored through the RewardPool
(worker processes, as training does) and, as a baseline, in this process. Sandbox: the same stdin/stdout test run N times inside the bubblewrap sandbox
and N times as a plain ``/usr/bin/python3`` subprocess (same program, same run); the
difference per test is the sandbox's overhead.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prorl_megatron.rewards.math import score_math  # noqa: E402
from prorl_megatron.rewards.pool import PoolSettings, RewardPool, ScoreRequest  # noqa: E402
from prorl_megatron.rewards.sandbox import SANDBOX_PYTHON, Limits, Sandbox  # noqa: E402

PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


def math_requests(n: int, seed: int = 0, group: int = 16) -> list[ScoreRequest]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p, q = rng.randint(1, 50), rng.randint(2, 60)
        gold = f"\\frac{{{p}}}{{{q}}}"
        forms = [f"\\boxed{{\\frac{{{p}}}{{{q}}}}}", f"\\boxed{{{p / q:.6f}}}", f"\\boxed{{{p + 1}/{q}}}",
                 f"so the answer is \\boxed{{\\dfrac{{{2 * p}}}{{{2 * q}}}}}.", f"\\boxed{{{rng.randint(1, 99)}}}"]
        for _ in range(group):
            out.append(ScoreRequest("math", f"<think>work</think> {rng.choice(forms)}", {"answer": gold}))
    return out[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--math", type=int, default=2000)
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    requests = math_requests(args.math)
    result: dict = {}

    start = time.perf_counter()
    for r in requests[: args.math // 4]:
        score_math(r.response.split("</think>")[1], r.ground_truth)
    result["math_in_process_per_s"] = round((args.math // 4) / (time.perf_counter() - start), 1)

    with RewardPool(args.workers, PoolSettings(), code=False) as pool:
        pool.score(requests[:8])  # workers import math-verify and sympy once
        start = time.perf_counter()
        scores = pool.score(requests)
        result["math_pool_per_s"] = round(len(requests) / (time.perf_counter() - start), 1)
        result["math_pool_workers"] = args.workers
        result["math_fraction_correct"] = round(sum(s.reward for s in scores) / len(scores), 3)
        distinct = math_requests(args.math // 2, seed=1, group=1)  # every answer and ground truth new
        start = time.perf_counter()
        pool.score(distinct)
        result["math_pool_per_s_all_distinct"] = round(len(distinct) / (time.perf_counter() - start), 1)

    sandbox = Sandbox(Limits())
    start = time.perf_counter()
    for i in range(args.tests):
        assert sandbox.run(PROGRAM, stdin=f"{i} 1\n").stdout.strip() == str(i + 1)
    sandboxed = (time.perf_counter() - start) / args.tests
    start = time.perf_counter()
    for i in range(args.tests):
        out = subprocess.run([SANDBOX_PYTHON, "-I", "-c", PROGRAM], input=f"{i} 1\n", capture_output=True, text=True)
        assert out.stdout.strip() == str(i + 1)
    plain = (time.perf_counter() - start) / args.tests
    result["sandbox_ms_per_test"] = round(sandboxed * 1000, 1)
    result["plain_python_ms_per_test"] = round(plain * 1000, 1)
    result["sandbox_overhead_ms_per_test"] = round((sandboxed - plain) * 1000, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
