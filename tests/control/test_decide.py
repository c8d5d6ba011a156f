"""The run controller (prorl_megatron/control/decide.py): health checks, stage entries and the
reset schedule decided in one place, in one precedence, with one restart after any reset."""

import json
import math
import random
import tempfile
from pathlib import Path

import pytest

from prorl_megatron import config as C
from prorl_megatron.control.decide import Controller, EnterStage, Reset, Rollback, Warn, legacy_control_state

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes/tiny_cpu.yaml"
NO_TARGET = "no checkpoint before step 1 in runs"


def controller(*overrides: str, stages: str = "") -> Controller:
    """A controller as train.setup builds it: every stage's recipe, the command line on top (the
    tiny recipe without its scheduled reset)."""
    path = Path(tempfile.mkdtemp()) / "recipe.yaml"
    text = TINY.read_text()
    assert "  after_steps: 30" in text
    path.write_text(text.replace("  after_steps: 30", "  after_steps: null") + stages)
    recipe = C.load_recipe(path, list(overrides))
    return Controller(C.resolve_stages(recipe, list(overrides)) if recipe.stages else [recipe])


def target(path="ckpt/step_00000001"):
    return lambda since: (path, "")


def no_target(since):
    return None, NO_TARGET


def walk(c: Controller, stream, start=1, rollback=no_target):
    """{step: actions} for the steps that had any."""
    out = {}
    for step, metrics in enumerate(stream, start=start):
        actions = c.decide(step, metrics, rollback)
        if actions:
            out[step] = actions
    return out


def kinds(actions):
    return [type(a).__name__ for a in actions]


TWO_STAGES = """
stages:
  - name: first
  - name: second
    enter: {after_steps: 1000}
    overrides: {algo.kl_coef: 0.05}
"""
THREE_STAGES = """
stages:
  - name: a
  - name: b
    enter: {after_steps: 4}
  - name: c
    enter: {entropy_floor: 0.5, entropy_window: 2}
"""


# ---- health checks through the controller --------------------------------------------------


@pytest.mark.parametrize("check,metric,bad,good", [
    ("entropy_floor", "entropy", 0.05, 0.1), ("kl_ref_ceiling", "kl_ref", 0.31, 0.3),
    ("approx_kl_ceiling", "approx_kl", 0.31, 0.3), ("mismatch_ceiling", "mismatch_mean", 0.31, 0.3),
    ("truncated_ceiling", "response_length/truncated_frac", 0.31, 0.3), ("reward_floor", "reward/mean", 0.1, 0.11),
])
def test_each_health_check_reads_its_metric_and_warns(check, metric, bad, good):
    threshold = {"entropy_floor": 0.1, "reward_floor": 0.1}.get(check, 0.3)
    c = controller(f"health.{check}.threshold={threshold}", f"health.{check}.window=2")
    fired = walk(c, [{metric: bad}, {metric: good}, {metric: bad}, {metric: bad}])
    assert list(fired) == [4]
    (warn,) = fired[4]
    assert isinstance(warn, Warn) and (warn.alarm.check, warn.alarm.action, warn.alarm.since) == (check, "warn", 3)
    assert warn.alarm.message.startswith(f"{metric} {bad:.4g} ") and "for 2 consecutive steps (since step 3)" in \
        warn.alarm.message


def test_nonfinite_values_anywhere_raise_an_alarm_naming_them():
    c = controller("health.nonfinite=warn")
    ok = {"loss": 0.1, "updates": 2, "reset": True, "note": "text", "val/pass@1": 0.5}
    assert c.decide(1, ok, no_target) == []
    (warn,) = c.decide(2, {**ok, "loss": math.nan, "grad_norm": -math.inf, "entropy": math.nan}, no_target)
    assert warn.alarm.check == "nonfinite" and warn.alarm.message == \
        "non-finite metrics: entropy=nan, grad_norm=-inf, loss=nan"


def test_every_check_is_off_by_default():
    bad = {"entropy": 0.0, "kl_ref": 1e9, "approx_kl": 1e9, "mismatch_mean": 1e9, "reward/mean": 0.0,
           "response_length/truncated_frac": 1.0, "loss": math.nan}
    assert walk(controller(), [bad] * 5) == {}


