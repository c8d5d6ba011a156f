"""Rendering prompts with the tokenizer's own chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prorl_megatron.data.schema import PromptRow


def messages(row: PromptRow) -> list[dict[str, str]]:
    """The row's prompt as chat messages (a plain string is one user message)."""
    return [{"role": "user", "content": row.prompt}] if isinstance(row.prompt, str) else list(row.prompt)


def render(row: PromptRow, tokenizer: Any, apply_chat_template: bool = True) -> tuple[str, bool]:
    """The prompt text for generation, and whether it already opened a ``<think>`` block.

    With ``apply_chat_template`` the tokenizer's template is applied with the generation
    prompt appended (DeepSeek-R1-Distill's ends with ``<think>\\n``); otherwise a string
    prompt is used as it is.
    """
    if not apply_chat_template:
        if not isinstance(row.prompt, str):
            raise ValueError(f"{row.source}: chat messages need data.apply_chat_template=true")
        return row.prompt, False
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; set data.apply_chat_template=false for raw prompts")
    text = tokenizer.apply_chat_template(messages(row), tokenize=False, add_generation_prompt=True)
    return text, text.rstrip().endswith("<think>")


@dataclass
class EncodedPrompt:
    """A row ready for generation: its token ids and whether the template opened ``<think>``."""

    row: PromptRow
    ids: list[int]
    opened_think: bool


def encode(row: PromptRow, tokenizer: Any, apply_chat_template: bool = True) -> EncodedPrompt:
    """Render and tokenize ``row``; a template's own special tokens are not added twice."""
    text, opened = render(row, tokenizer, apply_chat_template)
    ids = tokenizer.encode(text, add_special_tokens=not apply_chat_template)
    return EncodedPrompt(row, list(ids), opened)
