"""Code: the model's Python program against the problem's unit tests, each run in the sandbox.

Three test styles:
- ``stdio`` (APPS / TACO / Eurus-2-RL / LiveCodeBench): the program reads ``input`` on stdin; its
  stdout must equal ``output`` (compared line by line with trailing whitespace and trailing blank
  lines ignored);
- ``function`` (call-based APPS / TACO, LiveCodeBench's LeetCode problems): the program defines
  ``fn_name``, or a class and its method for ``"Class.method"`` (called on a fresh instance); it is
  called with ``input`` (a list of positional arguments) and must return ``output`` (compared as
  JSON values);
- ``assert`` (HumanEval / MBPP / EvalPlus): the benchmark's own test program ``test`` runs after
  the model's program in the same interpreter (``prelude``, e.g. the prompt's imports, before
  it); it passes when that exits with status 0.

Reward 1 only if every test passes; ``info["pass_fraction"]`` reports the fraction that did.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from prorl_megatron.rewards.sandbox import Sandbox
from prorl_megatron.rewards.text import Score, VerifyContext

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)

# Appended to the model's program for function-call tests; prints the result as one JSON line.
_CALL = """

import json as __json, sys as __sys
__args = __json.loads({args!r})
__result = {fn}(*__args)
__sys.stdout.write("\\n" + {marker!r} + __json.dumps(__result, default=list) + "\\n")
"""
_MARKER = "__PRORL_RESULT__"


def extract_program(final: str) -> Optional[str]:
    """The last fenced Python code block of the answer, or None."""
    blocks = _FENCE.findall(final)
    return blocks[-1] if blocks else None


def _same_stdout(got: str, want: str) -> bool:
    def lines(text: str) -> list[str]:
        out = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        return out

    return lines(got) == lines(want)


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))  # tuples -> lists, as the JSON round trip does


def run_test(sandbox: Sandbox, program: str, test: dict, style: str, fn_name: Optional[str]) -> tuple[bool, str]:
    """Run one test; return (passed, why not)."""
    if style == "stdio":
        result = sandbox.run(program, stdin=str(test["input"]))
        if result.timed_out:
            return False, "timeout"
        if result.returncode != 0:
            return False, f"exit code {result.returncode}: {result.stderr.strip()[-200:]}"
        return (True, "") if _same_stdout(result.stdout, str(test["output"])) else (False, "wrong output")
    args = test["input"] if isinstance(test["input"], list) else [test["input"]]
    cls, _, method = str(fn_name).rpartition(".")
    target = f"{cls}().{method}" if cls else method  # "Solution.twoSum": LeetCode's class, a fresh instance
    result = sandbox.run(program + _CALL.format(args=json.dumps(args), fn=target, marker=_MARKER))
    if result.timed_out:
        return False, "timeout"
    if result.returncode != 0:
        return False, f"exit code {result.returncode}: {result.stderr.strip()[-200:]}"
    lines = [line for line in result.stdout.split("\n") if line.startswith(_MARKER)]
    if not lines:
        return False, "no result"
    try:
        got = json.loads(lines[-1][len(_MARKER):])
    except ValueError:
        return False, "unreadable result"
    return (True, "") if got == _normalise(test["output"]) else (False, "wrong result")


def _score_assert(sandbox: Sandbox, program: str, ground_truth: dict) -> Score:
    """The benchmark's test program after the model's: 1 when it runs to its end (a marker printed after
    it: a program that exits early, ``sys.exit(0)`` included, skips the tests and fails) with status 0."""
    prelude = ground_truth.get("prelude") or ""
    result = sandbox.run(f"{prelude}\n{program}\n\n{ground_truth['test']}\n\nprint({_MARKER!r})\n")
    passed = result.ok and result.stdout.rstrip().endswith(_MARKER)
    info = {"pass_fraction": float(passed), "sandboxed": sandbox.isolated}
    if passed:
        return Score(1.0, info)
    why = ("timeout" if result.timed_out else f"exit code {result.returncode}: {result.stderr.strip()[-200:]}"
           if not result.ok else "it stopped before the tests ran")
    return Score(0.0, {**info, "reason": f"test program: {why}"})


def score_code(final: str, ground_truth: dict, ctx: VerifyContext) -> Score:
    """``ground_truth``: ``{"style": "stdio"|"function", "tests": [{"input", "output"}], "fn_name"?}`` or
    ``{"style": "assert", "test": str, "prelude"?: str}``.

    ``ctx.sandbox`` runs the tests; a verifier process without one refuses.
    """
    sandbox = ctx.sandbox
    if sandbox is None:
        raise RuntimeError("the code verifier needs a sandbox (VerifyContext.sandbox)")
    program = extract_program(final)
    if program is None:
        return Score.zero("no ```python code block in the answer", pass_fraction=0.0)
    if ground_truth["style"] == "assert":
        return _score_assert(sandbox, program, ground_truth)
    style, tests = ground_truth["style"], ground_truth["tests"]
    passed, failures = 0, []
    for i, test in enumerate(tests):
        ok, why = run_test(sandbox, program, test, style, ground_truth.get("fn_name"))
        passed += ok
        if not ok:
            failures.append(f"test {i}: {why}")
    fraction = passed / len(tests)
    info = {"pass_fraction": fraction, "sandboxed": sandbox.isolated}
    if failures:
        info["reason"] = "; ".join(failures[:3])
    return Score(1.0 if passed == len(tests) else 0.0, info)