# ---- stages --------------------------------------------------------------------------------


def test_stages_enter_by_steps_then_by_entropy_floor_counted_in_the_stage():
    c = controller(stages=THREE_STAGES)
    entropies = [0.1, 0.1, 0.1, 0.1, 0.9, 0.4, 0.9, 0.3, 0.2, 0.1]
    fired = walk(c, [{"entropy": e} for e in entropies])
    assert list(fired) == [4, 9]  # the floor counts only steps in stage b (5..)
    (b,), (cc,) = fired[4], fired[9]
    assert (b.index, b.name, b.reason, b.triggers) == (1, "b", "4 steps in the previous stage", ("periodic",))
    assert cc.triggers == ("entropy",) and "entropy 0.2 < 0.5 for 2 consecutive steps" in cc.reason
    assert c.stage == 2 and c.entry is None and c.recipe is c.recipes[2]
    assert walk(c, [{"entropy": 0.0}] * 5, start=11) == {}  # the last stage lasts


def test_a_stage_enters_by_validation_plateau():
    c = controller(stages="""
stages:
  - name: a
  - name: b
    enter: {plateau_window: 2, plateau_delta: 0.01, min_steps: 3}
""", *["eval.every_n_steps=2"])
    stream = [{} for _ in range(14)]
    for step, v in {6: 0.3, 8: 0.35, 10: 0.355, 12: 0.34, 14: 0.5}.items():
        stream[step - 1]["val/reward"] = v
    fired = walk(c, stream)
    assert list(fired) == [12] and fired[12][0].triggers == ("plateau",)
    assert "not above the best 0.35 by > 0.01 for 2 evaluations" in fired[12][0].reason


# ---- the precedence, pair by pair -------------------------------------------------------------


def test_health_next_stage_and_a_scheduled_reset_on_one_step_enter_the_stage_once():
    """Bug 1: the scheduled reset absorbed by the stage entry (which resets too), and said so."""
    c = controller("reset.after_steps=3", "health.entropy_floor.threshold=100", "health.entropy_floor.window=3",
                   "health.entropy_floor.action=next_stage", stages=TWO_STAGES)
    fired = walk(c, [{"entropy": 0.5}] * 3)
    assert list(fired) == [3] and kinds(fired[3]) == ["Warn", "EnterStage"]
    enter = fired[3][1]
    assert (enter.index, enter.name, enter.triggers) == (1, "second", ("health",))
    assert enter.absorbed == ("reset (every 3 steps (3 since the last reset))",)
    assert c.stage == 1 and c.reset.clock == 3


def test_a_health_reset_restarts_the_reset_schedule():
    """Bug 2: after a health reset at step 2, the scheduled reset counts from it (step 5, not 3)."""
    c = controller("reset.after_steps=3", "health.kl_ref_ceiling.threshold=0.5", "health.kl_ref_ceiling.action=reset")
    kls = [0.0, 0.9, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1]
    fired = walk(c, [{"kl_ref": k} for k in kls])
    assert {s: kinds(a) for s, a in fired.items()} == {2: ["Warn", "Reset"], 5: ["Reset"], 8: ["Reset"]}
    assert fired[2][1].triggers == ("health",) and fired[5][0].triggers == ("periodic",)


def test_a_health_reset_and_a_scheduled_reset_on_one_step_are_one_reset():
    c = controller("reset.after_steps=2", "health.kl_ref_ceiling.threshold=0.5", "health.kl_ref_ceiling.action=reset")
    fired = walk(c, [{"kl_ref": 0.0}, {"kl_ref": 0.9}])
    (warn, reset) = fired[2]
    assert reset.triggers == ("periodic", "health") and reset.reason.startswith("every 2 steps")
    assert "; health check kl_ref_ceiling: kl_ref 0.9 > 0.5" in reset.reason
    assert reset.absorbed == ("reset (health check kl_ref_ceiling: kl_ref 0.9 > 0.5)",)


