"""Math benchmarks: AIME 2024, AIME 2025, AMC, MATH-500, Minerva, OlympiadBench (verifier: math-verify).

One loader reads every published layout of these files (a record's problem and its final answer):

- AIME 2024, ``HuggingFaceH4/aime_2024`` (parquet): ``problem``, ``answer`` (also ``id``, ``solution``,
  ``url``, ``year``); AIME 2025, ``opencompass/AIME2025`` (jsonl: ``question``, ``answer``) or
  ``yentinglin/aime_2025`` / ``math-ai/aime25`` (parquet: ``problem``, ``answer``);
- AMC (AMC 2022 + 2023, 83 problems), ``AI-MO/aimo-validation-amc`` (parquet): ``problem``, ``answer``
  (a float, e.g. ``142.0``, read as ``142``);
- MATH-500, ``HuggingFaceH4/MATH-500`` (``test.jsonl``): ``problem``, ``answer`` (LaTeX), ``solution``,
  ``subject``, ``level``, ``unique_id``;
- Minerva (272 problems), ``math-ai/minervamath`` (parquet: ``question``, ``answer``) or Qwen2.5-Math's
  ``evaluation/data/minerva_math/test.jsonl`` (``problem``, ``solution``: the answer is its last
  ``\\boxed{}``);
- OlympiadBench (the 675 English, text-only, open-ended math problems, ``OE_TO_maths_en_COMP``),
  ``Hothan/OlympiadBench`` or Qwen2.5-Math's ``olympiadbench/test.jsonl``: ``question``,
  ``final_answer`` (a list of LaTeX answers, e.g. ``["$\\frac{1}{2}$"]``; several are joined with
  commas, each without its ``$``).

The problem is the first of ``problem``, ``question``, ``Problem``; the answer the first of
``answer``, ``final_answer``, ``Answer``, else the last ``\\boxed{}`` of ``solution``.
"""

from __future__ import annotations

from typing import Any

from prorl_megatron.benchmarks.records import LoadOptions, first_field
from prorl_megatron.data.schema import BadRow, PromptRow, parse_row
from prorl_megatron.rewards.text import last_boxed

# DeepSeek-R1's model card ("Usage Recommendations"): "For mathematical problems, it is advisable to include a
# directive in your prompt such as: 'Please reason step by step, and put your final answer within \boxed{}.'"
# ProRL's base model is DeepSeek-R1-Distill-Qwen-1.5B; the paper does not print its evaluation prompts
# (recalled: it follows the base model's recommendations).
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROBLEM_FIELDS = ("problem", "question", "Problem")
ANSWER_FIELDS = ("answer", "final_answer", "Answer")


def answer_text(value: Any) -> str:
    """A published final answer as text: ``142.0`` -> ``142``; a list of LaTeX answers -> ``"a, b"``."""
    if isinstance(value, bool):
        raise BadRow("answer", f"a number or text is required, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        parts = [answer_text(v).strip().strip("$").strip() for v in value]
        return ", ".join(p for p in parts if p)
    return str(value).strip()


def convert_math(record: dict, index: int, options: LoadOptions) -> PromptRow:
    problem = str(first_field(record, *PROBLEM_FIELDS)).strip()
    try:
        answer = answer_text(first_field(record, *ANSWER_FIELDS))
    except BadRow:
        solution = record.get("solution")
        boxed = last_boxed(str(solution)) if solution else None
        if not boxed:
            raise BadRow("/".join(ANSWER_FIELDS), "no answer field, and no \\boxed{} answer in 'solution'") from None
        answer = boxed.strip()
    prompt = f"{problem}\n\n{MATH_INSTRUCTION}" if options.instructions else problem
    return parse_row({"domain": "math", "prompt": prompt, "ground_truth": {"answer": answer}})
