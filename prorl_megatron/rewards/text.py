"""What part of a response is scored, and the result type every verifier returns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class VerifyContext:
    """What a verifier may use besides the answer: its time budget and (for code) the sandbox."""

    timeout_s: float = 5.0
    sandbox: Any = None  # prorl_megatron.rewards.sandbox.Sandbox, in workers that score code


@dataclass
class Score:
    """A verifier's verdict: ``reward`` in {0, 1} (binary) and what led to it."""

    reward: float
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def zero(cls, reason: str, **info: Any) -> "Score":
        return cls(0.0, {"reason": reason, **info})


def final_answer(response: str, prompt_opened_think: bool = False) -> Optional[str]:
    """The part of a reasoning model's response after its thinking, or None if unfinished.

    Text after the last ``</think>`` is scored. A response with an unclosed ``<think>`` —
    or, when the chat template already opened the think block in the prompt
    (DeepSeek-R1-Distill's does), with no ``</think>`` at all — is unfinished: None.
    """
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in response or prompt_opened_think:
        return None
    return response


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def last_answer_tag(text: str) -> Optional[str]:
    """Content of the last ``<answer>...</answer>``, or None."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None
