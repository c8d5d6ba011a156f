"""Metrics files, pass@k tables and the plot tool (no model needed)."""

import json
import sys

from prorl_megatron.eval import pass_at_k_table
from prorl_megatron.metrics import MetricsWriter, read_jsonl
from tests import procs
from tests.train.conftest import ROOT


def test_resume_drops_the_lost_steps_and_keeps_one_history(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3):
        w.write(step, {"reward/mean": step / 10})
    w.event(2, "reset", reason="every 2 steps")
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')  # torn line of a killed run
    w = MetricsWriter(tmp_path, enabled=True, resume_step=2)  # the checkpoint was at step 2
    w.write(3, {"reward/mean": 0.33, "bad": float("nan")})
    w.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("event")) for r in records] == [(1, None), (2, None), (2, "reset"), (3, None)]
    assert records[-1]["reward/mean"] == 0.33 and records[-1]["bad"] == "nan"


def test_pass_at_k_table_per_domain():
    table = pass_at_k_table(["math", "math", "logic"], [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], [1, 4])
    assert table["math/pass@1"] == 0.125 and table["math/pass@4"] == 0.5
    assert table["logic/pass@1"] == 1.0
    assert abs(table["pass@1"] - (0.25 + 0 + 1) / 3) < 1e-12 and abs(table["pass@4"] - 2 / 3) < 1e-12


def test_plot_marks_resets_and_summarises(tmp_path):
    lines = [{"step": 0, "val/pass@1": 0.1, "val/pass@8": 0.3}]
    lines += [{"step": s, "reward/mean": 0.1 + s / 100, "kl_ref": 0.01 * (s % 5)} for s in range(1, 11)]
    lines += [{"step": 5, "event": "reset", "reason": "every 5 steps"}, {"step": 10, "val/pass@1": 0.25, "val/pass@8": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = procs.run([sys.executable, str(ROOT / "tools" / "plot.py"), str(tmp_path)], timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pass@1: 0.100 (step 0) -> 0.250 (step 10)  x2.50" in out.stdout
    assert "resets: 1 at steps [5]" in out.stdout
    assert (tmp_path / "plots" / "kl.png").stat().st_size > 1000


def test_stop_signal_lead_covers_the_longest_uninterruptible_span():
    from prorl_megatron.metrics import stop_signal_lead_s

    step = {"time/step": 1, "time/rollout": 500.0, "time/reward": 40.0, "time/logprob": 90.0, "time/update": 300.0,
            "time/sync": 10.0, "time/eval": 0.0, "time/checkpoint": 30.0}
    # 16k-token steps: rollout + reward 540 s > the rest 400 s; + 30 s checkpoint; x1.5 = 855 s -> 900
    assert stop_signal_lead_s([{"step": 1, **step}, {"step": 1, "event": "reset"}]) == 900
    eval_step = {**step, "time/eval": 600.0}  # an eval step: the rest (1000 s) is the longer span
    assert stop_signal_lead_s([{"step": 2, **step}, {"step": 3, **eval_step}]) == 60 * 26  # 1.5 x 1030 = 1545
    assert stop_signal_lead_s([{"step": 1, "time/step": 2.0, "time/rollout": 1.0}]) == 300  # the floor
    assert stop_signal_lead_s([]) == 300


def test_a_rollback_discards_the_later_steps_records(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        w.write(step, {"reward/mean": step / 10})
    w.event(3, "health", check="kl_ref_ceiling")
    w.discard_after(2)  # a rollback to the checkpoint of step 2
    w.event(2, "rollback", discarded=[3, 4])
    w.write(3, {"reward/mean": 0.33})
    w.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("event")) for r in records] == [(1, None), (2, None), (2, "rollback"), (3, None)]
    assert records[-1]["reward/mean"] == 0.33
