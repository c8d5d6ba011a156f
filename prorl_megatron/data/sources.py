"""Converters from the public sources of the ProRL mixture into the project's schema.

Each converter takes one source record (a dict as the source publishes it) and returns a
:class:`~prorl_megatron.data.schema.PromptRow`, validated; a record that cannot be converted
raises :class:`~prorl_megatron.data.schema.BadRow` naming the field.

- ``deepscaler`` (math): ``{"problem", "answer", "solution"?}``
- ``eurus2-code``: ``{"prompt": [messages], "reward_model": {"ground_truth": "<json>"}, ...}``
  whose ground truth holds ``inputs``/``outputs`` (and ``fn_name`` for call-based problems)
- ``apps`` / ``taco`` (code): ``{"question", "input_output": "<json inputs/outputs/fn_name>",
  "starter_code"?}``
- ``scp116k`` (STEM): ``{"problem", "answer"? , "solution"?, "choices"?}`` — the answer is
  ``answer`` or the last ``\\boxed{}`` of ``solution``
- ``reasoning-gym`` (logic): a generated entry ``{"question", "answer", "metadata":
  {"source_dataset", ...}}`` (see :func:`generate_reasoning_gym`)
- ``ifeval`` (instruction following): ``{"key", "prompt", "instruction_id_list", "kwargs"}``
"""

from __future__ import annotations

import json
import string
from typing import Any, Callable, Iterator

from prorl_megatron.data.schema import BadRow, PromptRow, parse_row
from prorl_megatron.rewards.text import last_boxed

CODE_INSTRUCTION = ("\n\nWrite a complete Python 3 program in a single ```python code block."
                    " It reads from standard input and writes to standard output.")
FUNCTION_INSTRUCTION = "\n\nWrite the function `{fn}` in Python 3, in a single ```python code block."


def _field(record: dict, name: str) -> Any:
    if name not in record or record[name] in (None, ""):
        raise BadRow(name, "missing in the source record")
    return record[name]


