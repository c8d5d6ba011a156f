"""The health watcher on synthetic metric streams, and the recipe's ``health:`` section."""

import json
import math
from pathlib import Path

import pytest

from prorl_megatron import config as C
from prorl_megatron.health import CHECKS, HealthWatcher, Limit

ROOT = Path(__file__).resolve().parents[1]


def feed(watcher, stream, start=1):
    """{step: [check names that fired]} for a list of per-step metric dicts."""
    return {step: [a.check for a in watcher.observe(step, m)] for step, m in enumerate(stream, start)}


def test_every_check_is_off_by_default():
    w = HealthWatcher()
    assert not w.enabled
    bad = {"entropy": 0.0, "kl_ref": 1e9, "approx_kl": 1e9, "mismatch_mean": 1e9, "reward/mean": 0.0,
           "response_length/truncated_frac": 1.0, "loss": float("nan")}
    assert feed(w, [bad] * 5) == {s: [] for s in range(1, 6)}
    h = C.Recipe().health
    assert all(getattr(h, name).threshold is None for name in CHECKS) and h.nonfinite is None


def test_entropy_floor_trips_after_k_consecutive_steps_and_counts_afresh():
    w = HealthWatcher(entropy_floor=Limit(0.1, window=3, action="stop"))
    entropy = [0.5, 0.05, 0.05, 0.2, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.1]
    fired = feed(w, [{"entropy": e} for e in entropy])
    assert [s for s, names in fired.items() if names] == [7, 10]  # a good step (4) breaks the streak
    w2 = HealthWatcher(entropy_floor=Limit(0.1, window=3, action="stop"))
    alarms = [a for s, e in enumerate(entropy, 1) for a in w2.observe(s, {"entropy": e})]
    first = alarms[0]
    assert (first.step, first.check, first.action, first.since) == (7, "entropy_floor", "stop", 5)
    assert first.message == "entropy 0.05 < 0.1 for 3 consecutive steps (since step 5)"
    assert alarms[1].since == 8
    assert w2.observe(12, {"entropy": 0.1}) == []  # at the floor is not below it


@pytest.mark.parametrize("check,metric", [("kl_ref_ceiling", "kl_ref"), ("approx_kl_ceiling", "approx_kl"),
                                          ("mismatch_ceiling", "mismatch_mean"),
                                          ("truncated_ceiling", "response_length/truncated_frac")])
def test_ceilings_trip_above_the_threshold_only(check, metric):
    w = HealthWatcher(**{check: Limit(0.3, action="reset")})
    fired = feed(w, [{metric: v} for v in (0.1, 0.3, 0.31, 0.2, 5.0, math.inf)])
    assert fired == {1: [], 2: [], 3: [check], 4: [], 5: [check], 6: [check]}  # +inf is above any ceiling
    alarm = HealthWatcher(**{check: Limit(0.3, action="reset")}).observe(1, {metric: 0.5})[0]
    assert alarm.action == "reset" and alarm.since == 1 and alarm.message == f"{metric} 0.5 > 0.3"


def test_reward_floor_needs_every_domain_at_zero():
    w = HealthWatcher(reward_floor=Limit(0.0, window=2, action="rollback"))
    zero = {"reward/mean": 0.0, "reward/mean/math": 0.0, "reward/mean/code": 0.0, "reward/shaped_mean": 0.7}
    one_domain_alive = {**zero, "reward/mean": 0.01, "reward/mean/code": 0.02}
    fired = feed(w, [zero, one_domain_alive, zero, zero, {**zero, "reward/mean/code": 0.5}, zero])
    assert fired == {1: [], 2: [], 3: [], 4: ["reward_floor"], 5: [], 6: []}
    assert "reward/mean 0, reward/mean/code 0, reward/mean/math 0 <= 0" in \
        HealthWatcher(reward_floor=Limit(0.0)).observe(1, zero)[0].message


def test_missing_or_nan_metrics_neither_extend_nor_break_a_streak():
    w = HealthWatcher(entropy_floor=Limit(0.1, window=3))
    stream = [{"entropy": 0.0}, {}, {"entropy": float("nan")}, {"entropy": 0.0}, {"reward/mean": 1.0}, {"entropy": 0.0}]
    fired = feed(w, stream)
    assert fired[6] == ["entropy_floor"] and not any(fired[s] for s in range(1, 6))
    assert HealthWatcher(entropy_floor=Limit(0.1, window=3)).observe(1, {"entropy": 0.0}) == []


