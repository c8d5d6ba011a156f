import sys
from pathlib import Path

import pytest
import yaml

from prorl_megatron import config as C
from tests import procs

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path):
    recipe = C.load_recipe(path)
    again = C.from_dict(yaml.safe_load(C.to_yaml(recipe)))
    assert again == recipe


def test_paper_recipe_holds_the_paper_settings():
    r = C.load_recipe(ROOT / "recipes/prorl_1p5b.yaml")
    assert (r.algo.eps_low, r.algo.eps_high) == (0.2, 0.4)
    assert r.algo.loss_agg == "token-mean" and r.algo.kl_estimator == "k3"
    assert r.algo.kl_coef == pytest.approx(1e-4) and r.algo.dynamic_sampling
    assert r.rollout.temperature == 1.2 and r.rollout.n == 16 and r.rollout.max_response_tokens == 8192
    assert r.train.lr == pytest.approx(2e-6)
    assert r.train.prompts_per_step // r.train.mini_batch_prompts == 4
    assert r.reset.reset_optimizer and r.reset.plateau_window is not None
    # the stages: 8k responses, then 16k (the engine rebuilt; one 16k sequence fits a micro-batch)
    last = C.resolve_stages(r)[-1]
    assert [s.name for s in r.stages] == ["8k", "16k"] and last.rollout.max_response_tokens == 16384
    assert last.train.max_tokens_per_micro_batch >= last.rollout.max_prompt_tokens + 16384


def test_overrides_are_coerced_to_the_field_type(tmp_path):
    path = write(tmp_path, "algo:\n  eps_high: 0.4\n")
    r = C.load_recipe(path, ["algo.eps_high=0.28", "rollout.n=8", "algo.kl_coef=1e-3",
                             "rollout.stop=['</answer>', '\\n\\n']", "reset.every_n_steps=100",
                             "algo.dual_clip_c=null", "eval.ks=[1,4]", "data.domain_weights.math=2",
                             "algo.dynamic_sampling=false", "train.lr=1", "name=run7"])
    assert r.algo.eps_high == 0.28 and isinstance(r.algo.eps_high, float)
    assert r.rollout.n == 8 and isinstance(r.rollout.n, int)
    assert r.algo.kl_coef == 1e-3  # YAML 1.1 reads 1e-3 as a string: coerced
    assert r.rollout.stop == ["</answer>", "\\n\\n"]
    assert r.reset.after_steps == 100 and r.algo.dual_clip_c is None  # reset.every_n_steps: its older name
    assert r.eval.ks == [1, 4] and r.data.domain_weights == {"math": 2.0}
    assert r.algo.dynamic_sampling is False
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float)
    assert r.name == "run7"


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    r = C.load_recipe(write(tmp_path, "train:\n  lr: 3e-4\nalgo:\n  kl_coef: 1e-4\n"))
    assert r.train.lr == 3e-4 and r.algo.kl_coef == 1e-4


def test_unknown_key_in_file_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, "algo:\n  eps_hihg: 0.3\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "unknown key 'algo.eps_hihg'" in msg and "did you mean 'algo.eps_high'" in msg


def test_unknown_section_in_file(tmp_path):
    with pytest.raises(C.ConfigError, match=r"r.yaml: unknown key 'rollot'; did you mean 'rollout'\?"):
        C.load_recipe(write(tmp_path, "rollot:\n  n: 4\n"))


