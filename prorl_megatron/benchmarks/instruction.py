"""Instruction following: IFEval (verifier: IFEval's checkers from if-verifiable, every instruction strict).

The file as published (``google/IFEval``, 541 prompts: ``ifeval_input_data.jsonl`` of
github.com/google-research/google-research ``instruction_following_eval/data``, or the hub's parquet):
``key``, ``prompt``, ``instruction_id_list``, ``kwargs`` (one mapping per instruction; the parquet fills
every mapping with all keys, unused ones null). Converted by the training converter
(:func:`prorl_megatron.data.sources.from_ifeval`): the prompt is IFEval's own, unchanged.
"""

from __future__ import annotations

from prorl_megatron.benchmarks.records import LoadOptions
from prorl_megatron.data import sources
from prorl_megatron.data.schema import PromptRow


def convert_ifeval(record: dict, index: int, options: LoadOptions) -> PromptRow:
    return sources.from_ifeval(record, index)