def test_nonfinite_values_anywhere_raise_an_alarm_naming_them():
    w = HealthWatcher(nonfinite="stop", entropy_floor=Limit(0.1))
    ok = {"loss": 0.1, "updates": 2, "reset": True, "note": "text", "val/pass@1": 0.5}
    assert w.observe(1, ok) == []
    alarms = w.observe(2, {**ok, "loss": float("nan"), "grad_norm": -math.inf, "entropy": float("nan")})
    assert [(a.check, a.action, a.since) for a in alarms] == [("nonfinite", "stop", 2)]
    assert alarms[0].message == "non-finite metrics: entropy=nan, grad_norm=-inf, loss=nan"
    many = {f"m{i}": float("nan") for i in range(7)}
    assert w.observe(3, many)[0].message.endswith("m4=nan and 2 more")


def test_state_round_trip_continues_the_same_streaks():
    def watcher():
        return HealthWatcher(entropy_floor=Limit(0.1, window=4), kl_ref_ceiling=Limit(1.0, window=2))

    a = watcher()
    feed(a, [{"entropy": 0.0, "kl_ref": 2.0}, {"entropy": 0.0, "kl_ref": 0.0}, {"entropy": 0.0, "kl_ref": 2.0}])
    state = json.loads(json.dumps(a.state_dict()))  # it goes into the checkpoint's JSON meta
    assert state == {"last_step": 3, "streaks": {"entropy_floor": [3, 1], "kl_ref_ceiling": [1, 3]}}
    b = watcher()
    b.load_state_dict(state)
    alarms = b.observe(4, {"entropy": 0.0, "kl_ref": 2.0})
    assert [(x.check, x.since) for x in alarms] == [("entropy_floor", 1), ("kl_ref_ceiling", 3)]
    assert alarms == a.observe(4, {"entropy": 0.0, "kl_ref": 2.0})
    with pytest.raises(ValueError, match="expected a step after 4"):
        b.observe(4, {})
    # a resumed recipe that turns a check on starts it at 0 and forgets the ones it turned off
    c = HealthWatcher(truncated_ceiling=Limit(0.5))
    c.load_state_dict(state)
    assert c.state_dict() == {"last_step": 3, "streaks": {"truncated_ceiling": [0, 0]}}
    with pytest.raises(ValueError, match="missing keys"):
        c.load_state_dict({"streaks": {}})


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown health checks.*entropy_flor"):
        HealthWatcher(entropy_flor=Limit(0.1))
    with pytest.raises(ValueError, match="window >= 1"):
        HealthWatcher(entropy_floor=Limit(0.1, window=0))
    with pytest.raises(ValueError, match="action"):
        HealthWatcher(nonfinite="halt")
    assert not HealthWatcher(entropy_floor=Limit(None, action="stop")).enabled  # off: nothing checked


def recipe(*overrides):
    return C.load_recipe(ROOT / "recipes/tiny_cpu.yaml", list(overrides))


def test_recipe_health_section_loads_and_validates():
    r = recipe("health.entropy_floor.threshold=0.05", "health.entropy_floor.window=5",
               "health.entropy_floor.action=rollback", "health.nonfinite=stop")
    assert r.health.entropy_floor == C.HealthCheck(0.05, 5, "rollback") and r.health.nonfinite == "stop"
    w = HealthWatcher(r.health.nonfinite, **{c: getattr(r.health, c) for c in CHECKS})  # as train.setup builds it
    assert w.enabled and list(w.limits) == ["entropy_floor"]
    bad = {
        "health.entropy_floor.threshold=-1": "health.entropy_floor.threshold must be > 0",
        "health.kl_ref_ceiling.threshold=0": "health.kl_ref_ceiling.threshold must be > 0",
        "health.truncated_ceiling.threshold=1.0": "must be in [0, 1)",
        "health.reward_floor.window=0": "health.reward_floor.window must be >= 1",
        "health.max_rollbacks=-1": "health.max_rollbacks must be >= 0",
        "health.mismatch_ceiling.threshold=.inf": "health.mismatch_ceiling.threshold must be finite",
    }
    for override, message in bad.items():
        with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
            recipe(override)
    with pytest.raises(C.ConfigError, match=r"health.reward_floor, health.nonfinite: action rollback goes back to a "
                                            r"checkpoint: set checkpoint.every_n_steps > 0"):
        recipe("checkpoint.every_n_steps=0", "health.reward_floor.threshold=0", "health.reward_floor.action=rollback",
               "health.nonfinite=rollback")
    with pytest.raises(C.ConfigError, match="did you mean 'health.entropy_floor'"):
        recipe("health.entropy_flor.threshold=0.1")
    with pytest.raises(C.ConfigError, match="expected one of 'warn', 'reset', 'next_stage', 'stop', 'rollback'"):
        recipe("health.kl_ref_ceiling.action=skip")
    with pytest.raises(C.ConfigError, match="health.kl_ref_ceiling: action next_stage needs a stages: list"):
        recipe("health.kl_ref_ceiling.threshold=0.5", "health.kl_ref_ceiling.action=next_stage")
