"""Logic puzzles from reasoning-gym, scored by the puzzle's own ``score_answer``."""

from __future__ import annotations

from prorl_megatron.rewards.text import Score, VerifyContext, last_answer_tag, last_boxed


def extract_logic_answer(final: str) -> str:
    """The last ``<answer>...</answer>``, else the last ``\\boxed{}``, else the stripped text."""
    for candidate in (last_answer_tag(final), last_boxed(final)):
        if candidate is not None:
            return candidate.strip()
    return final.strip()


def score_logic(final: str, ground_truth: dict, ctx: VerifyContext = VerifyContext()) -> Score:
    """``ground_truth``: ``{"dataset": reasoning-gym name, "entry": {question, answer, metadata}}``.

    Reward 1 only for a full score (reasoning-gym gives partial credit for some puzzles; it is
    reported as ``info["score"]``).
    """
    import reasoning_gym

    score_fn = reasoning_gym.get_score_answer_fn(ground_truth["dataset"])
    answer = extract_logic_answer(final)
    value = float(score_fn(answer, ground_truth["entry"]))
    return Score(1.0 if value >= 1.0 else 0.0, {"score": value, "extracted": answer[:200]})