def test_unknown_key_on_command_line(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(C.ConfigError, match=r"command line \(rollout\.temprature=1\): unknown key "
                                            r"'rollout\.temprature'; did you mean 'rollout\.temperature'"):
        C.load_recipe(path, ["rollout.temprature=1"])
    with pytest.raises(C.ConfigError, match="rollout.n is a value, not a section"):
        C.load_recipe(path, ["rollout.n.x=1"])
    with pytest.raises(C.ConfigError, match="must look like section.key=value"):
        C.load_recipe(path, ["rollout.n"])


def test_wrong_type_names_field_and_expected_type(tmp_path):
    with pytest.raises(C.ConfigError, match=r"r.yaml: rollout.n: expected int, got str 'eight'"):
        C.load_recipe(write(tmp_path, "rollout:\n  n: eight\n"))
    with pytest.raises(C.ConfigError, match=r"rollout.n: expected int, got float 2.5"):
        C.load_recipe(write(tmp_path, ""), ["rollout.n=2.5"])
    with pytest.raises(C.ConfigError, match=r"algo.dynamic_sampling: expected bool, got int 1"):
        C.load_recipe(write(tmp_path, "algo:\n  dynamic_sampling: 1\n"))
    with pytest.raises(C.ConfigError, match=r"algo.loss_agg: expected one of 'token-mean', .* got 'token_mean' "
                                            r"\(did you mean 'token-mean'\?\)"):
        C.load_recipe(write(tmp_path, "algo:\n  loss_agg: token_mean\n"))
    with pytest.raises(C.ConfigError, match=r"eval.ks\[1\]: expected int, got str 'x'"):
        C.load_recipe(write(tmp_path, "eval:\n  ks: [1, x]\n"))
    with pytest.raises(C.ConfigError, match=r"algo.dual_clip_c: expected float or null, got str 'auto'"):
        C.load_recipe(write(tmp_path, "algo:\n  dual_clip_c: auto\n"))
    with pytest.raises(C.ConfigError, match=r"algo: expected mapping \(section AlgoConfig\), got list"):
        C.load_recipe(write(tmp_path, "algo: [1, 2]\n"))


def test_cross_field_validation(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(C.ConfigError) as e:
        C.load_recipe(path, ["train.prompts_per_step=100", "algo.eps_low=1.2", "rollout.n=0",
                             "reset.plateau_window=3", "rewards.code_sandbox=none"])
    msg = str(e.value)
    for expected in ("train.prompts_per_step (100) must be a multiple of train.mini_batch_prompts (64)",
                     "algo.eps_low must be in [0, 1), got 1.2", "rollout.n must be >= 1, got 0",
                     "reset.plateau_window needs validation rewards", "rewards.allow_unsandboxed=true"):
        assert expected in msg
    with pytest.raises(C.ConfigError, match="data.domain_weights: unknown domain 'maths'"):
        C.load_recipe(path, ["data.domain_weights.maths=1"])


def test_bad_files(tmp_path):
    with pytest.raises(C.ConfigError, match="recipe file not found"):
        C.load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_recipe(write(tmp_path, "algo: [\n"))
    with pytest.raises(C.ConfigError, match="a recipe must be a mapping of sections, got list"):
        C.load_recipe(write(tmp_path, "- 1\n"))


def test_cli_print_config_and_errors():
    out = procs.run([sys.executable, "-m", "prorl_megatron.config", "--recipe", "recipes/tiny_cpu.yaml",
                     "--print-config", "algo.eps_high=0.28"], timeout=300)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["algo"]["eps_high"] == 0.28 and printed["name"] == "tiny-cpu"
    bad = procs.run([sys.executable, "-m", "prorl_megatron.config", "--recipe", "recipes/tiny_cpu.yaml",
                     "algo.eps_hgih=0.3"], timeout=300)
    assert bad.returncode == 2 and "did you mean 'algo.eps_high'" in bad.stderr


def test_training_rollouts_refuse_top_p_below_one_and_eval_has_its_own(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(C.ConfigError) as e:
        C.load_recipe(path, ["rollout.top_p=0.95"])
    msg = str(e.value)
    assert "rollout.top_p must be 1.0, got 0.95" in msg
    assert "nucleus" in msg and "rollout.tis_cap" in msg and "eval.top_p" in msg
    r = C.load_recipe(path, ["eval.top_p=0.95", "rollout.top_p=1"])
    assert r.eval.top_p == 0.95 and r.rollout.top_p == 1.0
    assert C.Recipe().eval.top_p == 1.0
    for bad in ("0", "1.5"):
        with pytest.raises(C.ConfigError, match=rf"eval.top_p must be in \(0, 1\], got {bad}"):
            C.load_recipe(path, [f"eval.top_p={bad}"])


def test_sampling_seed_budget_is_checked(tmp_path):
    path = write(tmp_path, "")
    C.load_recipe(path, ["train.steps=100000"])  # 100001 x 4 x 256 x 16 < 2**31
    with pytest.raises(C.ConfigError, match=r"\(train.steps \+ 1\) x algo.max_sampling_rounds x "
                                            r"train.prompts_per_step x rollout.n = \d+ sampling seeds exceed"):
        C.load_recipe(path, ["train.steps=1000000"])


def test_v2_recipe_holds_the_nemo_rl_prorl_v2_settings():
    r = C.load_recipe(ROOT / "recipes/prorl_v2_1p5b.yaml")
    assert r.algo.advantage == "reinforce_pp_baseline" and r.algo.kl_estimator == "k2"
    assert (r.algo.eps_low, r.algo.eps_high, r.algo.dual_clip_c) == (0.2, 0.27, None)
    assert r.algo.kl_coef == pytest.approx(1e-4) and r.algo.dynamic_sampling
    assert r.rollout.correction_mode() == "icepop" and (r.rollout.correction_low, r.rollout.correction_high) == (0.5, 5.0)
    assert r.rewards.length_penalty.kind == "cosine"
    assert (r.rewards.length_penalty.on_steps, r.rewards.length_penalty.off_steps) == (100, 500)
    assert not r.reset.reset_optimizer


def test_rollout_correction_settings(tmp_path):
    path = write(tmp_path, "rollout:\n  tis_cap: 2.0\n")
    assert C.load_recipe(path).rollout.correction_mode() == "token_tis"  # the older spelling still works
    assert C.load_recipe(path, ["rollout.correction=token_tis"]).rollout.correction_mode() == "token_tis"
    assert C.load_recipe(path, ["rollout.tis_cap=null"]).rollout.correction_mode() == "none"
    ok = C.load_recipe(path, ["rollout.tis_cap=null", "rollout.correction=seq_mask_tis",
                              "rollout.correction_low=0.999", "rollout.correction_high=1.002"])
    assert ok.rollout.correction_mode() == "seq_mask_tis"
    cases = {
        ("rollout.tis_cap=null", "rollout.correction=token_tis"): "needs its cap: set rollout.tis_cap",
        ("rollout.correction=icepop", "rollout.correction_low=0.5", "rollout.correction_high=5"):
            "rollout.tis_cap is token_tis's cap",
        ("rollout.tis_cap=null", "rollout.correction=icepop"): "needs its band: set rollout.correction_low",
        ("rollout.tis_cap=null", "rollout.correction=icepop", "rollout.correction_low=2",
         "rollout.correction_high=1"): "must satisfy 0 <= low <= high",
        ("rollout.correction_high=5",): "rollout.correction_high set but rollout.correction=none",
        ("rewards.length_penalty.wrong=[0]",): "rewards.length_penalty.wrong must be two finite numbers",
        ("rewards.length_penalty.on_steps=0",): "rewards.length_penalty.on_steps must be >= 1",
    }
    for overrides, message in cases.items():
        with pytest.raises(C.ConfigError, match=message.replace("(", r"\(")):
            C.load_recipe(path, list(overrides))
    with pytest.raises(C.ConfigError, match="did you mean 'icepop'"):
        C.load_recipe(path, ["rollout.correction=icepopp"])


def test_older_trigger_names_load_under_the_one_trigger_shape(tmp_path):
    """reset.every_n_steps / min_gap_steps (recipes written before the run controller) are the
    trigger's after_steps / min_steps, in a file, on the command line and in a stage's overrides."""
    path = write(tmp_path, "reset:\n  every_n_steps: 300\n  min_gap_steps: 150\n  plateau_window: 4\n"
                           "eval:\n  every_n_steps: 50\n")
    r = C.load_recipe(path)
    assert (r.reset.after_steps, r.reset.min_steps, r.reset.plateau_window) == (300, 150, 4)
    assert C.to_dict(r)["reset"]["after_steps"] == 300 and "every_n_steps" not in C.to_dict(r)["reset"]
    assert C.load_recipe(path, ["reset.every_n_steps=7"]).reset.after_steps == 7
    with pytest.raises(C.ConfigError, match="reset.every_n_steps and reset.after_steps are one setting"):
        C.load_recipe(write(tmp_path, "reset:\n  every_n_steps: 3\n  after_steps: 4\n", "both.yaml"))
    staged = write(tmp_path, "eval:\n  every_n_steps: 5\nstages:\n  - name: a\n  - name: b\n"
                             "    enter: {after_steps: 2}\n    overrides: {reset.every_n_steps: 9}\n", "staged.yaml")
    first = C.load_recipe(staged, ["reset.min_gap_steps=1"])
    assert first.stages[1].overrides == {"reset.after_steps": 9}
    assert [s.reset.after_steps for s in C.resolve_stages(first, ["reset.min_gap_steps=1"])] == [None, 9]
    assert C.stage_overridden(first, 1, ["reset.every_n_steps=2"]) == [
        "command line reset.after_steps=2 overrides stage 1 'b''s reset.after_steps=9"]
    assert C.StageTrigger is C.TriggerConfig and isinstance(r.reset, C.TriggerConfig)
