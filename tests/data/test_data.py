"""Prompt data: loading, validation errors, the mixture and its resumable position, chat templates,
and the source converters of tools/prepare_data.py end to end (through the verifiers)."""

import json
import sys
from pathlib import Path

import pytest

from prorl_megatron.data.chat import render
from prorl_megatron.data.dataset import DataError, PromptMixture, load_rows
from prorl_megatron.data.schema import PromptRow
from prorl_megatron.rewards.pool import PoolSettings, RewardPool, ScoreRequest
from prorl_megatron.rewards.sandbox import Limits
from tests import procs

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "tests" / "data" / "sources"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def math_row(i, **over):
    row = {"id": f"m{i}", "domain": "math", "prompt": f"{i}+1=", "ground_truth": json.dumps({"answer": str(i + 1)})}
    row.update(over)
    return row


def test_load_validates_and_decodes(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [math_row(i) for i in range(3)])
    report = load_rows([str(path)])
    assert [r.ground_truth for r in report.rows] == [{"answer": "1"}, {"answer": "2"}, {"answer": "3"}]
    assert report.rows[2].source.endswith("a.jsonl: row 3")


@pytest.mark.parametrize("bad,field", [
    ({"domain": "poetry"}, "domain"),
    ({"prompt": ""}, "prompt"),
    ({"ground_truth": "{not json"}, "ground_truth"),
    ({"ground_truth": json.dumps({"answr": 1})}, "ground_truth.answer"),
    ({"domain": "code", "ground_truth": json.dumps({"style": "stdio", "tests": []})}, "ground_truth.tests"),
    ({"domain": "code", "ground_truth": json.dumps({"style": "function", "tests": [{"input": [1], "output": 1}]})},
     "ground_truth.fn_name"),
    ({"domain": "stem", "ground_truth": json.dumps({"answer": "E", "choices": ["a", "b"]})}, "ground_truth.answer"),
    ({"domain": "logic", "ground_truth": json.dumps({"dataset": "no_such_puzzle", "entry": {}})},
     "ground_truth.dataset"),
    ({"domain": "instruction", "ground_truth": json.dumps({"instruction_id_list": ["made:up"], "kwargs": [{}]})},
     "ground_truth.instruction_id_list"),
])
def test_bad_row_names_file_row_and_field(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [math_row(0), math_row(1, **bad)])
    with pytest.raises(DataError) as e:
        load_rows([str(path)])
    assert f"bad.jsonl: row 2: field {field!r}" in str(e.value)


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path, caplog):
    path = write_jsonl(tmp_path / "mixed.jsonl", [math_row(0), math_row(1, domain="poetry"), math_row(2)])
    report = load_rows([str(path)], on_bad_row="skip")
    assert [r.id for r in report.rows] == ["m0", "m2"]
    assert len(report.skipped) == 1 and "row 2: field 'domain'" in report.skipped[0]
    assert "skipped 1 bad rows of 3" in caplog.text


def test_broken_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(math_row(0)) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_rows([str(broken)])
    with pytest.raises(DataError, match="data file not found"):
        load_rows([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_rows([str(tmp_path / "x.csv")])


def test_parquet_files_load_like_jsonl(tmp_path):
    import datasets

    rows = [math_row(i) for i in range(4)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    assert [r.id for r in load_rows([str(tmp_path / "a.parquet")]).rows] == ["m0", "m1", "m2", "m3"]


def mixture_rows():
    rows = [PromptRow("math", f"m{i}", {"answer": "1"}, id=f"m{i}") for i in range(30)]
    rows += [PromptRow("stem", f"s{i}", {"answer": "1"}, id=f"s{i}") for i in range(10)]
    return rows


def test_mixture_is_deterministic_weighted_and_covers_each_epoch():
    a = PromptMixture(mixture_rows(), {"math": 1.0, "stem": 3.0}, seed=5)
    b = PromptMixture(mixture_rows(), {"math": 1.0, "stem": 3.0}, seed=5)
    first = [r.id for r in a.next(400)]
    assert first == [r.id for r in b.next(400)]
    stems = sum(i.startswith("s") for i in first)
    assert 260 < stems < 340  # about 3/4
    natural = PromptMixture(mixture_rows(), seed=1)
    drawn = [r.id for r in natural.next(4000)]
    assert 0.7 < sum(i.startswith("m") for i in drawn) / 4000 < 0.8  # 30 of 40 rows are math
    only_math = PromptMixture(mixture_rows(), {"math": 1.0}, seed=2)
    assert sorted(r.id for r in only_math.next(30)) == sorted(f"m{i}" for i in range(30))  # one full epoch
    with pytest.raises(DataError, match=r"gives weight to \['code'\], which have no rows"):
        PromptMixture(mixture_rows(), {"code": 1.0})


def test_mixture_resumes_exactly():
    straight = PromptMixture(mixture_rows(), {"math": 1.0, "stem": 1.0}, seed=9)
    expected = [r.id for r in straight.next(100)]
    first = PromptMixture(mixture_rows(), {"math": 1.0, "stem": 1.0}, seed=9)
    got = [r.id for r in first.next(37)]
    state = json.loads(json.dumps(first.state_dict()))  # it travels as JSON in checkpoints
    resumed = PromptMixture(mixture_rows(), {"math": 1.0, "stem": 1.0}, seed=9)
    resumed.load_state_dict(state)
    got += [r.id for r in resumed.next(63)]
    assert got == expected
    with pytest.raises(DataError, match="data position is for another dataset"):
        PromptMixture(mixture_rows()[:20], seed=9).load_state_dict(state)


def test_chat_template_comes_from_the_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                  chat_template=template)
    row = PromptRow("math", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}], {})
    text, opened = render(row, tok)
    assert text == "<|system|>be brief\n<|user|>1+1?\n<|assistant|><think>\n" and opened
    assert render(PromptRow("math", "2+2?", {}), tok)[0] == "<|user|>2+2?\n<|assistant|><think>\n"
    assert render(PromptRow("math", "2+2?", {}), tok, apply_chat_template=False) == ("2+2?", False)


