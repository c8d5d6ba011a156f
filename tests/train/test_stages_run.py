"""A staged run end to end on CPU: four stages, entered by steps, by a validation plateau and by an
entropy floor; one changes rollout.max_response_tokens (the vLLM engine is rebuilt, the parity
check passes after it); the evaluation of its last checkpoint lands in its stage; a kill -9 inside
the second stage resumes into it with the same metrics."""

import json
import sys

import pytest

from prorl_megatron.metrics import read_jsonl
from tests import procs
from tests.train.conftest import ROOT, kill_when, run, train_command
from tests.train.test_train_loop import metrics, ok

pytestmark = pytest.mark.slow

# stage 2 evaluates every step and stage 3 comes at its second evaluation (a plateau planted by a
# delta no reward can beat); the entropy floor is planted above any real entropy: stage 4 comes 2
# steps after stage 3
STAGES = """
stages:
  - name: short
  - name: long
    enter: {after_steps: 3}
    overrides: {rollout.max_response_tokens: 12, algo.kl_coef: 0.05, train.lr: 1.0e-4, eval.every_n_steps: 1}
  - name: steady
    enter: {plateau_window: 1, plateau_delta: 1.0}
    overrides: {eval.every_n_steps: 100}
  - name: explore
    enter: {entropy_floor: 100.0, entropy_window: 2}
    overrides: {rollout.temperature: 1.2, data.domain_weights: {math: 1.0}}
"""


def staged_command(run_dir, hf_dir, *overrides):
    recipe = run_dir.parent / "staged.yaml"
    if not recipe.is_file():
        tiny = (ROOT / "recipes/tiny_cpu.yaml").read_text().replace("every_n_steps: 15", "every_n_steps: 100")
        assert "every_n_steps: 100" in tiny
        recipe.write_text(tiny + STAGES)
    command = train_command(run_dir, hf_dir, "train.steps=9", "rollout.check_sync_every=1", *overrides)
    command[command.index("recipes/tiny_cpu.yaml")] = str(recipe)
    command.remove("eval.every_n_steps=0")  # the command line would win over the stages' evaluation
    return command


def test_four_stages_rebuild_the_engine_and_resume_inside_a_stage(tiny_base, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    text = ok(run(staged_command(straight, tiny_base, "checkpoint.every_n_steps=3")))
    assert "step 3: stage 1 'long' (3 steps in the previous stage): algo.kl_coef 0.01 -> 0.05" in text
    assert "step 5: stage 2 'steady' (validation reward" in text
    assert "step 7: stage 3 'explore' (entropy" in text
    m = metrics(straight)
    assert [(s, r["index"], r["stage"]) for (s, e), r in m.items() if e == "stage"] == [
        (0, 0, "short"), (3, 1, "long"), (5, 2, "steady"), (7, 3, "explore")]
    long, steady, explore = m[(3, "stage")], m[(5, "stage")], m[(7, "stage")]
    assert long["changed"] == {"algo.kl_coef": [0.01, 0.05], "eval.every_n_steps": [100, 1],
                               "rollout.max_response_tokens": [8, 12], "train.lr": [3e-4, 1e-4]}
    assert long["engine_rebuilt"] and not steady["engine_rebuilt"] and not explore["engine_rebuilt"]
    assert steady["triggers"] == ["plateau"] and explore["triggers"] == ["entropy"]
    assert [s for s in range(1, 10) if "val/pass@1" in m[(s, None)]] == [4, 5, 9]  # stage 2's, and the last
    assert explore["changed"] == {"data.domain_weights": [{}, {"math": 1.0}], "rollout.temperature": [1.0, 1.2]}
    assert [m[(s, None)]["stage"] for s in range(1, 10)] == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert [m[(s, None)]["lr"] for s in (3, 4)] == [3e-4, 1e-4]  # step 3 trained before the change
    assert all(m[(s, None)]["kl_ref"] == 0.0 for s in (4, 6, 8))  # each entry reset the reference
    assert m[(9, None)]["resets"] == 3
    for step in range(1, 10):  # the parity check ran every step, after the rebuild too
        assert m[(step, None)]["sync/logprob_diff_max"] < 1e-3
    assert max(m[(s, None)]["response_length/max"] for s in range(4, 10)) > 8  # the rebuilt engine's budget
    log = (straight / "logs" / "train.log").read_text()
    assert log.count("engine shut down") == 2  # one per rank

    # the last checkpoint is in stage 3 'explore' (12-token responses): prorl_megatron.eval lands in
    # it as the trainer's own validation of the same weights did (--stage picking another:
    # tests/test_stages.py)
    evaluation = staged_command(straight, tiny_base, "checkpoint.resume=none")
    evaluation[evaluation.index("prorl_megatron.train")] = "prorl_megatron.eval"
    last = straight / "ckpt" / "step_00000009"
    ok(run(evaluation + ["--checkpoint", str(last), "--out", str(tmp_path / "eval.json")]))
    table = json.loads((tmp_path / "eval.json").read_text())
    trained = {k.removeprefix("val/"): v for k, v in m[(9, None)].items() if k.startswith("val/")}
    assert table.keys() == trained.keys() and all(abs(table[k] - trained[k]) < 1e-9 for k in table), (table, trained)

    # kill -9 in step 5 (stage 2 'long', its plateau trigger holding step 4's evaluation); the resumed
    # command repeats a stage's value on the command line: it wins, and a line says so
    command = staged_command(killed, tiny_base, "checkpoint.every_n_steps=1")
    jsonl = killed / "logs" / "metrics.jsonl"
    kill_when(command, lambda: jsonl.is_file() and any(r["step"] >= 4 for r in read_jsonl(jsonl)))
    assert (killed / "ckpt" / "latest").read_text().strip() == "step_00000004"
    text = ok(run(command + ["algo.kl_coef=0.05"]))
    assert "resumed from" in text and "step_00000004" in text
    log = (killed / "logs" / "train.log").read_text()
    assert "resuming in stage 1 'long'" in log
    assert "command line algo.kl_coef=0.05 overrides stage 1 'long''s algo.kl_coef=0.05" in log
    b = metrics(killed)
    for key in [(3, "stage"), (4, None), (5, None), (5, "stage"), (6, None), (7, None), (7, "stage"), (8, None),
                (9, None)]:
        same = {k: v for k, v in m[key].items() if not k.startswith("time/") and k != "tokens_per_s"}
        got = {k: v for k, v in b[key].items() if not k.startswith("time/") and k != "tokens_per_s"}
        assert got == same, key
    assert [s for s, e in b if e is None] == list(range(10))  # step 0: the validation before training

    plotted = ok(procs.run([sys.executable, "tools/plot.py", str(killed / "logs")], timeout=300))
    assert "stages: short (steps 1-3), long (4-5), steady (6-7), explore (8-9)" in plotted
