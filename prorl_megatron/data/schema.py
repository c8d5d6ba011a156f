"""The one prompt schema of every domain, and its validation.

A row (one line of a jsonl file, one row of a parquet file)::

    {"id": "deepscaler-17",                      # optional, unique within a file
     "domain": "math" | "code" | "stem" | "logic" | "instruction",
     "prompt": "text" | [{"role": "user", "content": "..."}, ...],
     "ground_truth": "<JSON object, encoded as a string>"}

``ground_truth`` is a JSON *string* on disk (Arrow cannot hold the five domains' different
shapes in one column); an already-decoded object is accepted too. Its fields per domain:

- math: ``{"answer": str}``
- code: ``{"style": "stdio" | "function", "tests": [{"input", "output"}, ...], "fn_name": str}``
  (``fn_name`` for the function style only: a function, or ``"Class.method"``), or
  ``{"style": "assert", "test": "<test program>", "prelude": str}`` (``prelude`` optional)
- stem: ``{"answer": str, "choices": [str, ...]}`` (``answer`` a letter when ``choices`` is given)
- logic: ``{"dataset": reasoning-gym name, "entry": {"question", "answer", "metadata"}}``
- instruction: ``{"instruction_id_list": [IFEval ids], "kwargs": [{...}, ...], "prompt": str}``
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from typing import Any, Union

DOMAINS = ("math", "code", "stem", "logic", "instruction")

Messages = list[dict[str, str]]


class BadRow(ValueError):
    """A row that does not follow the schema; ``field`` names the offending field."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"field {field_name!r}: {problem}")
        self.field = field_name


@dataclass
class PromptRow:
    domain: str
    prompt: Union[str, Messages]
    ground_truth: dict[str, Any]
    id: str = ""
    source: str = field(default="", compare=False)  # "file:row", for messages

    def to_json(self) -> dict[str, Any]:
        """The on-disk form (ground truth JSON-encoded)."""
        return {"id": self.id, "domain": self.domain, "prompt": self.prompt,
                "ground_truth": json.dumps(self.ground_truth, sort_keys=True)}


def _need(condition: bool, field_name: str, problem: str) -> None:
    if not condition:
        raise BadRow(field_name, problem)


def _check_math(gt: dict) -> None:
    _need(isinstance(gt.get("answer"), (str, int, float)) and str(gt.get("answer")).strip() != "",
          "ground_truth.answer", "a non-empty answer is required")


def _check_code(gt: dict) -> None:
    _need(gt.get("style") in ("stdio", "function", "assert"), "ground_truth.style",
          "must be 'stdio', 'function' or 'assert'")
    if gt["style"] == "assert":
        _need(isinstance(gt.get("test"), str) and gt["test"].strip() != "", "ground_truth.test",
              "the assert style needs the test program")
        _need(isinstance(gt.get("prelude", ""), str), "ground_truth.prelude", "must be a string")
        return
    tests = gt.get("tests")
    _need(isinstance(tests, list) and len(tests) > 0, "ground_truth.tests", "a non-empty list is required")
    for i, test in enumerate(tests):
        _need(isinstance(test, dict) and "input" in test and "output" in test, f"ground_truth.tests[{i}]",
              "each test needs 'input' and 'output'")
    if gt["style"] == "function":
        fn = gt.get("fn_name")
        _need(isinstance(fn, str) and 1 <= len(fn.split(".")) <= 2 and all(p.isidentifier() for p in fn.split(".")),
              "ground_truth.fn_name", "function-style tests need the function's name (or 'Class.method')")


def _check_stem(gt: dict) -> None:
    _check_math(gt)
    choices = gt.get("choices")
    if choices is not None:
        _need(isinstance(choices, list) and 2 <= len(choices) <= 26, "ground_truth.choices",
              "2 to 26 choices are required")
        letters = string.ascii_uppercase[: len(choices)]
        _need(str(gt["answer"]).strip().upper() in letters, "ground_truth.answer",
              f"must be one of the choice letters {', '.join(letters)}, got {gt['answer']!r}")


def _check_logic(gt: dict) -> None:
    import reasoning_gym

    name = gt.get("dataset")
    _need(isinstance(name, str), "ground_truth.dataset", "a reasoning-gym dataset name is required")
    try:
        reasoning_gym.get_score_answer_fn(name)
    except Exception:
        raise BadRow("ground_truth.dataset", f"unknown reasoning-gym dataset {name!r}") from None
    entry = gt.get("entry")
    _need(isinstance(entry, dict) and "question" in entry and "metadata" in entry, "ground_truth.entry",
          "the generated entry (question, answer, metadata) is required")


def _check_instruction(gt: dict) -> None:
    from prorl_megatron.rewards.instruction import ifeval_registry

    ids = gt.get("instruction_id_list")
    _need(isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids), "ground_truth.instruction_id_list",
          "a non-empty list of IFEval instruction ids is required")
    unknown = [i for i in ids if i not in ifeval_registry()]
    _need(not unknown, "ground_truth.instruction_id_list", f"unknown instruction ids {unknown}")
    kwargs = gt.get("kwargs", [{}] * len(ids))
    _need(isinstance(kwargs, list) and len(kwargs) == len(ids) and all(isinstance(k, dict) for k in kwargs),
          "ground_truth.kwargs", f"one mapping per instruction ({len(ids)}) is required")


CHECKS = {"math": _check_math, "code": _check_code, "stem": _check_stem, "logic": _check_logic,
          "instruction": _check_instruction}


def parse_row(raw: Any, source: str = "") -> PromptRow:
    """Validate one raw row and return it as a :class:`PromptRow`; raise :class:`BadRow`."""
    _need(isinstance(raw, dict), "(row)", f"a mapping is required, got {type(raw).__name__}")
    domain = raw.get("domain")
    _need(domain in DOMAINS, "domain", f"must be one of {', '.join(DOMAINS)}, got {domain!r}")
    prompt = raw.get("prompt")
    if isinstance(prompt, list):
        for i, message in enumerate(prompt):
            _need(isinstance(message, dict) and isinstance(message.get("role"), str)
                  and isinstance(message.get("content"), str), f"prompt[{i}]",
                  "chat messages need string 'role' and 'content'")
        _need(len(prompt) > 0, "prompt", "an empty message list")
    else:
        _need(isinstance(prompt, str) and prompt.strip() != "", "prompt", "a non-empty string or message list is required")
    gt = raw.get("ground_truth")
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except ValueError as e:
            raise BadRow("ground_truth", f"not valid JSON ({e})") from None
    _need(isinstance(gt, dict), "ground_truth", "a JSON object (or its JSON string) is required")
    CHECKS[domain](gt)
    return PromptRow(domain=domain, prompt=prompt, ground_truth=gt, id=str(raw.get("id") or ""), source=source)
