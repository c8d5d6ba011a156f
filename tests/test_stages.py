"""Staged recipes (config.StageConfig, prorl_megatron/stages.py): each stage's recipe, the recipe a
checkpoint resumes with, and the refusals (the stage entries are tests/control/test_decide.py's)."""

from pathlib import Path

import pytest
import yaml

from prorl_megatron import config as C
from prorl_megatron.stages import changes, recipe_to_resume

ROOT = Path(__file__).resolve().parents[1]
TINY = (ROOT / "recipes/tiny_cpu.yaml").read_text()

STAGES = """
stages:
  - name: short
  - name: long
    enter: {after_steps: 3}
    overrides: {rollout.max_response_tokens: 12, algo.kl_coef: 5e-2, train.lr: '1e-4'}
  - name: explore
    enter: {entropy_floor: 100, entropy_window: 2}
    overrides: {rollout.temperature: 1.2, data.domain_weights: {math: 1}}
"""


def staged(tmp_path, stages=STAGES, name="r.yaml"):
    path = tmp_path / name
    path.write_text(TINY + stages)
    return path


def test_each_stage_recipe_is_the_file_then_the_stages_then_the_command_line(tmp_path):
    path = staged(tmp_path)
    cli = ["rollout.temperature=1.1"]
    first = C.load_recipe(path, cli)
    every = C.resolve_stages(first, cli)
    assert [(r.rollout.max_response_tokens, r.algo.kl_coef, r.train.lr, r.rollout.temperature) for r in every] == [
        (8, 1e-2, 3e-4, 1.1), (12, 5e-2, 1e-4, 1.1), (12, 5e-2, 1e-4, 1.1)]
    assert every[2].data.domain_weights == {"math": 1.0} and every[1].data.domain_weights == {}
    # values are typed like command-line overrides ('1e-4', 5e-2 read by YAML 1.1 as strings)
    assert first.stages[1].overrides == {"rollout.max_response_tokens": 12, "algo.kl_coef": 0.05, "train.lr": 1e-4}
    assert C.stage_recipe(first, 2, cli) == every[2]  # straight from stage 0, as a resume does
    assert C.stage_overridden(first, 2, cli) == [
        "command line rollout.temperature=1.1 overrides stage 2 'explore''s rollout.temperature=1.2"]
    assert set(changes(every[0], every[1])) == {"rollout.max_response_tokens", "algo.kl_coef", "train.lr"}
    again = C.from_dict(yaml.safe_load(C.to_yaml(first)))
    assert again == first  # the resolved recipe (stages included) round-trips


def test_no_stages_is_the_recipe_as_before(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TINY)
    recipe = C.load_recipe(path)
    assert recipe.stages == [] and recipe_to_resume(recipe, ("algo.kl_coef=0.1",), None) is recipe
    loop = {"stage": {"index": 0, "name": "", "entered_step": 0, "trigger": None}}  # a checkpoint of such a run
    assert recipe_to_resume(recipe, ("algo.kl_coef=0.1",), loop) is recipe
    with pytest.raises(C.ConfigError, match=r"written in stage 1 'long'; this recipe's stages are \[\]"):
        recipe_to_resume(recipe, (), {"stage": {"index": 1, "name": "long"}})