CORRECT = {  # source file -> a correct response for each converted row
    "deepscaler": ["\\boxed{5/6}", "there are \\boxed{6}"],
    "eurus2_code": ["```python\na, b = map(int, input().split())\nprint(a + b)\n```",
                    "```python\ndef square(n):\n    return n * n\n```"],
    "apps": ["```python\nprint(input().strip()[::-1])\n```"],
    "taco": ["```python\ndef biggest(xs):\n    return max(xs)\n```"],
    "scp116k": ["d = \\boxed{19.6} m", "The answer is (B)."],
    "ifeval": ["the sea is wide and blue\nit sings all night", "a small soft cat naps in the sun"],
    "reasoning_gym": None,  # answers come from the generated entries
}
SOURCE_NAMES = {"deepscaler": "deepscaler", "eurus2_code": "eurus2-code", "apps": "apps", "taco": "taco",
                "scp116k": "scp116k", "ifeval": "ifeval", "reasoning_gym": "reasoning-gym"}


def test_prepare_data_converts_every_source_and_the_verifiers_accept_right_answers(tmp_path):
    rows, responses = [], []
    for stem, source in SOURCE_NAMES.items():
        out = tmp_path / f"{stem}.jsonl"
        res = procs.run([sys.executable, str(ROOT / "tools" / "prepare_data.py"), "convert", source,
                         "--input", str(SOURCES / f"{stem}.jsonl"), "--out", str(out)], timeout=300)
        assert res.returncode == 0, res.stderr
        converted = load_rows([str(out)]).rows
        rows += converted
        answers = CORRECT[stem] or [f"<answer>{r.ground_truth['entry']['answer']}</answer>" for r in converted]
        assert len(answers) == len(converted), stem
        responses += answers
    domains = {r.domain for r in rows}
    assert domains == {"math", "code", "stem", "logic", "instruction"}
    settings = PoolSettings(timeout_s=10.0, limits=Limits(cpu_s=2, wall_s=3))
    with RewardPool(2, settings) as pool:
        good = pool.score([ScoreRequest(r.domain, a, r.ground_truth) for r, a in zip(rows, responses)])
        wrong = pool.score([ScoreRequest(r.domain, "I do not know, (Z), \\boxed{-999}", r.ground_truth) for r in rows])
    assert [(r.id, s.reward) for r, s in zip(rows, good)] == [(r.id, 1.0) for r in rows]
    assert all(s.reward == 0.0 for s in wrong)


def test_prepare_data_reports_bad_source_records(tmp_path):
    bad = write_jsonl(tmp_path / "ds.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "no answer"}])
    cmd = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "convert", "deepscaler", "--input", str(bad)]
    res = procs.run(cmd + ["--out", str(tmp_path / "o.jsonl")], timeout=300)
    assert res.returncode == 2 and "ds.jsonl: row 2: field 'answer': missing in the source record" in res.stderr
    assert not (tmp_path / "o.jsonl").exists()
    res = procs.run(cmd + ["--out", str(tmp_path / "o.jsonl"), "--on-bad-row", "skip"], timeout=300)
    assert res.returncode == 0 and "1 skipped" in res.stdout
    assert len(load_rows([str(tmp_path / "o.jsonl")]).rows) == 1


@pytest.mark.parametrize("name, digits, count, seed", [
    ("addition_train", 3, 4000, 1), ("addition_val", 3, 256, 2), ("add4_train", 4, 4000, 201), ("add4_val", 4, 256, 202)])
def test_shipped_tiny_task_data_is_what_prepare_data_writes(tmp_path, name, digits, count, seed):
    out = tmp_path / f"{name}.jsonl"
    res = procs.run([sys.executable, str(ROOT / "tools" / "prepare_data.py"), "addition", "--digits", str(digits),
                     "--count", str(count), "--seed", str(seed), "--out", str(out)], timeout=300)
    assert res.returncode == 0, res.stderr
    shipped = ROOT / "data" / "tiny" / out.name
    assert shipped.read_bytes() == out.read_bytes()
    for row in load_rows([str(shipped)]).rows[:50]:
        a, b = row.prompt.rstrip("=").split("+")
        assert row.domain == "math" and row.ground_truth["answer"] == str(int(a) + int(b))


def test_prepare_data_generates_reasoning_gym_puzzles(tmp_path):
    out = tmp_path / "logic.parquet"
    res = procs.run([sys.executable, str(ROOT / "tools" / "prepare_data.py"), "reasoning-gym",
                     "--datasets", "basic_arithmetic:3,word_sorting:2", "--seed", "4", "--out", str(out)], timeout=300)
    assert res.returncode == 0, res.stderr
    rows = load_rows([str(out)]).rows
    assert sorted(r.ground_truth["dataset"] for r in rows) == ["basic_arithmetic"] * 3 + ["word_sorting"] * 2
