"""The cluster projection (bench/async_sim.py): the model's invariants, not its numbers.

Runs on a reduced recipe (32 prompts x 8 samples per step, 8 GPUs) so that the whole file takes
a few seconds; the lengths, hardware and training rates are the simulator's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest

from tests import procs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import async_sim as sim  # noqa: E402

STEPS, WARMUP = 6, 2
HEAVY = ("torch", "megatron", "vllm", "transformer_engine", "transformers")


def small(cap: int = 8192, seed: int = 0, hw: sim.Hardware | None = None, **work) -> sim.Config:
    """The 1.5B model and H100 defaults (or ``hw``) with a smaller batch on 8 GPUs."""
    recipe = sim.Recipe1p5b(n=8, prompts_per_step=32, max_rounds=4, max_prompt=1024, max_response=cap,
                            mem_util=0.5, engine_tp=1, bucket_bytes=256 << 20)
    return sim.Config(recipe=recipe, hw=hw or sim.Hardware(), work=sim.Workload(**work), total_gpus=8, seed=seed)


def run(setup: sim.Setup, cfg: sim.Config, record: bool = False) -> sim.Result:
    return sim.simulate(setup, cfg, STEPS, WARMUP, record=record)


SEPARATE = [sim.Setup("separate", 2, 6, 0), sim.Setup("separate", 2, 6, 1, "abort"),
            sim.Setup("separate", 4, 4, 1, "resume"), sim.Setup("separate", 4, 4, 2, "abort"),
            sim.Setup("separate", 2, 6, 2, "resume")]
ALL = [sim.Setup("sync", 8, 8), sim.Setup("stream", 8, 8), *SEPARATE]


def test_sum_max_linear_is_the_plain_sum():
    rng = random.Random(0)
    for _ in range(500):
        a0, b0 = rng.uniform(-5, 5), rng.uniform(-5, 5)
        a1, b1 = rng.choice([0.0, rng.uniform(-1, 1)]), rng.uniform(-1, 1)
        k = rng.randint(0, 40)
        plain = sum(max(a0 + a1 * j, b0 + b1 * j) for j in range(k))
        assert sim.sum_max_linear(a0, a1, b0, b1, k) == pytest.approx(plain, abs=1e-9)


def test_decode_steps_cost_more_with_batch_and_context_and_steps_within_inverts():
    cost = sim.DecodeCost.of(sim.Hardware(), sim.Model(), 1)
    assert cost.steps_time(64, 64 * 1000, 10) < cost.steps_time(128, 64 * 1000, 10)
    assert cost.steps_time(64, 64 * 1000, 10) < cost.steps_time(64, 64 * 3000, 10)
    # memory-bound at a small batch: 8 sequences cost almost what 1 does; the KV term grows with B x context
    assert cost.steps_time(8, 8 * 300, 1) < 1.1 * cost.steps_time(1, 300, 1)
    for b, ctx, seconds in [(32, 32 * 2000, 0.5), (400, 400 * 3000, 3.0), (1, 500, 0.01)]:
        k = cost.steps_within(b, ctx, seconds, 10 ** 6)
        assert cost.steps_time(b, ctx, k) <= seconds < cost.steps_time(b, ctx, k + 1)


def test_more_engines_never_slow_generation_down():
    """The same prompts spread over 2, 4, 8 engines (each engine's share a subset of the share
    it had with fewer engines): the round never takes longer."""
    cfg = small()
    stream = sim.PromptStream(cfg, seed=3)
    groups = [stream.take() for _ in range(64)]
    times = []
    for engines in (1, 2, 4, 8):
        s = sim.Simulation(sim.Setup("sync", engines, 8), cfg)
        for g in groups:
            g.reset()
        times.append(s.sync_round(groups, 0.0))
    assert times == sorted(times, reverse=True) and times[-1] < 0.5 * times[0], times
    # and over whole steps: a separate placement with more engine GPUs (trainer fixed) at k = 0
    steps = [run(sim.Setup("separate", g, 4, 0), dataclasses.replace(cfg, total_gpus=g + 4)).step_s for g in (2, 4, 8)]
    assert steps == sorted(steps, reverse=True), steps


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Seconds during which an interval of ``a`` and one of ``b`` both run."""
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def test_k0_separate_never_overlaps_generation_with_training():
    for cap in (8192, 16384):
        r = run(sim.Setup("separate", 2, 6, 0), small(cap), record=True)
        engines = [i for e in r.timeline["engines"] for i in e]
        assert engines and r.timeline["trainer"]
        assert overlap(engines, r.timeline["trainer"]) < 1e-6
    r = run(sim.Setup("separate", 2, 6, 1, "resume"), small(), record=True)  # the check can see an overlap
    assert overlap([i for e in r.timeline["engines"] for i in e], r.timeline["trainer"]) > 1.0


