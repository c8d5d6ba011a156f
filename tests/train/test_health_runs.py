"""Health checks in real runs (tiny demo model, TP2 on CPU): warn, stop (exit status 4), rollback,
reset and next_stage."""

import json
import re

import pytest

from prorl_megatron.metrics import read_jsonl
from tests.train.conftest import ROOT, run, train_command

pytestmark = pytest.mark.slow


def records(run_dir):
    return read_jsonl(run_dir / "logs" / "metrics.jsonl")


def streak(meta, check):
    """A health check's streak [length, first step] in a checkpoint's loop state."""
    return meta["loop"]["control"]["health"][check]["streaks"][check]


def test_warn_continues_and_a_resumed_entropy_streak_stops_the_run(tiny_base, tmp_path):
    """The entropy floor is planted above the real entropy (~0.7): collapse after 3 steps. Run
    to step 2 (a KL warning on the way), resume: the streak goes on and stops the run at step 3."""
    checks = ["health.entropy_floor.threshold=100", "health.entropy_floor.window=3", "health.entropy_floor.action=stop",
              "health.kl_ref_ceiling.threshold=1e-9", "health.nonfinite=stop", "checkpoint.every_n_steps=0"]
    done = run(train_command(tmp_path, tiny_base, "train.steps=2", *checks))
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    # kl_ref is 0 at step 1 (reference = policy), above the ceiling at step 2: warned, and the run went on
    events = [(r["step"], r["check"], r["action"]) for r in records(tmp_path) if r.get("event") == "health"]
    assert events == [(2, "kl_ref_ceiling", "warn")]
    assert re.search(r"^step 2 \| reward .* \| ALARM kl_ref_ceiling$", text, re.M), text[-3000:]
    assert "health check kl_ref_ceiling -> warn: kl_ref " in text
    meta = json.loads((tmp_path / "ckpt" / "step_00000002" / "prorl_meta.json").read_text())
    assert streak(meta, "entropy_floor") == [2, 1]  # two low-entropy steps, since step 1

    done = run(train_command(tmp_path, tiny_base, "train.steps=4", *checks))
    text = done.stdout + done.stderr
    assert done.returncode != 0 and re.search(r"exitcode\s*:\s*4\b", text), text[-6000:]  # torchrun: the workers' 4
    assert re.search(r"health check entropy_floor: entropy \S+ < 100 for 3 consecutive steps \(since step 1\); "
                     r"checkpointed step 3 in \S+/ckpt", done.stderr), done.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    assert not (ckpt / "stopped").exists()  # not the signal stop: the job script does not requeue
    m = records(tmp_path)
    assert [r["step"] for r in m if "event" not in r] == [1, 2, 3]
    stop = [r for r in m if r.get("event") == "health" and r["check"] == "entropy_floor"]
    assert [(r["step"], r["action"], r["since"]) for r in stop] == [(3, "stop", 1)]