@pytest.mark.parametrize("overrides,message", [
    ("{rollout.temprature: 1}", r"stage 1 'long' \(stages\[1\]\) overrides: unknown key 'rollout.temprature'; "
                                r"did you mean 'rollout.temperature'"),
    ("{rollout.n: many}", r"stage 1 'long' \(stages\[1\]\) overrides: rollout.n: expected int, got str 'many'"),
    ("{algo.loss_agg: token-meen}", r"stage 1 'long' .*algo.loss_agg: expected one of .*did you mean 'token-mean'"),
    ("{model.hf_path: other}", r"stage 1 'long' \(stages\[1\]\) overrides: model.hf_path: fixed for the run"),
    ("{train.distributed_optimizer: true}", r"stage 1 'long' .*train.distributed_optimizer: fixed for the run"),
    ("{rollout.max_response_tokens: 4096}",  # the stage's recipe fails Recipe.validate
     r"stage 1 'long' \(stages\[1\]\): invalid recipe:\n  train.max_tokens_per_micro_batch \(1536\) must hold"),
    ("{algo.eps_low: 1.5}", r"stage 1 'long' \(stages\[1\]\): invalid recipe:\n  algo.eps_low must be in"),
])
def test_bad_stage_overrides_name_the_stage_and_the_key(tmp_path, overrides, message):
    path = staged(tmp_path, f"""
stages:
  - name: short
  - name: long
    enter: {{after_steps: 3}}
    overrides: {overrides}
""")
    with pytest.raises(C.ConfigError, match=message) as e:
        C.load_recipe(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("stages,message", [
    ("  - name: a\n    enter: {after_steps: 2}\n", r"stage 0 'a' .*the first stage has no trigger"),
    ("  - name: a\n  - name: b\n", r"stage 1 'b' .*needs a trigger: enter.after_steps"),
    ("  - name: a\n  - name: a\n    enter: {after_steps: 2}\n", r"stage 1 'a' .*stage names must be unique"),
    ("  - overrides: {}\n", r"stage 0 '' .*every stage needs a name"),
    ("  - name: a\n  - name: b\n    enter: {after_steps: 0}\n", r"stage 1 'b' .*enter.after_steps must be >= 1"),
    ("  - name: a\n  - name: b\n    enter: {entropy_flor: 1}\n", r"unknown key 'stages\[1\].enter.entropy_flor'; did you mean 'stages\[1\].enter.entropy_floor'"),
    ("  - name: a\n    overrides: {eval.every_n_steps: 0}\n  - name: b\n    enter: {plateau_window: 2}\n",
     r"stage 1 'b' .*enter.plateau_window needs validation rewards in stage 0"),
])
def test_bad_stage_lists(tmp_path, stages, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_recipe(staged(tmp_path, "stages:\n" + stages))


def test_resume_recipe_lands_in_the_saved_stage_and_the_command_line_wins(tmp_path, caplog):
    cli = ("algo.kl_coef=0.2",)
    first = C.load_recipe(staged(tmp_path), cli)
    resumed = recipe_to_resume(first, cli, {"stage": {"index": 1, "name": "long"}})
    assert resumed.rollout.max_response_tokens == 12 and resumed.train.lr == 1e-4 and resumed.algo.kl_coef == 0.2
    assert "command line algo.kl_coef=0.2 overrides stage 1 'long''s algo.kl_coef=0.05" in caplog.text
    with pytest.raises(C.ConfigError, match=r"written in stage 1 'longer'; this recipe's stages are"):
        recipe_to_resume(first, cli, {"stage": {"index": 1, "name": "longer"}})


def test_evaluation_lands_in_the_checkpoints_stage_or_the_one_asked_for(tmp_path):
    """prorl_megatron.eval's recipe for a training checkpoint: its stage's by default (as the
    trainer's validation of the same weights), --stage NAME or INDEX another, a bad one refused."""
    from prorl_megatron.eval import evaluation_recipe

    cli = ("algo.kl_coef=0.2",)
    first = C.load_recipe(staged(tmp_path), cli)
    loop = {"control": {"stage": {"index": 2, "name": "explore", "entered_step": 9}}}
    assert evaluation_recipe(first, cli, loop, None).rollout.temperature == 1.2  # stage 2 'explore'
    assert evaluation_recipe(first, cli, {"stage": {"index": 1, "name": "long"}}, None).rollout.max_response_tokens == 12
    assert evaluation_recipe(first, cli, loop, "short").rollout.max_response_tokens == 8
    assert evaluation_recipe(first, cli, loop, "1").rollout.max_response_tokens == 12
    assert evaluation_recipe(first, cli, None, None) is first  # a converted model: stage 0
    with pytest.raises(C.ConfigError, match=r"--stage longest: no such stage; this recipe's stages are \['short'"):
        evaluation_recipe(first, cli, loop, "longest")