def _json_field(record: dict, name: str) -> Any:
    value = _field(record, name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise BadRow(name, f"not valid JSON ({e})") from None
    return value


def _tests(io: Any, where: str) -> dict:
    """APPS/TACO/Eurus ``{"inputs", "outputs", "fn_name"?}`` -> our code ground truth."""
    if not isinstance(io, dict) or not isinstance(io.get("inputs"), list) or not isinstance(io.get("outputs"), list):
        raise BadRow(where, "needs lists 'inputs' and 'outputs'")
    if len(io["inputs"]) != len(io["outputs"]) or not io["inputs"]:
        raise BadRow(where, f"{len(io['inputs'])} inputs but {len(io['outputs'])} outputs")
    fn = io.get("fn_name")
    if fn:
        # call-based: inputs are argument lists; outputs are one-element lists holding the return value
        outputs = [o[0] if isinstance(o, list) and len(o) == 1 else o for o in io["outputs"]]
        tests = [{"input": i if isinstance(i, list) else [i], "output": o} for i, o in zip(io["inputs"], outputs)]
        return {"style": "function", "fn_name": fn, "tests": tests}
    text = lambda v: "\n".join(v) if isinstance(v, list) else str(v)  # noqa: E731
    return {"style": "stdio", "tests": [{"input": text(i), "output": text(o)}
                                        for i, o in zip(io["inputs"], io["outputs"])]}


def _code_prompt(question: str, gt: dict, starter: str = "") -> str:
    tail = FUNCTION_INSTRUCTION.format(fn=gt["fn_name"]) if gt["style"] == "function" else CODE_INSTRUCTION
    return question.rstrip() + (f"\n\nStarter code:\n```python\n{starter}\n```" if starter else "") + tail


def from_deepscaler(record: dict, index: int) -> PromptRow:
    prompt = str(_field(record, "problem")) + "\n\nPut your final answer within \\boxed{}."
    return parse_row({"id": f"deepscaler-{index}", "domain": "math", "prompt": prompt,
                      "ground_truth": {"answer": str(_field(record, "answer"))}})


def from_eurus2_code(record: dict, index: int) -> PromptRow:
    messages = _field(record, "prompt")
    truth = _field(record, "reward_model")
    io = _json_field(truth if isinstance(truth, dict) else {}, "ground_truth")
    gt = _tests(io, "reward_model.ground_truth")
    if not isinstance(messages, list):
        raise BadRow("prompt", "Eurus-2-RL prompts are message lists")
    return parse_row({"id": f"eurus2-code-{index}", "domain": "code", "prompt": messages, "ground_truth": gt})


def from_apps(record: dict, index: int) -> PromptRow:
    gt = _tests(_json_field(record, "input_output"), "input_output")
    prompt = _code_prompt(str(_field(record, "question")), gt, str(record.get("starter_code") or ""))
    return parse_row({"id": f"apps-{record.get('problem_id', index)}", "domain": "code", "prompt": prompt,
                      "ground_truth": gt})


def from_scp116k(record: dict, index: int) -> PromptRow:
    answer = record.get("answer")
    if answer in (None, ""):
        answer = last_boxed(str(record.get("solution") or ""))
    if answer in (None, ""):
        raise BadRow("answer", "no 'answer' and no \\boxed{} answer in 'solution'")
    problem = str(_field(record, "problem"))
    choices = record.get("choices")
    gt: dict[str, Any] = {"answer": str(answer).strip()}
    if choices:
        gt["choices"] = [str(c) for c in choices]
        listed = "\n".join(f"({letter}) {c}" for letter, c in zip(string.ascii_uppercase, gt["choices"]))
        problem = f"{problem}\n\n{listed}\n\nAnswer with the letter of the correct choice in \\boxed{{}}."
    else:
        problem += "\n\nPut your final answer within \\boxed{}."
    return parse_row({"id": f"scp116k-{index}", "domain": "stem", "prompt": problem, "ground_truth": gt})


def from_reasoning_gym(record: dict, index: int) -> PromptRow:
    metadata = _field(record, "metadata")
    name = metadata.get("source_dataset") if isinstance(metadata, dict) else None
    if not name:
        raise BadRow("metadata.source_dataset", "missing in the source record")
    entry = {"question": _field(record, "question"), "answer": record.get("answer"), "metadata": metadata}
    prompt = entry["question"] + "\n\nGive your final answer inside <answer></answer>."
    return parse_row({"id": f"rg-{name}-{index}", "domain": "logic", "prompt": prompt,
                      "ground_truth": {"dataset": name, "entry": entry}})


def from_ifeval(record: dict, index: int) -> PromptRow:
    prompt = str(_field(record, "prompt"))
    kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in _field(record, "kwargs")]
    gt = {"instruction_id_list": list(_field(record, "instruction_id_list")), "kwargs": kwargs, "prompt": prompt}
    return parse_row({"id": f"ifeval-{record.get('key', index)}", "domain": "instruction", "prompt": prompt,
                      "ground_truth": gt})


CONVERTERS: dict[str, Callable[[dict, int], PromptRow]] = {
    "deepscaler": from_deepscaler,
    "eurus2-code": from_eurus2_code,
    "apps": from_apps,
    "taco": from_apps,
    "scp116k": from_scp116k,
    "reasoning-gym": from_reasoning_gym,
    "ifeval": from_ifeval,
}


def generate_reasoning_gym(specs: dict[str, int], seed: int) -> Iterator[dict]:
    """Generate logic puzzles locally with reasoning-gym (procedural: nothing is downloaded)."""
    import reasoning_gym

    for offset, (name, count) in enumerate(sorted(specs.items())):
        for entry in reasoning_gym.create_dataset(name, size=count, seed=seed + offset):
            yield json.loads(json.dumps(entry, default=str))


def addition_rows(count: int, seed: int, digits: int = 3) -> list[PromptRow]:
    """The embedded demo's task: ``abc+def=``, answered with the sum (math domain)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
        rows.append(parse_row({"id": f"add-{seed}-{i}", "domain": "math", "prompt": f"{a}+{b}=",
                               "ground_truth": {"answer": str(a + b)}}))
    return rows