def test_rollback_redoes_the_bad_steps_with_other_seeds(tiny_base, tmp_path):
    """A bad stretch planted in a checkpoint, so that any CPU's numerics trip it alike: kl_ref is
    exactly 0 at step 1 (reference = policy) and above 1e-9 from step 2 on, and step 2's checkpoint
    is edited to say the run has been above that ceiling for 49 steps (window 50). Step 3 then
    trips it; the run goes back to the newest checkpoint before the stretch began (step 1's),
    redoes steps 2 and 3 with other seeds (its stretch now 2 steps long) and finishes."""
    checks = ["checkpoint.every_n_steps=1", "health.kl_ref_ceiling.threshold=1e-9", "health.kl_ref_ceiling.window=50",
              "health.kl_ref_ceiling.action=rollback", "health.max_rollbacks=1"]
    done = run(train_command(tmp_path, tiny_base, "train.steps=2", *checks))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    first = {r["step"]: r for r in records(tmp_path) if "event" not in r}
    assert first[1]["kl_ref"] == 0.0 and first[2]["kl_ref"] > 1e-9
    meta_file = tmp_path / "ckpt" / "step_00000002" / "prorl_meta.json"
    meta = json.loads(meta_file.read_text())
    assert streak(meta, "kl_ref_ceiling") == [1, 2]  # step 2: the first step above it
    streak(meta, "kl_ref_ceiling")[0] = 49
    meta_file.write_text(json.dumps(meta))

    done = run(train_command(tmp_path, tiny_base, "train.steps=4", *checks))
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    assert "health rollback 1 to the checkpoint of step 1 (steps [2, 3] discarded): kl_ref_ceiling: kl_ref" in text
    m = records(tmp_path)
    steps = [r for r in m if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # the discarded steps are not in the file twice
    assert [r["rollbacks"] for r in steps] == [0, 1, 1, 1]
    assert steps[1]["kl_ref"] != first[2]["kl_ref"]  # step 2 redone with other samples
    (back,) = [r for r in m if r.get("event") == "rollback"]
    assert (back["step"], back["alarm_step"], back["discarded"], back["rollbacks"]) == (1, 3, [2, 3], 1)
    (alarm,) = back["alarms"]
    assert (alarm["check"], alarm["action"], alarm["since"]) == ("kl_ref_ceiling", "rollback", 2)
    assert "for 50 consecutive steps (since step 2)" in alarm["message"]
    assert not [r for r in m if r.get("event") == "health"]  # the alarm's step was discarded with its events
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    meta = json.loads((ckpt / "step_00000004" / "prorl_meta.json").read_text())
    assert meta["loop"]["counters"]["rollbacks"] == 1
    assert streak(meta, "kl_ref_ceiling") == [3, 2]  # the redone stretch, under its window


def staged_run(tmp_path, tiny_base, second: str, *overrides: str):
    """The tiny recipe with stages 'first' and 'second' (``second``: its overrides; its own trigger,
    1000 steps, never fires), a reset every 3 steps and an entropy floor planted above any real
    entropy whose action is next_stage after 3 steps; returns the output, the records and the steps."""
    recipe = tmp_path / "staged.yaml"
    recipe.write_text((ROOT / "recipes/tiny_cpu.yaml").read_text() + f"""
stages:
  - name: first
  - name: second
    enter: {{after_steps: 1000}}
    overrides: {second}
""")
    command = train_command(tmp_path, tiny_base, "reset.after_steps=3", "health.entropy_floor.threshold=100",
                            "health.entropy_floor.window=3", "health.entropy_floor.action=next_stage", *overrides)
    command[command.index("recipes/tiny_cpu.yaml")] = str(recipe)
    done = run(command)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    m = records(tmp_path)
    return text, m, {r["step"]: r for r in m if "event" not in r}


def test_reset_and_next_stage_actions(tiny_base, tmp_path):
    """A KL ceiling planted at 1e-9 resets the reference at step 2 (kl_ref 0 at step 1); an entropy
    floor planted above the real entropy sends a staged run into its next stage after 3 steps,
    whose own trigger (1000 steps) would never fire. The health reset restarts the reset schedule
    (every 3 steps): no scheduled reset at step 3, one step after it."""
    text, m, steps = staged_run(tmp_path, tiny_base, "{algo.kl_coef: 0.05}", "train.steps=3",
                                "checkpoint.every_n_steps=0", "health.kl_ref_ceiling.threshold=1e-9",
                                "health.kl_ref_ceiling.action=reset")
    assert steps[2]["reset"] == 1 and steps[2]["health/kl_ref_ceiling"] == 1 and steps[2]["resets"] == 1
    assert steps[3]["kl_ref"] == 0.0  # the reference was the policy again
    assert [(r["step"], r["triggers"]) for r in m if r.get("event") == "reset"] == [(2, ["health"])]
    assert steps[3]["resets"] == 2  # the stage entry's
    entered = [r for r in m if r.get("event") == "stage" and r["index"] == 1]
    assert [(r["step"], r["stage"], r["triggers"]) for r in entered] == [(3, "second", ["health"])]
    assert "health check entropy_floor" in entered[0]["reason"]
    assert entered[0]["changed"] == {"algo.kl_coef": [0.01, 0.05]}
    assert "step 3: stage 1 'second' (health check entropy_floor" in text


def test_a_stage_entry_on_a_scheduled_reset_step_absorbs_it_with_the_stages_own_settings(tiny_base, tmp_path):
    """The scheduled reset (every 3 steps) and a health check's next_stage on step 3: the stage is
    entered once, the reset absorbed and said so; the entry's reset follows the entered stage's
    reset.reset_optimizer (false: Adam's state is kept, and the event says so), and the entered
    stage's checkpoint.every_n_steps (3, the first stage's 10) decides the step's checkpoint."""
    _, m, steps = staged_run(tmp_path, tiny_base, "{reset.reset_optimizer: false, checkpoint.every_n_steps: 3}",
                             "train.steps=4")
    (entered,) = [r for r in m if r.get("event") == "stage" and r["index"] == 1]
    assert (entered["step"], entered["triggers"], entered["optimizer_reset"]) == (3, ["health"], False)
    assert entered["absorbed"] == ["reset (every 3 steps (3 since the last reset))"]
    assert not [r for r in m if r.get("event") == "reset"]
    assert steps[3]["resets"] == 1 and steps[3]["stage"] == 0 and steps[4]["stage"] == 1
    assert steps[4]["kl_ref"] == 0.0  # the entry reset the reference
    meta = json.loads((tmp_path / "ckpt" / "step_00000003" / "prorl_meta.json").read_text())
    assert not meta["optimizer_empty"] and meta["loop"]["control"]["stage"]["name"] == "second"
