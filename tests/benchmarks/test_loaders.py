"""Each benchmark loader on a small file in the benchmark's published format: rows, fields read, prompts,
malformed records (file, row and field; or skipped and counted), and the verifiers on its ground truth."""

import base64
import csv
import json
import pickle
import random
import zlib
from pathlib import Path

import pytest

from prorl_megatron import benchmarks
from prorl_megatron.benchmarks.code import missing_test_modules
from prorl_megatron.benchmarks.math import MATH_INSTRUCTION
from prorl_megatron.benchmarks.records import LoadOptions
from prorl_megatron.data.dataset import DataError
from prorl_megatron.data.schema import PromptRow
from prorl_megatron.rewards.pool import PoolSettings, RewardPool, ScoreRequest
from prorl_megatron.rewards.sandbox import Limits

ROOT = Path(__file__).resolve().parents[2]


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def parquet(path: Path, records) -> Path:
    import datasets

    datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


def gpqa_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                         "Incorrect Answer 3", "Subdomain"])
        writer.writerows(rows)
    return path


def lcb_private(tests) -> str:
    """LiveCodeBench lite's encoding of private tests: base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def lcb(question, public, private=None, starter="", func=None):
    return {"question_title": "t", "question_content": question, "platform": "leetcode" if func else "atcoder",
            "question_id": "q", "contest_id": "c", "contest_date": "2024-09-01T00:00:00", "starter_code": starter,
            "difficulty": "easy", "public_test_cases": json.dumps(public),
            "private_test_cases": lcb_private(private) if private is not None else "[]",
            "metadata": json.dumps({"func_name": func} if func else {})}


HUMANEVAL_TEST = ("\n\nMETADATA = {}\n\ndef check(candidate):\n    inputs = [[[1, 2, 3]], [[]]]\n"
                  "    results = [6, 0]\n    for inp, exp in zip(inputs, results):\n"
                  "        assert candidate(*inp) == exp\n")


def write_published(tmp: Path) -> dict[str, Path]:
    """One small file per benchmark family, in its published format: the first records are good."""
    files = {
        "aime24": parquet(tmp / "aime24.parquet", [
            {"id": 60, "problem": "Find $x$ if $2x = 8$.", "solution": "So $x = \\boxed{4}$.", "answer": "4",
             "url": "https://artofproblemsolving.com/x", "year": "2024"},
            {"id": 61, "problem": "Compute $2^{10}$.", "solution": "It is 1024.", "answer": "1024", "url": "u",
             "year": "2024"}]),
        "aime25": jsonl(tmp / "aime25.jsonl", [{"question": "What is $3 \\cdot 7$?", "answer": "21"}]),
        "amc": jsonl(tmp / "amc.jsonl", [{"id": 0, "problem": "How many?", "answer": 142.0, "url": "u"},
                                         {"id": 1, "problem": "Half of 3?", "answer": 1.5, "url": "u"}]),
        "math500": jsonl(tmp / "math500.jsonl", [
            {"problem": "Simplify $\\frac{2}{4}$.", "solution": "...", "answer": "\\frac{1}{2}", "subject": "Algebra",
             "level": 1, "unique_id": "test/algebra/1.json"}]),
        "minerva": jsonl(tmp / "minerva.jsonl", [{"problem": "g in m/s^2?", "solution": "It is $\\boxed{9.8}$.",
                                                  "type": "Physics", "idx": 0}]),
        "olympiadbench": tmp / "olympiadbench.json",
        "humanevalplus": jsonl(tmp / "humanevalplus.jsonl", [
            {"task_id": "HumanEval/0", "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
             "    \"\"\" The sum of xs.\n    >>> total([1, 2])\n    3\n    \"\"\"\n", "entry_point": "total",
             "canonical_solution": "    return sum(xs)\n", "test": HUMANEVAL_TEST}]),
        "mbppplus": jsonl(tmp / "mbppplus.jsonl", [
            {"task_id": 2, "code": "def similar(a, b):\n    return set(a) & set(b)", "prompt":
             "Write a function to find the shared elements from the given two lists.", "source_file": "x",
             "test_imports": ["import math"], "test_list": ["assert set(similar([1, 2], [2, 3])) == {2}"],
             "test": "inputs = [[[1, 2], [2, 3]]]\nresults = [{2}]\nfor inp, exp in zip(inputs, results):\n"
                     "    assert set(similar(*inp)) == exp\n"}]),
        "apps": jsonl(tmp / "apps.jsonl", [
            {"problem_id": 4001, "question": "Print n reversed.", "starter_code": "",
             "input_output": json.dumps({"inputs": ["123\n"], "outputs": ["321\n"]})}]),
        "codecontests": parquet(tmp / "codecontests.parquet", [
            {"name": "A", "description": "Print a+b.", "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
             "private_tests": {"input": ["5 5\n"], "output": ["10\n"]},
             "generated_tests": {"input": ["0 0\n"], "output": ["0\n"]}}]),
        "livecodebench": jsonl(tmp / "livecodebench.jsonl", [
            lcb("Read n, print 2n.", [{"input": "2\n", "output": "4\n", "testtype": "stdin"}],
                private=[{"input": "5\n", "output": "10\n", "testtype": "stdin"}]),
            lcb("Return a+b.", [{"input": "1\n2", "output": "3", "testtype": "functional"}],
                private=[{"input": "[1]\n[2]", "output": "[1, 2]", "testtype": "functional"}],
                starter="class Solution:\n    def add(self, a, b):\n        ", func="add")]),
        "gpqa_diamond": gpqa_csv(tmp / "gpqa_diamond.csv", [
            ["rec1", "Which is a noble gas?", "Neon", "Iron", "Carbon", "Sodium", "Chemistry"],
            ["rec2", "Unit of force, with a comma, here?", "Newton", "Joule", "Watt", "Pascal", "Physics"]]),
        "ifeval": jsonl(tmp / "ifeval.jsonl", [
            {"key": 1000, "prompt": "Describe a cat, all lowercase, no commas.",
             "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
             "kwargs": [{"num_words": None, "relation": None}, {}]}]),
        "reasoning_gym": tmp / "reasoning_gym.yaml",
    }
    files["olympiadbench"].write_text(json.dumps([
        {"id": 1606, "question": "Find the two roots.", "final_answer": ["$1$", "$2$"], "is_multiple_answer": True},
        {"id": 1607, "question": "Half?", "final_answer": ["$\\frac{1}{2}$"], "is_multiple_answer": False}], indent=1))
    files["reasoning_gym"].write_text("seed: 3\ndatasets:\n  basic_arithmetic: 2\n  spell_backward: 1\n")
    return files


def load(name: str, path: Path, on_bad_row: str = "error", **options) -> benchmarks.Loaded:
    return benchmarks.load(benchmarks.get(name), path, LoadOptions(**options), on_bad_row)


def test_math_loaders_read_every_published_layout(tmp_path):
    files = write_published(tmp_path)
    answers = {name: [r.ground_truth["answer"] for r in load(name, files[name]).rows]
               for name in ("aime24", "aime25", "amc", "math500", "minerva", "olympiadbench")}
    assert answers == {"aime24": ["4", "1024"], "aime25": ["21"], "amc": ["142", "1.5"], "math500": ["\\frac{1}{2}"],
                       "minerva": ["9.8"], "olympiadbench": ["1, 2", "\\frac{1}{2}"]}
    aime = load("aime24", files["aime24"])
    assert aime.fields == ["problem", "answer"]  # what the loader read (not id, url, year, solution)
    assert aime.rows[0].prompt == f"Find $x$ if $2x = 8$.\n\n{MATH_INSTRUCTION}" and aime.rows[0].domain == "math"
    assert [r.id for r in aime.rows] == ["aime24/1", "aime24/2"]
    assert aime.rows[1].source.endswith("aime24.parquet: row 2")
    assert load("aime25", files["aime25"]).fields == ["question", "answer"]
    assert load("minerva", files["minerva"]).fields == ["problem", "solution"]
    assert load("aime24", files["aime24"], instructions=False).rows[1].prompt == "Compute $2^{10}$."


def test_code_loaders_build_each_test_style(tmp_path):
    files = write_published(tmp_path)
    he = load("humanevalplus", files["humanevalplus"]).rows[0]
    assert he.ground_truth["style"] == "assert" and he.ground_truth["test"].endswith("check(total)")
    assert he.ground_truth["prelude"] == "from typing import List"
    assert he.prompt.startswith("Please provide a self-contained Python script") and "def total(xs" in he.prompt
    mbpp = load("mbppplus", files["mbppplus"]).rows[0]
    assert "assert set(similar([1, 2], [2, 3])) == {2}" in mbpp.prompt  # the first test names the function
    assert mbpp.ground_truth["test"].startswith("import math\n")
    stdin, functional = load("livecodebench", files["livecodebench"]).rows
    assert stdin.ground_truth == {"style": "stdio", "tests": [{"input": "2\n", "output": "4\n"},
                                                              {"input": "5\n", "output": "10\n"}]}
    assert functional.ground_truth == {"style": "function", "fn_name": "Solution.add", "tests": [
        {"input": [1, 2], "output": 3}, {"input": [[1], [2]], "output": [1, 2]}]}
    assert stdin.prompt.startswith("### Question:\nRead n, print 2n.") and "### Format: Read the inputs" in stdin.prompt
    assert "class Solution:" in functional.prompt
    contests = load("codecontests", files["codecontests"]).rows[0]
    assert [t["output"] for t in contests.ground_truth["tests"]] == ["3\n", "10\n", "0\n"]
    apps = load("apps", files["apps"], instructions=False).rows[0]
    assert apps.prompt == "Print n reversed." and apps.ground_truth["style"] == "stdio"


def test_gpqa_shuffles_the_answers_as_simple_evals_does(tmp_path):
    files = write_published(tmp_path)
    rows = load("gpqa_diamond", files["gpqa_diamond"]).rows
    rng = random.Random(0)  # simple-evals: one rng.sample(range(4), 4) per record, in file order
    for row, correct in zip(rows, ["Neon", "Newton"]):
        perm = rng.sample(range(4), 4)
        assert row.ground_truth["choices"][perm.index(0)] == correct
        assert row.ground_truth["answer"] == "ABCD"[perm.index(0)]
        assert f"{row.ground_truth['answer']}) {correct}" in row.prompt and "'Answer: $LETTER'" in row.prompt
    reseeded = load("gpqa_diamond", files["gpqa_diamond"], choice_seed=5).rows
    assert [r.ground_truth["choices"] for r in reseeded] != [r.ground_truth["choices"] for r in rows]
    assert rows[1].prompt.count("Unit of force, with a comma, here?") == 1  # a quoted CSV field read whole


def test_logic_is_generated_from_a_seeded_spec_or_read_as_entries(tmp_path):
    files = write_published(tmp_path)
    first, again = load("reasoning_gym", files["reasoning_gym"]), load("reasoning_gym", files["reasoning_gym"])
    assert [r.ground_truth for r in first.rows] == [r.ground_truth for r in again.rows]
    assert [r.ground_truth["dataset"] for r in first.rows] == ["basic_arithmetic"] * 2 + ["spell_backward"]
    entries = jsonl(tmp_path / "rg.jsonl", [r.ground_truth["entry"] for r in first.rows])
    assert [r.ground_truth for r in load("reasoning_gym", entries).rows] == [r.ground_truth for r in first.rows]
    assert load("ifeval", files["ifeval"]).rows[0].ground_truth["kwargs"] == [{}, {}]  # parquet-style nulls dropped


RIGHT = {  # benchmark -> a right response for each row of write_published's file
    "aime24": ["\\boxed{4}", "\\boxed{1024}"], "aime25": ["\\boxed{21}"], "amc": ["\\boxed{142}", "\\boxed{3/2}"],
    "math500": ["\\boxed{0.5}"], "minerva": ["\\boxed{9.80}"], "olympiadbench": ["\\boxed{1, 2}", "\\boxed{0.5}"],
    "humanevalplus": ["```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"],
    "mbppplus": ["```python\ndef similar(a, b):\n    return set(a) & set(b)\n```"],
    "apps": ["```python\nprint(input().strip()[::-1])\n```"],
    "codecontests": ["```python\na, b = map(int, input().split())\nprint(a + b)\n```"],
    "livecodebench": ["```python\nprint(2 * int(input()))\n```",
                      "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```"],
    "gpqa_diamond": None, "ifeval": ["a small cat naps in the sun"], "reasoning_gym": None,
}


def test_the_verifiers_score_the_converted_ground_truth(tmp_path):
    files = write_published(tmp_path)
    rows: list[PromptRow] = []
    right: list[str] = []
    for name, answers in RIGHT.items():
        loaded = load(name, files[name]).rows
        if name == "gpqa_diamond":  # the letter the shuffle gave, in the template's answer format
            answers = [f"Thinking.\nAnswer: ${r.ground_truth['answer']}$" for r in loaded]
        elif name == "reasoning_gym":
            answers = [f"<answer>{r.ground_truth['entry']['answer']}</answer>" for r in loaded]
        assert len(answers) == len(loaded), name
        rows += loaded
        right += answers
    wrong = "```python\nprint(0)\ndef total(xs):\n    return 0\n```\nAnswer: $Z$ \\boxed{-7} <answer>no</answer>"
    exits = "```python\nimport sys\ndef total(xs):\n    return 0\nsys.exit(0)\n```"  # skips the test program
    settings = PoolSettings(timeout_s=10.0, limits=Limits(cpu_s=2, wall_s=3))
    with RewardPool(2, settings) as pool:
        good = pool.score([ScoreRequest(r.domain, a, r.ground_truth) for r, a in zip(rows, right)])
        bad = pool.score([ScoreRequest(r.domain, wrong, r.ground_truth) for r in rows])
        humaneval = next(r for r in rows if r.id == "humanevalplus/1")
        early = pool.score([ScoreRequest("code", exits, humaneval.ground_truth)])
    assert [(r.id, s.reward, s.info.get("reason")) for r, s in zip(rows, good)] == [(r.id, 1.0, None) for r in rows]
    assert [r.id for r, s in zip(rows, bad) if s.reward != 0.0] == []
    assert early[0].reward == 0.0 and early[0].info["reason"] == "test program: it stopped before the tests ran"


MALFORMED = [  # benchmark, file name, the published records (the last one malformed), the field named
    ("aime24", "aime24.parquet", [{"problem": "p", "answer": "1", "solution": "s"},
                                  {"problem": "p", "answer": None, "solution": "no box"}],
     "answer/final_answer/Answer"),
    ("math500", "math500.jsonl", [{"problem": "p", "answer": "1"}, {"answer": "2"}], "problem/question/Problem"),
    ("olympiadbench", "olympiadbench.json", [{"question": "q", "final_answer": ["$1$"]}, "not a record"], "(row)"),
    ("humanevalplus", "humanevalplus.jsonl", [{"prompt": "def f():\n", "test": "assert True", "entry_point": "f"},
                                              {"prompt": "def f():\n", "test": HUMANEVAL_TEST}], "entry_point"),
    ("mbppplus", "mbppplus.jsonl", [{"prompt": "p", "test": "assert True"}, {"prompt": "p"}], "test"),
    ("apps", "apps.jsonl", [{"question": "q", "input_output": json.dumps({"inputs": ["1"], "outputs": ["1"]})},
                            {"question": "q", "input_output": "{broken"}], "input_output"),
    ("codecontests", "codecontests.jsonl", [{"description": "d", "public_tests": {"input": ["1"], "output": ["1"]}},
                                            {"description": "d", "public_tests": {"input": ["1"], "output": []}}],
     "public_tests"),
    ("livecodebench", "livecodebench.jsonl", [lcb("q", [{"input": "1", "output": "1", "testtype": "stdin"}]),
                                              {**lcb("q", [{"input": "1", "output": "1", "testtype": "stdin"}]),
                                               "private_test_cases": "bm90IGEgcGlja2xl"}], "private_test_cases"),
    ("livecodebench", "lcb_pickle.jsonl", [{**lcb("q", [{"input": "1", "output": "1", "testtype": "stdin"}]),
                                            "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(
                                                Path("/x")))).decode()}], "private_test_cases"),
    ("ifeval", "ifeval.jsonl", [{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                                 "kwargs": [{}]}, {"key": 2, "prompt": "p", "kwargs": [{}]}], "instruction_id_list"),
    ("reasoning_gym", "reasoning_gym.jsonl", [{"question": "q", "answer": "a", "metadata": {}}],
     "metadata.source_dataset"),
]


@pytest.mark.parametrize("name,file,records,field", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_a_malformed_record_stops_the_load_with_file_row_and_field(tmp_path, name, file, records, field):
    path = tmp_path / file
    if file.endswith(".parquet"):
        parquet(path, records)
    elif file.endswith(".json"):
        path.write_text(json.dumps(records))
    else:
        jsonl(path, records)
    with pytest.raises(DataError) as e:
        load(name, path)
    assert f"{path}: row {len(records)}: field {field!r}" in str(e.value)
    if len(records) > 1:
        loaded = load(name, path, on_bad_row="skip")
        assert len(loaded.rows) == len(records) - 1 and len(loaded.skipped) == 1
        assert f"row {len(records)}: field {field!r}" in loaded.skipped[0]
    else:
        with pytest.raises(DataError, match="no usable rows"):
            load(name, path, on_bad_row="skip")


def test_malformed_csv_rows_and_specs(tmp_path):
    path = gpqa_csv(tmp_path / "gpqa_diamond.csv", [["r1", "q?", "a", "b", "c", "d", "x"],
                                                    ["r2", "q?", "a", "b", "", "d"],
                                                    ["r3", "q2?", "a", "b", "c", "d", "x"]])
    with pytest.raises(DataError, match=r"gpqa_diamond.csv: row 2: field 'Incorrect Answer 2': missing"):
        load("gpqa_diamond", path)
    skipped = load("gpqa_diamond", path, on_bad_row="skip")
    rng = random.Random(0)
    perms = [rng.sample(range(4), 4) for _ in range(3)]  # the skipped row 2 keeps its draw: row 3's order is as ever
    assert skipped.rows[1].ground_truth["choices"] == [["a", "b", "c", "d"][i] for i in perms[2]]
    spec = tmp_path / "reasoning_gym.yaml"
    for text, field in [("seed: x\ndatasets: {basic_arithmetic: 1}\n", "seed"), ("seed: 1\ndatasets: []\n", "datasets"),
                        ("datasets: {no_such_puzzle: 2}\n", "datasets")]:
        spec.write_text(text)
        with pytest.raises(DataError, match=rf"reasoning_gym.yaml: field '{field}'"):
            load("reasoning_gym", spec)


def test_benchmark_files_are_found_by_name(tmp_path):
    files = write_published(tmp_path)
    found = benchmarks.find_files(tmp_path, {})
    assert [b.name for b, _ in found] == [b.name for b in benchmarks.BENCHMARKS if b.name in files]  # paper order
    assert benchmarks.find_files(None, {"amc": files["amc"]}) == [(benchmarks.get("amc"), files["amc"])]
    with pytest.raises(DataError, match="unknown benchmark 'aime2024'"):
        benchmarks.find_files(tmp_path, {"aime2024": files["amc"]})
    with pytest.raises(DataError, match="benchmark minerva: no file minerva"):
        benchmarks.find_files(tmp_path / "nothing", {}, only=["minerva"])
    jsonl(tmp_path / "amc.json", [])
    with pytest.raises(DataError, match="several files for benchmark amc: amc.json, amc.jsonl"):
        benchmarks.find_files(tmp_path, {})


def test_test_programs_the_sandbox_cannot_import_are_named():
    def row(test):
        return PromptRow("code", "p", {"style": "assert", "test": test})

    assert missing_test_modules([row("import json\nfrom collections import Counter\nassert True")]) == []
    assert missing_test_modules([row("import no_such_module_for_prorl\nassert True"), row("import json")]) == \
        ["no_such_module_for_prorl"]


def test_shipped_tiny_benchmark_files_load():
    found = benchmarks.find_files(ROOT / "data" / "tiny" / "bench", {})
    assert {b.domain for b, _ in found} == set(benchmarks.DOMAIN_ORDER)
    for bench, path in found:
        assert load(bench.name, path, instructions=False).rows
