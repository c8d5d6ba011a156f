"""Each domain's verifier on right, wrong and tricky answers."""

import pytest

from prorl_megatron.rewards.instruction import score_instruction
from prorl_megatron.rewards.logic import score_logic
from prorl_megatron.rewards.math import score_math
from prorl_megatron.rewards.stem import extract_choice, score_stem
from prorl_megatron.rewards.text import final_answer, last_boxed


@pytest.mark.parametrize("response,answer", [
    ("so the answer is \\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{2}{4}}", "0.5"),
    ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    ("we get $x = \\boxed{\\sqrt{2}/2}$", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{12}", "12"),
    ("The final answer is 12.", "12"),
    ("\\boxed{(1, 3]}", "(1,3]"),
    ("\\boxed{50\\%}", "0.5"),
])
def test_math_accepts_equivalent_answers(response, answer):
    assert score_math(response, {"answer": answer}).reward == 1.0


@pytest.mark.parametrize("response,answer", [
    ("\\boxed{3.0001}", "3"),  # wrong but close
    ("\\boxed{0.49}", "\\frac{1}{2}"),
    ("\\boxed{12} ... on reflection \\boxed{13}", "12"),  # the last box counts
    ("no number here", "7"),
    ("\\boxed{-2}", "2"),
])
def test_math_rejects_wrong_answers(response, answer):
    assert score_math(response, {"answer": answer}).reward == 0.0


def test_think_block_handling():
    assert final_answer("<think>\\boxed{1}</think> \\boxed{2}") == " \\boxed{2}"
    assert final_answer("<think>still thinking \\boxed{2}") is None
    assert final_answer("plain \\boxed{2}") == "plain \\boxed{2}"
    assert final_answer("no close tag \\boxed{2}", prompt_opened_think=True) is None
    assert final_answer("done</think>\\boxed{2}", prompt_opened_think=True) == "\\boxed{2}"
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{x^{2}}") == "x^{2}"


@pytest.mark.parametrize("text,letter", [
    ("The answer is (C).", "C"), ("\\boxed{B}", "B"), ("Answer: D", "D"), ("<answer>A</answer>", "A"),
    ("I pick (B) because ...\nFinal: (A)", "A"), ("so it must be C", "C"), ("nothing", None),
])
def test_stem_choice_extraction(text, letter):
    assert extract_choice(text, 4) == letter


def test_stem_scores_letters_and_numbers():
    mc = {"answer": "C", "choices": ["1 m", "2 m", "3 m", "4 m"]}
    assert score_stem("the answer is (C)", mc).reward == 1.0
    assert score_stem("the answer is (B)", mc).reward == 0.0
    assert score_stem("\\boxed{E}", mc).info["reason"] == "no choice letter found"
    assert score_stem("g = \\boxed{9.80}", {"answer": "9.8"}).reward == 1.0
    assert score_stem("g = \\boxed{9.81}", {"answer": "9.8"}).reward == 0.0


def test_logic_uses_reasoning_gym_scoring():
    import reasoning_gym

    for name in ("basic_arithmetic", "word_sorting", "spell_backward", "letter_counting"):
        data = reasoning_gym.create_dataset(name, size=2, seed=3)
        entry = data[0]
        truth = {"dataset": name, "entry": entry}
        assert score_logic(f"thinking... <answer>{entry['answer']}</answer>", truth).reward == 1.0, name
        assert score_logic("<answer>certainly not this</answer>", truth).reward == 0.0, name


def test_instruction_following_all_constraints_must_hold():
    truth = {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase",
                                     "length_constraints:number_words"],
             "kwargs": [{}, {}, {"relation": "less than", "num_words": 12}]}
    good = score_instruction("all lowercase and no commas here", truth)
    assert good.reward == 1.0 and all(good.info["passed"].values())
    bad = score_instruction("Has, A Comma", truth)
    assert bad.reward == 0.0 and bad.info["passed"]["punctuation:no_comma"] is False
    assert score_instruction("x", {"instruction_id_list": ["made:up"], "kwargs": [{}]}).info["reason"] \
        .startswith("unknown instruction ids")