def test_a_rollback_absorbs_the_steps_reset_and_stage_entry():
    c = controller("reset.after_steps=2", "health.kl_ref_ceiling.threshold=0.5", "health.kl_ref_ceiling.action=rollback",
                   "health.entropy_floor.threshold=100", "health.entropy_floor.action=warn", stages=TWO_STAGES)
    c.decide(1, {"kl_ref": 0.0, "entropy": 1.0}, target())
    (back,) = c.decide(2, {"kl_ref": 0.9, "entropy": 1.0}, target("ckpt/step_00000001"))
    assert isinstance(back, Rollback) and back.since == 2 and back.target == "ckpt/step_00000001"
    assert [a.check for a in back.alarms] == ["entropy_floor", "kl_ref_ceiling"]
    assert back.absorbed == ("entropy_floor -> warn", "reset (every 2 steps (2 since the last reset))")


def test_a_rollback_that_cannot_be_made_is_a_stop_saying_why_and_the_reset_still_happens():
    c = controller("reset.after_steps=1", "health.kl_ref_ceiling.threshold=0.5", "health.kl_ref_ceiling.action=rollback")
    actions = c.decide(1, {"kl_ref": 0.9}, no_target)
    assert kinds(actions) == ["Warn", "Reset", "Stop"]
    stop = actions[-1]
    assert stop.alarm.action == "stop" and stop.alarm.message == f"kl_ref 0.9 > 0.5 (no rollback: {NO_TARGET})"


def test_a_stop_wins_over_a_rollback_and_keeps_the_steps_stage_entry():
    c = controller("health.kl_ref_ceiling.threshold=0.5", "health.kl_ref_ceiling.action=rollback",
                   "health.entropy_floor.threshold=100", "health.entropy_floor.action=stop",
                   "health.approx_kl_ceiling.threshold=0.5", "health.approx_kl_ceiling.action=next_stage",
                   stages=TWO_STAGES)
    actions = c.decide(1, {"kl_ref": 0.9, "entropy": 1.0, "approx_kl": 0.9}, target())
    assert kinds(actions) == ["Warn", "Warn", "Warn", "EnterStage", "Stop"]
    assert [w.alarm.check for w in actions[:3]] == ["entropy_floor", "kl_ref_ceiling", "approx_kl_ceiling"]
    assert actions[-1].alarm.check == "entropy_floor" and actions[-1].absorbed == ("kl_ref_ceiling -> rollback",)
    assert c.stage == 1  # the stage is entered before the checkpoint: the resumed run is in it


def test_next_stage_in_the_last_stage_is_a_warning_that_says_so():
    c = controller("health.entropy_floor.threshold=100", "health.entropy_floor.action=next_stage",
                   stages=TWO_STAGES)
    c.decide(1, {"entropy": 1.0}, no_target)  # enters 'second'
    (warn,) = c.decide(2, {"entropy": 1.0}, no_target)
    assert isinstance(warn, Warn) and warn.note == "'second' is the last stage" and c.stage == 1


def test_a_stage_entry_takes_the_stages_reset_schedule_and_keeps_the_best_validation_reward():
    c = controller("reset.plateau_window=5", "eval.every_n_steps=1", stages=TWO_STAGES.replace(
        "{algo.kl_coef: 0.05}", "{algo.kl_coef: 0.05, reset.after_steps: 2}").replace("after_steps: 1000",
                                                                                     "after_steps: 1"))
    fired = walk(c, [{"val/reward": 0.5}, {"val/reward": 0.1}, {"val/reward": 0.1}, {"val/reward": 0.1}])
    assert kinds(fired[1]) == ["EnterStage"] and kinds(fired[3]) == ["Reset"]
    assert c.reset.best_val == 0.5 and c.recipe.algo.kl_coef == 0.05


