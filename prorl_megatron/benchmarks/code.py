"""Code benchmarks (verifier: the program run against the tests in the bubblewrap sandbox).

- stdin/stdout problems, :func:`convert_stdio`: APPS (``codeparrot/apps``) and TACO (``BAAI/TACO``):
  ``question``, ``input_output`` (JSON: ``inputs``, ``outputs``, ``fn_name`` for call-based ones),
  ``starter_code`` — converted by the training converter (:func:`prorl_megatron.data.sources.from_apps`);
  CodeContests (``deepmind/code_contests``): ``description``, ``public_tests``, ``private_tests``,
  ``generated_tests`` (each ``{"input": [...], "output": [...]}``; all of them are used); and the
  PRIME / Eurus-2-RL validation files that hold ProRL's apps / codecontests / codeforces / taco sets
  (``PRIME-RL/Eurus-2-RL-Data``, parquet: ``prompt`` messages, ``reward_model.ground_truth``) —
  :func:`prorl_megatron.data.sources.from_eurus2_code`.
- EvalPlus, :func:`convert_evalplus`: HumanEval+ (``evalplus/humanevalplus``) and MBPP+
  (``evalplus/mbppplus``): ``prompt``, ``test`` (the test program: HumanEval+'s defines
  ``check(candidate)``, which is called with ``entry_point``; MBPP+'s calls the function itself),
  ``entry_point``, MBPP+'s ``test_imports`` and ``test_list`` (its first assert shows the function's
  name in the prompt). Both test programs import numpy: the sandbox's interpreter must have it
  (:func:`missing_test_modules`).
- LiveCodeBench, :func:`convert_livecodebench`: ``livecodebench/code_generation_lite`` (``test*.jsonl``):
  ``question_content``, ``starter_code``, ``public_test_cases`` (JSON list of ``{"input", "output",
  "testtype": "stdin" | "functional"}``), ``private_test_cases`` (the same, as JSON or — in the lite
  release — base64 of zlib of a pickled JSON string), ``metadata`` (JSON; ``func_name`` for LeetCode's
  functional tests: the method of ``class Solution``).
"""

from __future__ import annotations

import ast
import base64
import functools
import io
import json
import pickle
import subprocess
import zlib
from typing import Any

from prorl_megatron.benchmarks.records import LoadOptions, first_field, json_value
from prorl_megatron.data import sources
from prorl_megatron.data.schema import BadRow, PromptRow, parse_row
from prorl_megatron.rewards.sandbox import SANDBOX_PYTHON

# EvalPlus's chat prompt (evalplus/codegen.py: instruction_prefix, and the task's prompt in a fence)
EVALPLUS_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem "
                        "in a markdown code block:")
# LiveCodeBench's generic chat prompt (lcb_runner/prompts/code_generation.py,
# get_generic_question_template_answer); its system message ("... will NOT return anything except for the
# program") is left out: DeepSeek-R1's usage recommendations put every instruction in the user turn
LCB_WITH_STARTER = "You will use the following starter code to write the solution to the problem and enclose " \
                   "your code within delimiters."
LCB_WITHOUT_STARTER = "Read the inputs from stdin solve the problem and write the answer to stdout (do not " \
                      "directly test on the sample inputs). Enclose your code within delimiters as follows."


def convert_stdio(record: dict, index: int, options: LoadOptions) -> PromptRow:
    """APPS / TACO, CodeContests or PRIME (Eurus-2-RL) records; the format is told by the fields present."""
    if "input_output" in record:
        row = sources.from_apps(record, index)
        question = str(record["question"])
    elif "reward_model" in record:
        return sources.from_eurus2_code(record, index)  # the published chat messages, as they are
    elif any(k in record for k in ("public_tests", "private_tests", "generated_tests")):
        question = str(first_field(record, "description"))
        tests = []
        for name in ("public_tests", "private_tests", "generated_tests"):
            io_lists = json_value(record.get(name) or {"input": [], "output": []}, name)
            if not isinstance(io_lists, dict) or len(io_lists.get("input") or []) != len(io_lists.get("output") or []):
                raise BadRow(name, "needs lists 'input' and 'output' of equal length")
            tests += [{"input": i, "output": o} for i, o in zip(io_lists["input"], io_lists["output"])]
        row = parse_row({"domain": "code", "prompt": question.rstrip() + sources.CODE_INSTRUCTION,
                         "ground_truth": {"style": "stdio", "tests": tests}})
    else:
        raise BadRow("input_output/public_tests/reward_model", "no tests: expected an APPS/TACO, CodeContests or "
                     "Eurus-2-RL record")
    if not options.instructions:
        row.prompt = question
    return row


