"""The protocol's bookkeeping without an engine: ks, labels, settings refusal, a checkpoint's results with
its domain averages, and the paper's table with the change against the base (hand-computed values)."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from prorl_megatron.benchmarks import protocol, report
from prorl_megatron.benchmarks.records import Loaded
from prorl_megatron.config import Recipe
from prorl_megatron.eval import pass_at_k_table


def recipe(n: int = 4) -> Recipe:
    r = Recipe()
    return dataclasses.replace(r, eval=dataclasses.replace(r.eval, benchmark=dataclasses.replace(
        r.eval.benchmark, n_samples=n)))


def test_ks_and_the_recipe_evaluate_reads():
    cfg = Recipe().eval.benchmark
    assert protocol.protocol_ks(cfg) == [1, 2, 4, 8, 16]
    assert protocol.protocol_ks(dataclasses.replace(cfg, n_samples=6)) == [1, 2, 4, 6]
    assert protocol.protocol_ks(dataclasses.replace(cfg, ks=[4, 1, 4])) == [1, 4]
    r = protocol.benchmark_recipe(Recipe(), response_tokens=123)
    assert (r.eval.n_samples, r.eval.ks, r.eval.temperature, r.eval.top_p) == (16, [1, 2, 4, 8, 16], 0.6, 0.95)
    assert r.rollout.max_response_tokens == 123 and r.data.apply_chat_template is True
    assert r.rollout.max_prompt_tokens == Recipe().rollout.max_prompt_tokens  # the rest is the recipe's


def test_labels(tmp_path):
    step = tmp_path / "runs" / "tiny-cpu" / "checkpoints" / "step_00000060"
    hf = tmp_path / "runs" / "tiny-base" / "hf"
    for d in (step, hf):
        d.mkdir(parents=True)
    (step / "prorl_meta.json").write_text(json.dumps({"step": 60}))
    (hf / "config.json").write_text("{}")
    got = protocol.checkpoints_from([str(hf), str(step)])
    assert [c.label for c in got] == ["tiny-base", "tiny-cpu-step60"] and got[1].step() == 60 and got[0].step() is None
    with pytest.raises(protocol.ProtocolError, match="share the labels"):
        protocol.checkpoints_from([str(hf), str(hf)])
    with pytest.raises(protocol.ProtocolError, match="neither a Megatron checkpoint"):
        protocol.checkpoints_from([str(tmp_path)])
    assert [c.label for c in protocol.checkpoints_from([str(hf), str(hf)], ["a", "b"])] == ["a", "b"]


def test_a_result_of_other_settings_is_refused(tmp_path):
    path = tmp_path / "x.json"
    assert not protocol.finished(path, {"n_samples": 4})
    protocol.write_json(path, {"settings": {"n_samples": 4, "top_p": 0.95}})
    assert protocol.finished(path, {"n_samples": 4, "top_p": 0.95})
    with pytest.raises(protocol.ProtocolError, match=r"n_samples: 4 -> 8.*refusing to mix"):
        protocol.finished(path, {"n_samples": 8, "top_p": 0.95})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind


def scored(out: Path, label: str, name: str, domain: str, title: str, correct: list[int], n: int = 4) -> protocol.Plan:
    """A benchmark result as score_checkpoint writes it, from each problem's correct count."""
    rewards = [[1.0] * c + [0.0] * (n - c) for c in correct]
    table = pass_at_k_table([domain] * len(correct), rewards, [1, 2, 4])
    table["response_length"] = 3.0
    table["per_prompt"] = [{"id": f"{name}/{i + 1}", "domain": domain, "n": n, "correct": c}
                           for i, c in enumerate(correct)]
    path = out / label / f"{name}.json"
    protocol.write_json(path, {"title": title, "domain": domain, "fields": ["problem"], "skipped": [],
                               "eval_overrides": [], "table": table})
    return protocol.Plan(Loaded(name, Path(f"{name}.jsonl"), "0", rows=[]), [], 5, 100, {}, path)


def results_of(out: Path, hf: Path, label: str, counts: dict[str, list[int]]) -> dict:
    specs = {"aime24": ("math", "AIME24"), "math500": ("math", "MATH"), "humanevalplus": ("code", "HumanEval+"),
             "gpqa_diamond": ("stem", "GPQA")}
    plans = [scored(out, label, name, *specs[name], c) for name, c in counts.items()]
    results = protocol.checkpoint_results(protocol.Checkpoint(hf, label), plans, recipe())
    return json.loads(json.dumps(results))


def test_checkpoint_results_and_the_paper_table(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    # math500 listed first: the table puts it in the paper's order anyway
    base = results_of(tmp_path, hf, "base", {"math500": [0, 1, 2, 4], "aime24": [0, 0], "gpqa_diamond": [2, 2]})
    trained = results_of(tmp_path, hf, "trained", {"math500": [1, 2, 3, 4], "aime24": [0, 2], "gpqa_diamond": [2, 2],
                                                   "humanevalplus": [4]})
    assert base["benchmarks"]["math500"]["pass@1"] == pytest.approx(7 / 16)
    assert base["domains"]["math"] == {"benchmarks": ["aime24", "math500"], "pass@1": pytest.approx(7 / 32),
                                       "pass@2": pytest.approx((0 + (0 + 0.5 + 5 / 6 + 1) / 4) / 2),
                                       "pass@4": pytest.approx((0 + 0.75) / 2)}
    paths = report.write_report([base, trained], tmp_path / "report")
    text = (tmp_path / "report" / "table.md").read_text()
    assert "| checkpoint | AIME24 | MATH | Math avg | HumanEval+ | GPQA |" in text
    assert "| base | 0.0 | 43.8 | 21.9 | — | 50.0 |" in text
    assert "| trained | 25.0 | 62.5 | 43.8 | 100.0 | 50.0 |" in text
    # math500: every problem +1 of 4 except the last (already 4/4): +3/16 on average, each problem +0.25 or 0
    assert "| MATH | 4 | 43.8 | +18.8 [+6.2, +25.0] |" in text
    assert "| GPQA | 2 | 50.0 | +0.0 [+0.0, +0.0] |" in text  # the same counts: no change, no interval
    assert "| AIME24 | 2 | 0.0 | +25.0 [+0.0, +50.0] |" in text
    assert "| MATH | 4 | 75.0 | +25.0 [+0.0, +75.0] |" in text  # pass@4: the first problem goes from 0 to 1
    rows = list(csv.reader((tmp_path / "report" / "table.csv").open()))
    assert rows[0] == ["checkpoint", "AIME24", "MATH", "Math avg", "HumanEval+", "GPQA"]
    assert rows[2] == ["trained", "25.0", "62.5", "43.8", "100.0", "50.0"]
    assert {p.name for p in paths} >= {"passk_math.png", "passk_code.png", "passk_stem.png"}
    assert all(p.stat().st_size > 1000 for p in paths if p.suffix == ".png")
    with_base = report.write_report([trained, base], tmp_path / "again", base_label="base")
    assert "| trained: Δ pass@1 [95% CI] |" in with_base[0].read_text()
    other = results_of(tmp_path, hf, "other", {"math500": [1, 2, 3]})
    with pytest.raises(ValueError, match="different problems"):
        report.write_report([base, other], tmp_path / "bad")
