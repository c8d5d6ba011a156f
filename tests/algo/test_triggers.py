"""The one trigger type (prorl_megatron/algo/triggers.py) on synthetic metric streams."""

import json
import math
import random

import pytest

from prorl_megatron.algo.triggers import Threshold, Trigger, TriggerSpec

KL = Threshold("kl_ref", ">", 0.1, name="kl")


def run(trigger, metrics_per_step, start=1):
    """{step: Fired} for a list of per-step metric dicts."""
    fired = {}
    for step, metrics in enumerate(metrics_per_step, start=start):
        event = trigger.observe(step, metrics)
        if event is not None:
            fired[step] = event
    return fired


def test_after_steps_counts_from_the_clock():
    fired = run(Trigger(TriggerSpec(after_steps=5)), [{}] * 17)
    assert list(fired) == [5, 10, 15] and fired[5].triggers == ("periodic",) and fired[5].since == 5
    assert fired[10].reason == "every 5 steps (5 since the last reset)"


def test_a_threshold_needs_consecutive_steps_and_says_since_when():
    kls = [0.01, 0.2, 0.3, 0.05, 0.2, 0.2, 0.2, 0.01, 0.2]
    fired = run(Trigger(TriggerSpec(thresholds=(Threshold("kl_ref", ">", 0.1, window=3, name="kl"),))),
                [{"kl_ref": v} for v in kls])
    assert list(fired) == [7] and fired[7].triggers == ("kl",) and fired[7].since == 5
    assert fired[7].reason == "kl_ref 0.2 > 0.1 for 3 consecutive steps (since step 5)"


def test_missing_or_nan_metrics_neither_extend_nor_break_a_streak():
    floor = Threshold("entropy", "<", 0.1, window=3)
    stream = [{"entropy": 0.0}, {}, {"entropy": math.nan}, {"entropy": 0.0}, {"reward/mean": 1.0}, {"entropy": 0.0}]
    fired = run(Trigger(TriggerSpec(thresholds=(floor,))), stream)
    assert list(fired) == [6] and fired[6].since == 1
    assert fired[6].reason == "entropy 0 < 0.1 for 3 consecutive steps (since step 1)"


@pytest.mark.parametrize("op,values,fires", [
    (">", (0.1, 0.3, 0.31, math.inf), [3, 4]),  # +inf is above any ceiling
    ("<", (0.3, 0.29, 0.31, -math.inf), [2, 4]),
    ("<=", (0.31, 0.3, 0.2), [2, 3]),
])
def test_each_comparison_fires_only_beyond_the_bound(op, values, fires):
    t = Trigger(TriggerSpec(thresholds=(Threshold("m", op, 0.3),)))
    assert list(run(t, [{"m": v} for v in values])) == fires


def test_every_prefix_needs_every_matching_metric_beyond():
    floor = Threshold("reward/mean", "<=", 0.0, window=2, every_prefix="reward/mean/", name="reward_floor")
    zero = {"reward/mean": 0.0, "reward/mean/math": 0.0, "reward/mean/code": 0.0, "reward/shaped_mean": 0.7}
    alive = {**zero, "reward/mean": 0.01, "reward/mean/code": 0.02}
    fired = run(Trigger(TriggerSpec(thresholds=(floor,))), [zero, alive, zero, zero, {**zero, "reward/mean/code": 0.5}])
    assert list(fired) == [4]
    one = Trigger(TriggerSpec(thresholds=(Threshold("reward/mean", "<=", 0.0, every_prefix="reward/mean/"),)))
    assert one.observe(1, zero).reason == "reward/mean 0, reward/mean/code 0, reward/mean/math 0 <= 0"


def test_plateau_counts_evaluations_not_steps():
    metrics = [{} for _ in range(30)]
    for step, v in {5: 0.30, 10: 0.40, 15: 0.405, 20: 0.39, 25: 0.50, 30: 0.49}.items():
        metrics[step - 1]["val/reward"] = v
    fired = run(Trigger(TriggerSpec(plateau_window=2, plateau_delta=0.01)), metrics)
    assert list(fired) == [20] and fired[20].triggers == ("plateau",)  # 15 (+0.005 <= delta) and 20 are stale
    assert "not above the best 0.4 by > 0.01 for 2 evaluations" in fired[20].reason


