"""The GPU check's replay source (prorl_megatron/replay.py): its file, its synthetic set, and a
replay through the trainer's own phases that a restart reproduces bit for bit on CPU."""

import json
import statistics

import pytest

from prorl_megatron.checkpoint.hf_io import CheckpointError
from prorl_megatron.config import Recipe
from prorl_megatron.control.decide import Controller
from prorl_megatron.data.dataset import PromptMixture
from prorl_megatron.data.schema import PromptRow
from prorl_megatron.loop import LoopState, Run, Sampler, load_loop_state
from prorl_megatron.metrics import read_jsonl
from prorl_megatron.replay import Recorder, ReplayError, load_steps, save_steps, synthetic_steps
from prorl_megatron.rollout.batch import Sample
from tests import procs
from tests.megatron.tiny_models import make_tiny_hf

ROOT = procs.ROOT
RECORDED = ROOT / "data" / "replay" / "tiny_cpu.jsonl"


def test_a_replay_file_gives_back_exactly_what_was_written_and_a_redone_step_reads_as_its_last(tmp_path):
    steps = synthetic_steps(2, 2, 3, 500, response_median=20, max_response=40, prompt_median=5, max_prompt=10, seed=1)
    save_steps(tmp_path / "a.jsonl", steps, "test")
    assert load_steps(tmp_path / "a.jsonl") == steps  # logprobs too, to the bit

    record = Recorder(tmp_path / "sub" / "b.jsonl", "test")
    redone = [Sample([1, 2], [3], [-0.25], 1.0, False, "code", 0, info={"dropped": True})]
    for step, samples in ((1, steps[1]), (2, steps[2]), (2, redone)):  # step 2 redone (a rollback)
        record(step, samples)
    back = load_steps(tmp_path / "sub" / "b.jsonl")
    assert back[1] == steps[1] and back[2] == [Sample([1, 2], [3], [-0.25], 1.0, False, "code", 0)]

    (tmp_path / "c.jsonl").write_text('{"step": 1, "samples": []}\n')
    with pytest.raises(ReplayError, match="not a replay file"):
        load_steps(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text(json.dumps({"format": "prorl-replay", "version": 1, "source": ""}) + "\n{oops\n")
    with pytest.raises(ReplayError, match="line 2"):
        load_steps(tmp_path / "d.jsonl")


def test_the_synthetic_set_is_shaped_like_r1_rollouts_with_a_signal_in_every_group():
    steps = synthetic_steps(3, 4, 8, 151936, seed=0)
    assert steps == synthetic_steps(3, 4, 8, 151936, seed=0) != synthetic_steps(3, 4, 8, 151936, seed=1)
    every = [s for samples in steps.values() for s in samples]
    lengths = [len(s.response_ids) for s in every]
    assert 3000 < statistics.median(lengths) < 5500 and max(lengths) == 8192 and min(lengths) >= 8
    for samples in steps.values():
        assert len(samples) == 32 and samples[0].truncated and len(samples[0].response_ids) == 8192
        for g in range(4):
            group = [s for s in samples if s.group == g]
            assert len(group) == 8 and {s.reward for s in group} == {0.0, 1.0}
            assert all(s.prompt_ids == group[0].prompt_ids for s in group) and 8 <= len(group[0].prompt_ids) <= 1024
    assert all(s.reward == 0.0 for s in every if s.truncated) and all(s.truncated == (len(s.response_ids) == 8192)
                                                                     for s in every)
    assert all(1 <= t < 151936 for s in every for t in s.prompt_ids + s.response_ids)
    assert all(len(s.rollout_logprobs) == len(s.response_ids) and max(s.rollout_logprobs) <= 0 for s in every)


def test_the_recorded_demo_steps_load_as_samples_of_groups_with_a_signal():
    steps = load_steps(RECORDED)
    assert sorted(steps) == [1, 2, 3, 4, 5]
    for samples in steps.values():
        groups = sorted({s.group for s in samples})
        assert groups == list(range(len(groups))) and len(samples) == 8 * len(groups)
        for g in groups:  # dynamic sampling kept only groups whose rewards differ
            assert len({s.reward for s in samples if s.group == g}) > 1


def test_a_training_run_refuses_a_checkpoint_of_the_replay():
    rows = [PromptRow(domain="math", prompt="1+1=", ground_truth={"answer": "2"}, id="1")]
    run = Run(trainer=None, sampler=Sampler(engine=None, pool=None, mixture=PromptMixture(rows), encode=None),
              state=LoopState(control=Controller([Recipe()])), writer=None, progress=None)
    loop = {"control": Controller([Recipe()]).state_dict(), "data": None, "counters": {}, "last_val_reward": None}
    with pytest.raises(CheckpointError, match="replay"):
        load_loop_state(run, loop)


STAGES = ("stages=[{name: first}, {name: second, enter: {after_steps: 4}, "
          "overrides: {train.lr: 1.0e-4, algo.kl_coef: 0.05}}]")


def replay_command(hf, run_dir, dtype, layout, *extra):
    return procs.torchrun_command(
        2, "-m", "prorl_megatron.replay", "run", "--samples", RECORDED, "--recipe", "recipes/tiny_cpu.yaml", *extra,
        f"model.hf_path={hf}", f"precision.params_dtype={dtype}", *layout, f"checkpoint.dir={run_dir}/ckpt",
        f"logging.dir={run_dir}/logs", "checkpoint.every_n_steps=2", "checkpoint.keep_last=3", "reset.after_steps=2",
        "train.mini_batch_prompts=4", "train.max_tokens_per_micro_batch=64", STAGES)


def records(run_dir):
    return {(r["step"], r.get("event", "")): {k: v for k, v in r.items() if not k.startswith("time/")
                                              and k != "tokens_per_s"}
            for r in read_jsonl(run_dir / "logs" / "metrics.jsonl")}


def test_a_restart_from_the_checkpoint_of_step_2_replays_steps_3_to_5_bit_for_bit(tmp_path, dtype="float16",
                                                                                  layout=("parallel.tensor=2",)):
    """5 recorded steps through the trainer's phases in fp16 over TP2 (megatron's loss scaler, the
    plain optimizer): a scheduled reset after step 2 (checkpoint 2, an empty optimizer), a stage
    entry after step 4 that changes train.lr and algo.kl_coef (the reset due then is absorbed;
    checkpoint 4), step 5 in the new stage. A fresh launch restores step 2's checkpoint and replays
    steps 3-5: every metric and event the same. (bf16 over DP2 with the DistributedOptimizer: the
    same check in tests/test_gpu_check.py, the GPU check's CPU smoke; one test each keeps the
    suite's time down.)"""
    hf = make_tiny_hf("qwen2_untied", tmp_path / "hf", num_layers=2)
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    env = procs.child_env()
    done = procs.run(replay_command(hf, straight, dtype, layout), timeout=300, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    ckpt = straight / "ckpt" / "step_00000002"
    done = procs.run(replay_command(hf, restarted, dtype, layout, "--restart-from", ckpt), timeout=300, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]

    a, b = records(straight), records(restarted)
    assert sorted(b) == [(3, ""), (4, ""), (4, "stage"), (5, "")]
    for key in b:
        assert b[key] == a[key], key
    assert [s for s, e in a if e == "reset"] == [2]
    stage = a[(4, "stage")]
    assert stage["changed"] == {"algo.kl_coef": [0.01, 0.05], "train.lr": [0.0003, 0.0001]}
    assert not stage["engine_rebuilt"] and stage["absorbed"] == ["reset (every 2 steps (2 since the last reset))"]
    assert a[(4, "")]["lr"] == 3e-4 and a[(5, "")]["lr"] == 1e-4 and a[(5, "")]["stage"] == 1
    assert a[(3, "")]["kl_ref"] == 0.0 == a[(5, "")]["kl_ref"] and a[(2, "")]["kl_ref"] > 0 and a[(4, "")]["kl_ref"] > 0
    assert a[(5, "")]["resets"] == 2 and all(a[(s, "")]["updates"] == 2 for s in (1, 2, 3))
    meta = json.loads((ckpt / "prorl_meta.json").read_text())
    assert meta["optimizer_empty"] and meta["loop"]["data"] is None and meta["step"] == 2
    assert all("loss_scale" in a[(s, "")] for s in range(1, 6))
