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
    assert meta["loop"]["health"]["streaks"]["entropy_floor"] == [2, 1]  # two low-entropy steps, since step 1

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
    assert meta["loop"]["health"]["streaks"]["kl_ref_ceiling"] == [1, 2]  # step 2: the first step above it
    meta["loop"]["health"]["streaks"]["kl_ref_ceiling"] = [49, 2]
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
    assert meta["loop"]["health"]["streaks"]["kl_ref_ceiling"] == [3, 2]  # the redone stretch, under its window


def test_reset_and_next_stage_actions(tiny_base, tmp_path):
    """A KL ceiling planted at 1e-9 resets the reference at step 2 (kl_ref 0 at step 1); an entropy
    floor planted above the real entropy sends a staged run into its next stage after 3 steps,
    whose own trigger (1000 steps) would never fire."""
    recipe = tmp_path / "staged.yaml"
    recipe.write_text((ROOT / "recipes/tiny_cpu.yaml").read_text() + """
stages:
  - name: first
  - name: second
    enter: {after_steps: 1000}
    overrides: {algo.kl_coef: 0.05}
""")
    command = train_command(tmp_path, tiny_base, "train.steps=3", "checkpoint.every_n_steps=0",
                            "health.kl_ref_ceiling.threshold=1e-9", "health.kl_ref_ceiling.action=reset",
                            "health.entropy_floor.threshold=100", "health.entropy_floor.window=3",
                            "health.entropy_floor.action=next_stage")
    command[command.index("recipes/tiny_cpu.yaml")] = str(recipe)
    done = run(command)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    m = records(tmp_path)
    steps = {r["step"]: r for r in m if "event" not in r}
    assert steps[2]["reset"] == 1 and steps[2]["health/kl_ref_ceiling"] == 1 and steps[2]["resets"] == 1
    assert steps[3]["kl_ref"] == 0.0  # the reference was the policy again
    entered = [r for r in m if r.get("event") == "stage" and r["index"] == 1]
    assert [(r["step"], r["stage"], r["triggers"]) for r in entered] == [(3, "second", ["health"])]
    assert "health check entropy_floor" in entered[0]["reason"]
    assert entered[0]["changed"] == {"algo.kl_coef": [0.01, 0.05]}
    assert "step 3: stage 1 'second' (health check entropy_floor" in text
