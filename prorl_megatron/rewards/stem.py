"""STEM answers: multiple-choice letters, or numeric/symbolic answers via math-verify."""

from __future__ import annotations

import re
import string

from prorl_megatron.rewards.math import score_math
from prorl_megatron.rewards.text import Score, VerifyContext, last_answer_tag, last_boxed

_PATTERNS = [
    # "Answer: $C$" / "Answer: **C**": simple-evals' GPQA template asks for 'Answer: $LETTER'
    re.compile(r"answer\s*(?:is|:)?\s*[:(\[$*]*\s*\(?([A-Z])\)?(?![A-Za-z])", re.I),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?:^|\s)([A-Z])[.)]?\s*$"),
]


def extract_choice(final: str, n_choices: int) -> str | None:
    """The chosen letter: from ``\\boxed{}``/``<answer>``, "answer is X", "(X)", or a final "X"."""
    letters = string.ascii_uppercase[:n_choices]
    for candidate in (last_boxed(final), last_answer_tag(final)):
        if candidate is not None:
            candidate = candidate.strip().strip("()").strip()
            if len(candidate) == 1 and candidate.upper() in letters:
                return candidate.upper()
            m = re.match(r"\(?([A-Z])\)?[.:)]?\s", candidate + " ")
            if m and m.group(1) in letters:
                return m.group(1)
    for pattern in _PATTERNS:
        found = [m.upper() for m in pattern.findall(final) if m.upper() in letters]
        if found:
            return found[-1]
    return None


def score_stem(final: str, ground_truth: dict, ctx: VerifyContext = VerifyContext()) -> Score:
    """``ground_truth``: ``{"answer": "C", "choices": [...]}`` (multiple choice) or ``{"answer": "9.8"}``."""
    choices = ground_truth.get("choices")
    if not choices:
        return score_math(final, ground_truth, ctx)
    chosen = extract_choice(final, len(choices))
    if chosen is None:
        return Score.zero("no choice letter found")
    key = str(ground_truth["answer"]).strip().upper()
    return Score(1.0 if chosen == key else 0.0, {"extracted": chosen})
