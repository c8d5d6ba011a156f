"""Generation that does not wait (rollout.overdraw > 0) in the real loop: the step ends when its
batch is full (the stragglers aborted and counted: tests/rollout/test_stream.py shows them cut);
a kill -9 mid-run resumes bit-identically."""

import pytest

from prorl_megatron.metrics import read_jsonl
from tests.train.conftest import kill_when, run, train_command
from tests.train.test_train_loop import metrics, ok

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("partial", [["rollout.partial=abort"], ["rollout.partial=resume", "rollout.max_staleness=1"]],
                         ids=["abort", "resume"])
def test_drawing_ahead_fills_the_batch_and_resumes_exactly_after_a_kill(tiny_base, tmp_path, partial):
    """``resume``: the groups in flight at a step's cut go on into the next step (saved with its
    checkpoint: the resumed run continues them as the straight one did)."""
    overrides = ["train.steps=3", "rollout.overdraw=1.0", "algo.max_prompts_per_step=24", "reset.after_steps=2",
                 *partial]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(run(train_command(straight, tiny_base, *overrides, "checkpoint.every_n_steps=3")))
    m = metrics(straight)
    steps = [m[(s, None)] for s in range(1, 4)]
    for r in steps:  # a full batch, or every prompt the step may draw drawn (and then nothing cut)
        kept, drawn, cut = r["sampling/kept_groups"], r["sampling/prompts"], r["sampling/aborted_groups"]
        assert kept <= 8 and drawn <= 24 and (kept == 8 or (drawn == 24 and cut == 0)), r
        if "rollout.partial=resume" in partial:
            assert cut == 0 and r["staleness/lag_max"] <= 1 and r["sampling/carried_groups"] >= 0, r

    command = train_command(killed, tiny_base, *overrides, "checkpoint.every_n_steps=1")
    jsonl = killed / "logs" / "metrics.jsonl"
    kill_when(command, lambda: jsonl.is_file() and any(r["step"] >= 2 for r in read_jsonl(jsonl)))
    ok(run(command))
    b = metrics(killed)
    for step in range(1, 4):
        same = {k: v for k, v in m[(step, None)].items() if not k.startswith("time/") and k != "tokens_per_s"}
        got = {k: v for k, v in b[(step, None)].items() if not k.startswith("time/") and k != "tokens_per_s"}
        assert got == same, step
