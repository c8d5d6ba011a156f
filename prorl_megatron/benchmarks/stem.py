"""STEM: GPQA-Diamond, multiple choice (verifier: the chosen letter, :func:`prorl_megatron.rewards.stem.score_stem`).

The file as published (``Idavidrein/gpqa``, ``gpqa_diamond.csv``, 198 questions; also in the
password-protected zip of github.com/idavidrein/gpqa): a CSV with a header row whose columns include
``Question``, ``Correct Answer``, ``Incorrect Answer 1``, ``Incorrect Answer 2``, ``Incorrect Answer 3``
(and ``Record ID``, ``Subdomain``, ...). The four answers are put in an order drawn as openai/simple-evals
does (``gpqa_eval.py``): one ``random.Random(seed).sample(range(4), 4)`` per record, in file order, so
a file read with seed 0 gets simple-evals' order; the letter of the correct answer is the ground truth.
"""

from __future__ import annotations

import functools
import random

from prorl_megatron.benchmarks.records import LoadOptions, first_field
from prorl_megatron.data.schema import PromptRow, parse_row

# openai/simple-evals, common.py QUERY_TEMPLATE_MULTICHOICE (the template of its GPQA evaluation)
GPQA_TEMPLATE = ("Answer the following multiple choice question. The last line of your response should be of the "
                 "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by "
                 "step before answering.\n\n{question}\n\n{choices}")
ANSWER_COLUMNS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


@functools.lru_cache(maxsize=8)
def _draws(seed: int) -> tuple[list[list[int]], random.Random]:
    return [], random.Random(seed)


def permutation(seed: int, index: int) -> list[int]:
    """The answer order of record ``index`` (from 0): the ``index``-th ``sample(range(4), 4)`` of
    ``random.Random(seed)``, whatever order the records are converted in."""
    drawn, rng = _draws(seed)
    while len(drawn) <= index:
        drawn.append(rng.sample(range(4), 4))
    return drawn[index]


def convert_gpqa(record: dict, index: int, options: LoadOptions) -> PromptRow:
    question = str(first_field(record, "Question")).strip()
    answers = [str(first_field(record, column)).strip() for column in ANSWER_COLUMNS]
    choices = [answers[i] for i in permutation(options.choice_seed, index)]
    letter = "ABCD"[choices.index(answers[0])]
    listed = "\n".join(f"{letter}) {choice}" for letter, choice in zip("ABCD", choices))
    prompt = GPQA_TEMPLATE.format(question=question, choices=listed) if options.instructions \
        else f"{question}\n\n{listed}"
    return parse_row({"domain": "stem", "prompt": prompt, "ground_truth": {"answer": letter, "choices": choices}})
