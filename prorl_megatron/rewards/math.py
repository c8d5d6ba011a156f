"""Math answers, checked with math-verify (Hugging Face): extraction + symbolic equivalence."""

from __future__ import annotations

import functools
import threading
from typing import Any

from prorl_megatron.rewards.text import Score, VerifyContext, last_boxed


def _timeout(seconds: float) -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may use
    return max(1, int(round(seconds))) if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)  # a GRPO group's n samples share one ground truth
def parse_gold(answer: str) -> Any:
    from math_verify import parse

    text = answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
    return parse(text)


def score_math(final: str, ground_truth: dict, ctx: VerifyContext = VerifyContext()) -> Score:
    """1 when the final answer (the last ``\\boxed{}``, else the last expression) equals ``answer``.

    ``ground_truth``: ``{"answer": str}`` (LaTeX or plain). Equivalence is math-verify's:
    fractions vs decimals, LaTeX forms, sets and intervals; no rounding beyond 6 decimals.
    """
    from math_verify import parse, verify

    gold = list(parse_gold(str(ground_truth["answer"])))
    if not gold:
        return Score.zero("unparseable ground truth", answer=ground_truth["answer"])
    boxed = last_boxed(final)
    pred = parse(f"\\boxed{{{boxed}}}" if boxed is not None else final, parsing_timeout=_timeout(ctx.timeout_s))
    if not pred:
        return Score.zero("no answer found")
    ok = verify(gold, pred, timeout_seconds=_timeout(ctx.timeout_s))
    return Score(1.0 if ok else 0.0, {"extracted": str(pred[-1]) if pred else None})
