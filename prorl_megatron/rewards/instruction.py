"""Instruction following: IFEval's constraint checkers (the ``if-verifiable`` package)."""

from __future__ import annotations

import re
from typing import Any

from prorl_megatron.rewards.text import Score, VerifyContext


def ifeval_registry() -> dict[str, Any]:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def score_instruction(final: str, ground_truth: dict, ctx: VerifyContext = VerifyContext()) -> Score:
    """1 when every constraint holds (IFEval "strict"); ``info`` has the per-constraint results.

    ``ground_truth``: ``{"instruction_id_list": [...], "kwargs": [{...}, ...], "prompt": str}``.
    """
    from if_verifiable.common import evaluate_instructions

    ids = list(ground_truth["instruction_id_list"])
    registry = ifeval_registry()
    unknown = [i for i in ids if i not in registry]
    if unknown:  # if-verifiable would silently skip them
        return Score.zero(f"unknown instruction ids {unknown}")
    if not final.strip():
        return Score.zero("empty answer")
    try:
        results, scores = evaluate_instructions(final, ids, list(ground_truth.get("kwargs") or []),
                                                ground_truth.get("prompt", ""), registry)
    except LookupError as e:  # an NLTK resource that was not installed at set-up
        found = re.search(r"Resource \x1b?\[?\S*?(\w[\w/.]*)\S* not found", str(e))
        return Score.zero(f"checker needs NLTK data that is not installed: {found.group(1) if found else e}")
    passed = {r.instruction_id: r.strict_pass for r in results}
    return Score(float(scores.binary_strict), {"passed": passed, "partial": scores.partial_strict})