def test_min_steps_hold_conditions_back_and_they_stay_armed():
    fired = run(Trigger(TriggerSpec(thresholds=(KL,), min_steps=4)), [{"kl_ref": 0.5}] * 12)
    assert list(fired) == [4, 8, 12]
    assert fired[8].reason == "kl_ref 0.5 > 0.1"


def test_combined_conditions_name_every_reason_and_what_fired_counts_afresh():
    t = Trigger(TriggerSpec(after_steps=3, thresholds=(Threshold("kl_ref", ">", 0.1, window=2, name="kl"),)))
    fired = run(t, [{"kl_ref": 0.0}, {"kl_ref": 0.9}, {"kl_ref": 0.9}, {"kl_ref": 0.9}])
    assert fired[3].triggers == ("periodic", "kl") and fired[3].since == 2
    assert "every 3 steps" in fired[3].reason and "kl_ref 0.9 > 0.1" in fired[3].reason
    assert 4 not in fired  # a trigger that fired counts afresh: the KL streak too
    assert t.fired == 1


def test_no_condition_never_fires_and_steps_must_increase():
    assert not TriggerSpec().enabled
    assert run(Trigger(TriggerSpec()), [{"kl_ref": 100.0, "val/reward": 0.0}] * 20) == {}
    t = Trigger(TriggerSpec(after_steps=2))
    t.observe(3, {})
    with pytest.raises(ValueError, match="step: expected a step after 3, got 3"):
        t.observe(3, {})


def test_start_step_and_restart():
    t = Trigger(TriggerSpec(after_steps=3), start_step=10)
    assert list(run(t, [{}] * 5, start=11)) == [13]
    t.restart(15)
    assert list(run(t, [{}] * 4, start=16)) == [18]


@pytest.mark.parametrize("cut", [1, 7, 13, 22, 39])
def test_resume_equivalence(cut):
    rng = random.Random(cut)
    metrics = [{"kl_ref": rng.uniform(0, 0.2), "entropy": rng.uniform(0, 1),
                **({"val/reward": rng.uniform(0.2, 0.6)} if step % 4 == 0 else {})} for step in range(1, 61)]
    spec = TriggerSpec(after_steps=17, thresholds=(Threshold("kl_ref", ">", 0.12, window=2, name="kl"),
                                                   Threshold("entropy", "<", 0.2, window=2, name="entropy")),
                       plateau_window=3, plateau_delta=0.02, min_steps=5)

    straight_trigger = Trigger(spec)
    straight = run(straight_trigger, metrics)
    assert len(straight) >= 3  # the scenario exercises several conditions
    first = Trigger(spec)
    events = run(first, metrics[:cut])
    resumed = Trigger(spec)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # via the checkpoint's JSON
    events.update(run(resumed, metrics[cut:], start=cut + 1))
    assert events == straight and resumed.state_dict() == straight_trigger.state_dict()


def test_state_keeps_known_conditions_and_refuses_foreign_state():
    t = Trigger(TriggerSpec(thresholds=(KL,)))
    t.observe(1, {"kl_ref": 0.5})
    other = Trigger(TriggerSpec(thresholds=(Threshold("entropy", "<", 0.1),)))
    other.load_state_dict(t.state_dict())  # a condition turned on since starts at 0, one turned off is forgotten
    assert other.streaks == {"entropy": [0, 0]} and other.last_step == 1
    with pytest.raises(ValueError, match=r"missing keys \[.*'clock'.*\], unexpected keys \['bogus'\]"):
        t.load_state_dict({"bogus": 1})


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="after_steps: expected >= 1 or None, got 0"):
        TriggerSpec(after_steps=0)
    with pytest.raises(ValueError, match="need a finite bound and window >= 1"):
        Threshold("kl_ref", ">", 0.1, window=0)
    with pytest.raises(ValueError, match="op must be one of"):
        Threshold("kl_ref", ">=", 0.1)
    with pytest.raises(ValueError, match="names must be unique"):
        TriggerSpec(thresholds=(KL, KL))