# ---- state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [2, 5, 9, 14, 21])
def test_a_resumed_controller_decides_exactly_as_an_uninterrupted_one(cut):
    overrides = ("reset.after_steps=7", "reset.kl_threshold=0.18", "reset.kl_window=2", "reset.min_steps=2",
                 "health.entropy_floor.threshold=0.2", "health.entropy_floor.window=2",
                 "health.entropy_floor.action=reset", "health.kl_ref_ceiling.threshold=0.19",
                 "health.kl_ref_ceiling.action=next_stage", "eval.every_n_steps=3")
    stages = THREE_STAGES.replace("entropy_floor: 0.5, entropy_window: 2", "plateau_window: 2, min_steps: 3")
    rng = random.Random(cut)
    stream = [{"kl_ref": rng.uniform(0, 0.2), "entropy": rng.uniform(0, 1),
               **({"val/reward": rng.random()} if s % 3 == 0 else {})} for s in range(1, 31)]
    straight = walk(controller(*overrides, stages=stages), stream)
    assert sum(isinstance(a, (Reset, EnterStage)) for actions in straight.values() for a in actions) >= 4
    first = controller(*overrides, stages=stages)
    fired = walk(first, stream[:cut])
    resumed = controller(*overrides, stages=stages)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # the checkpoint's JSON
    fired.update(walk(resumed, stream[cut:], start=cut + 1))
    assert fired == straight


# The loop state of a checkpoint written before the controller (ResetScheduler, HealthWatcher,
# StageTracker), recorded from that code after 4 steps of a run with these settings; that code's
# next decisions: step 5 the KL reset and stage 'c' by its entropy floor, step 6 the entropy-floor
# warning (since step 3) and the KL-ceiling reset (since step 4).
LEGACY = {"scheduler": {"last_step": 4, "last_reset_step": 2, "kl_streak": 2, "best_val": 0.3, "stale_evals": 1,
                        "num_resets": 0, "entropy_streak": 0},
          "health": {"last_step": 4, "streaks": {"entropy_floor": [2, 3], "kl_ref_ceiling": [1, 4]}},
          "stage": {"index": 1, "name": "b", "entered_step": 2,
                    "trigger": {"last_step": 4, "last_reset_step": 2, "kl_streak": 0, "best_val": None,
                                "stale_evals": 0, "num_resets": 0, "entropy_streak": 2}}}
LEGACY_RECIPE = ("reset.every_n_steps=6", "reset.kl_threshold=0.1", "reset.kl_window=3", "reset.plateau_window=2",
                 "reset.min_gap_steps=2", "eval.every_n_steps=2", "health.entropy_floor.threshold=0.5",
                 "health.entropy_floor.window=4", "health.kl_ref_ceiling.threshold=0.3",
                 "health.kl_ref_ceiling.window=3", "health.kl_ref_ceiling.action=reset")


def test_a_checkpoint_from_before_the_controller_continues_as_its_code_would_have():
    c = controller(*LEGACY_RECIPE, stages="""
stages:
  - name: a
  - name: b
    enter: {after_steps: 2}
  - name: c
    enter: {entropy_floor: 0.5, entropy_window: 3, after_steps: 10}
""")
    c.load_state_dict(legacy_control_state(LEGACY))
    assert (c.stage, c.entered_step, c.reset.clock) == (1, 2, 2)
    fired = walk(c, [{"kl_ref": 0.4, "entropy": 0.2}, {"kl_ref": 0.45, "entropy": 0.1, "val/reward": 0.2}], start=5)
    (enter,) = fired[5]
    assert isinstance(enter, EnterStage) and (enter.index, enter.triggers) == (2, ("entropy",))
    assert enter.absorbed == ("reset (kl_ref 0.4 > 0.1 for 3 consecutive steps (since step 3))",)
    assert kinds(fired[6]) == ["Warn", "Warn", "Reset"]
    assert [(w.alarm.check, w.alarm.since) for w in fired[6][:2]] == [("entropy_floor", 3), ("kl_ref_ceiling", 4)]


def test_a_checkpoint_of_another_stage_list_is_refused():
    c = controller(stages=TWO_STAGES)
    state = c.state_dict()
    state["stage"] = {"index": 1, "name": "longer", "entered_step": 3}
    with pytest.raises(ValueError, match=r"stage 1 'longer'; this recipe's stages are \['first', 'second'\]"):
        c.load_state_dict(state)
