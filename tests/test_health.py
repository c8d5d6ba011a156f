"""The recipe's ``health:`` section: how it loads and what it refuses (the checks themselves are
tests/control/test_decide.py's and tests/algo/test_triggers.py's)."""

from pathlib import Path

import pytest

from prorl_megatron import config as C
from prorl_megatron.control.decide import Controller

ROOT = Path(__file__).resolve().parents[1]


def recipe(*overrides):
    return C.load_recipe(ROOT / "recipes/tiny_cpu.yaml", list(overrides))


def test_recipe_health_section_loads_and_validates():
    r = recipe("health.entropy_floor.threshold=0.05", "health.entropy_floor.window=5",
               "health.entropy_floor.action=rollback", "health.nonfinite=stop")
    assert r.health.entropy_floor == C.HealthCheck(0.05, 5, "rollback") and r.health.nonfinite == "stop"
    control = Controller([r])  # as train.setup builds it
    assert list(control.health) == ["entropy_floor"] and control.nonfinite == "stop"
    assert all(getattr(C.Recipe().health, name).threshold is None for name in C.HEALTH_CHECKS)
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
