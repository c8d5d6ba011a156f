import math
import random

import pytest

from prorl_megatron.algo.reset import ResetScheduler


def run(scheduler, metrics_per_step, start=1):
    events = {}
    for step, metrics in enumerate(metrics_per_step, start=start):
        event = scheduler.observe(step, metrics)
        if event is not None:
            events[step] = event
    return events


def test_periodic_trigger():
    events = run(ResetScheduler(every_n_steps=5), [{}] * 17)
    assert list(events) == [5, 10, 15]
    assert events[5].triggers == ("periodic",)
    assert "every 5 steps" in events[5].reason


def test_kl_trigger_needs_consecutive_steps():
    kls = [0.01, 0.2, 0.3, 0.05, 0.2, 0.2, 0.2, 0.01, 0.2]
    events = run(ResetScheduler(kl_threshold=0.1, kl_window=3), [{"kl": v} for v in kls])
    assert list(events) == [7]
    assert events[7].triggers == ("kl",)
    assert "0.2 > 0.1 for 3 consecutive steps" in events[7].reason


def test_kl_trigger_requires_the_metric():
    with pytest.raises(ValueError, match="the KL trigger needs 'kl'"):
        ResetScheduler(kl_threshold=0.1).observe(1, {"reward": 1.0})


def test_plateau_trigger_counts_evaluations_not_steps():
    metrics = [{} for _ in range(30)]
    vals = {5: 0.30, 10: 0.40, 15: 0.405, 20: 0.39, 25: 0.50, 30: 0.49}
    for step, v in vals.items():
        metrics[step - 1]["val_reward"] = v
    events = run(ResetScheduler(plateau_window=2, plateau_delta=0.01), metrics)
    # best 0.40 at 10; 15 (+0.005 <= delta) and 20 stale -> reset at 20
    assert list(events) == [20]
    assert events[20].triggers == ("plateau",)
    assert "for 2 evaluations" in events[20].reason


def test_min_gap_holds_triggers_back_and_they_stay_armed():
    kls = [0.5] * 12
    events = run(ResetScheduler(kl_threshold=0.1, kl_window=1, min_gap_steps=4), [{"kl": v} for v in kls])
    assert list(events) == [4, 8, 12]


def test_combined_triggers_name_every_reason():
    sched = ResetScheduler(every_n_steps=3, kl_threshold=0.1)
    events = run(sched, [{"kl": 0.0}, {"kl": 0.0}, {"kl": 0.9}])
    assert events[3].triggers == ("periodic", "kl")
    assert "every 3 steps" in events[3].reason and "KL to the reference" in events[3].reason
    assert sched.num_resets == 1


def test_no_trigger_never_resets():
    assert run(ResetScheduler(), [{"kl": 100.0, "val_reward": 0.0}] * 50) == {}


def test_steps_must_increase():
    sched = ResetScheduler(every_n_steps=2)
    sched.observe(3, {})
    with pytest.raises(ValueError, match="step: expected a step after 3, got 3"):
        sched.observe(3, {})


def test_nan_kl_breaks_a_streak():
    events = run(ResetScheduler(kl_threshold=0.1, kl_window=2), [{"kl": 0.5}, {"kl": math.nan}, {"kl": 0.5}])
    assert events == {}


@pytest.mark.parametrize("cut", [1, 7, 13, 22, 39])
def test_resume_equivalence(cut):
    rng = random.Random(cut)
    metrics = []
    for step in range(1, 61):
        m = {"kl": rng.uniform(0, 0.2)}
        if step % 4 == 0:
            m["val_reward"] = rng.uniform(0.2, 0.6)
        metrics.append(m)
    settings = dict(every_n_steps=17, kl_threshold=0.12, kl_window=2, plateau_window=3,
                    plateau_delta=0.02, min_gap_steps=5)
    straight = run(ResetScheduler(**settings), metrics)
    assert len(straight) >= 3  # the scenario exercises several triggers

    first = ResetScheduler(**settings)
    events = run(first, metrics[:cut])
    state = first.state_dict()
    resumed = ResetScheduler(**settings)
    resumed.load_state_dict(state)
    events.update(run(resumed, metrics[cut:], start=cut + 1))
    assert events == straight
    assert resumed.state_dict() == run_state(settings, metrics)


def run_state(settings, metrics):
    sched = ResetScheduler(**settings)
    run(sched, metrics)
    return sched.state_dict()


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match=r"missing keys \[.*'kl_streak'.*\], unexpected keys \['bogus'\]"):
        ResetScheduler().load_state_dict({"bogus": 1})


def test_constructor_errors():
    with pytest.raises(ValueError, match="every_n_steps: expected >= 1 or None, got 0"):
        ResetScheduler(every_n_steps=0)
    with pytest.raises(ValueError, match="kl_window: expected >= 1, got 0"):
        ResetScheduler(kl_window=0)


def test_entropy_floor_needs_consecutive_steps_and_a_missing_value_breaks_the_streak():
    entropies = [0.9, 0.4, 0.3, None, 0.2, 0.1, 0.05, 0.6]
    metrics = [{} if e is None else {"entropy": e} for e in entropies]
    events = run(ResetScheduler(entropy_floor=0.5, entropy_window=3), metrics)
    assert list(events) == [7]
    assert events[7].triggers == ("entropy",)
    assert "entropy 0.05 < 0.5 for 3 consecutive steps" in events[7].reason


def test_start_step_counts_from_there_and_restart_rearms():
    sched = ResetScheduler(every_n_steps=3, start_step=10)
    events = run(sched, [{}] * 5, start=11)
    assert list(events) == [13] and events[13].reason == "every 3 steps (3 since the last reset)"
    sched.restart(15)  # a reset decided elsewhere (a stage change)
    assert list(run(sched, [{}] * 4, start=16)) == [18]


def test_state_without_the_entropy_streak_still_loads():
    sched = ResetScheduler(entropy_floor=1.0)
    state = sched.state_dict()
    del state["entropy_streak"]  # a checkpoint written before the trigger existed
    sched.load_state_dict(state)
    assert sched.entropy_streak == 0