def _imports(code: str) -> str:
    """The top-level import lines of ``code`` (HumanEval prompts import what their signatures use)."""
    return "\n".join(line for line in code.splitlines() if line.startswith(("import ", "from ")))


def convert_evalplus(record: dict, index: int, options: LoadOptions) -> PromptRow:
    task = str(first_field(record, "prompt"))
    test = str(first_field(record, "test"))
    imports = record.get("test_imports") or []
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise BadRow("test_imports", "a list of import lines is required")
    if "def check(" in test:  # HumanEval: check(candidate) is called with the entry point
        entry = first_field(record, "entry_point")
        if not str(entry).isidentifier():
            raise BadRow("entry_point", f"a function name is required, got {entry!r}")
        test = f"{test}\n\ncheck({entry})"
    shown = record.get("test_list") or []
    if shown and str(shown[0]) not in task:  # MBPP: the first test shows the function's name and arguments
        task = f"{task.rstrip()}\n{shown[0]}"
    prompt = f"{EVALPLUS_INSTRUCTION}\n```\n{task.strip()}\n```\n" if options.instructions else task
    gt = {"style": "assert", "test": "\n".join([*imports, test]), "prelude": _imports(task)}
    return parse_row({"domain": "code", "prompt": prompt, "ground_truth": gt})


class _StringsOnly(pickle.Unpickler):
    """LiveCodeBench's private tests are a pickled *string*: refuse anything that would build an object."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only a pickled string is expected")


def _private_tests(value: Any) -> Any:
    if not isinstance(value, str) or value.lstrip().startswith("["):
        return json_value(value, "private_test_cases")
    try:
        text = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(value.encode())))).load()
    except Exception as e:  # base64, zlib or pickle
        raise BadRow("private_test_cases", f"neither JSON nor base64(zlib(pickle)) ({type(e).__name__}: {e})") from None
    if not isinstance(text, str):
        raise BadRow("private_test_cases", f"the pickle holds a {type(text).__name__}, not a JSON string")
    return json_value(text, "private_test_cases")


def convert_livecodebench(record: dict, index: int, options: LoadOptions) -> PromptRow:
    question = str(first_field(record, "question_content")).strip()
    starter = str(record.get("starter_code") or "")
    cases = json_value(first_field(record, "public_test_cases"), "public_test_cases")
    private = record.get("private_test_cases")
    cases = (cases if isinstance(cases, list) else []) + (_private_tests(private) if private else [])
    kinds = {c.get("testtype") if isinstance(c, dict) else None for c in cases}
    if not cases or not kinds <= {"stdin", "functional"} or len(kinds) != 1:
        raise BadRow("public_test_cases", f"test cases of one type, stdin or functional, are required; got {kinds}")
    if kinds == {"stdin"}:
        gt: dict[str, Any] = {"style": "stdio", "tests": [{"input": c["input"], "output": c["output"]} for c in cases]}
    else:
        meta = json_value(record.get("metadata") or "{}", "metadata")
        fn = meta.get("func_name") if isinstance(meta, dict) else None
        if not fn:
            raise BadRow("metadata", "functional tests need metadata.func_name")
        try:  # one JSON value per line and argument; the output is one JSON value
            tests = [{"input": [json.loads(a) for a in str(c["input"]).split("\n") if a.strip()],
                      "output": json.loads(c["output"])} for c in cases]
        except ValueError as e:
            raise BadRow("public_test_cases", f"functional test values are not JSON ({e})") from None
        gt = {"style": "function", "fn_name": f"Solution.{fn}" if "class Solution" in starter else fn, "tests": tests}
    prompt = question
    if options.instructions:
        form, code = (LCB_WITH_STARTER, starter) if starter else (LCB_WITHOUT_STARTER, "# YOUR CODE HERE")
        prompt = (f"### Question:\n{question}\n\n### Format: {form}\n```python\n{code}\n```\n\n"
                  "### Answer: (use the provided format with backticks)\n\n")
    return parse_row({"domain": "code", "prompt": prompt, "ground_truth": gt})


@functools.lru_cache(maxsize=None)
def _sandbox_has(module: str) -> bool:
    done = subprocess.run([SANDBOX_PYTHON, "-I", "-c", f"import {module}"], capture_output=True, timeout=60)
    return done.returncode == 0


def missing_test_modules(rows: list[PromptRow]) -> list[str]:
    """Modules that the rows' assert-style test programs import and the sandbox's interpreter lacks
    (EvalPlus's tests import numpy: without it every sample would fail, whatever the model wrote)."""
    wanted: set[str] = set()
    for row in rows:
        gt = row.ground_truth
        if gt.get("style") != "assert":
            continue
        try:
            tree = ast.parse(gt["test"])
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                wanted.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                wanted.add(node.module.split(".")[0])
    return sorted(m for m in wanted if not _sandbox_has(m))