@pytest.mark.parametrize("cap", [8192, 16384])
def test_streaming_is_not_slower_than_sync_on_the_same_gpus(cap):
    for seed in (0, 1):
        cfg = small(cap, seed)
        sync, stream = run(sim.Setup("sync", 8, 8), cfg), run(sim.Setup("stream", 8, 8), cfg)
        assert stream.step_s <= sync.step_s, (cap, seed, stream.step_s, sync.step_s)
        assert stream.samples_per_s >= sync.samples_per_s


def test_every_finished_sample_is_accounted_for_and_each_group_trained_once():
    for setup in ALL:
        r = run(setup, small(), record=True)
        c = r.counters
        accounted = (c["trained_samples"] + c["filtered_samples"] + c["stale_samples"] - c["stale_unfinished"]
                     + c["discarded_samples"] + c["surplus_samples"] + c["pending_samples"])
        assert c["finished_samples"] == accounted, (setup.label(), c)
        gids = [gid for gid, _ in r.trained_groups]
        assert len(gids) == len(set(gids)) and len(gids) * 8 == c["trained_samples"], setup.label()
        assert c["trained_samples"] <= c["finished_samples"]
        if setup.mode == "sync":
            assert c["aborted_tokens"] == c["stale_samples"] == 0
        if setup.colocated:  # the same GPUs: generating and training never add up to more than the time
            assert r.engine_busy + r.trainer_busy <= 1.0 + 1e-9


def test_no_trained_group_is_older_than_k():
    for setup in SEPARATE + [sim.Setup("stream", 8, 8)]:
        r = run(setup, small(16384), record=True)
        assert max(age for _, age in r.trained_groups) <= setup.k, setup.label()
        if setup.k == 0:
            assert r.counters["stale_samples"] == 0


def test_a_faster_link_shortens_the_weight_sync_and_the_step():
    slow, fast = (dataclasses.replace(sim.Hardware(), link_gbps=g) for g in (10.0, 400.0))
    assert sim.broadcast_seconds(small(hw=slow)) > sim.broadcast_seconds(small(hw=fast)) > 0
    a, b = (run(sim.Setup("separate", 2, 6, 0), small(hw=h)) for h in (slow, fast))
    assert a.sync_s > b.sync_s and a.step_s > b.step_s


def test_runs_are_deterministic_and_the_seed_matters():
    setup = sim.Setup("separate", 4, 4, 1, "abort")
    a, b, c = run(setup, small(seed=5)), run(setup, small(seed=5)), run(setup, small(seed=6))
    assert dataclasses.asdict(a) == dataclasses.asdict(b)
    assert a.step_s != c.step_s


def test_command_line_prints_json_without_loading_an_engine():
    """The CLI on the real recipe's 16k stage (a recipe override makes it quick): JSON out, and
    neither torch, megatron nor vLLM imported (``-X importtime`` lists every module loaded)."""
    done = procs.run([sys.executable, "-X", "importtime", str(ROOT / "bench" / "async_sim.py"), "--stage", "16k",
                      "--json", "--steps", "3", "--warmup", "1", "--splits", "8", "--ks", "1",
                      "train.prompts_per_step=64"], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["stage"] == "16k" and out["config"]["recipe"]["max_response"] == 16384
    assert out["config"]["recipe"]["prompts_per_step"] == 64
    assert [r["label"] for r in out["results"]] == ["colocated sync", "colocated stream", "separate k=1 abort",
                                                    "separate k=1 resume"]
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "numpy" in loaded and not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
