"""The step stream (prorl_megatron/rollout/stream.py) on a real vLLM engine under torchrun.

    torchrun --nproc_per_node 2 tests/rollout/stream_worker.py HF_DIR ENGINE_TP

Prompts are drawn from a fixed list; a group's reward per sample is the parity of its response's
first token (a verifier stand-in whose groups carry signal about half the time). Checks:

- waves (no drawing ahead): the samples of every wave are exactly what ``generate_global``
  gives for that round with the rounds' seeds, the batch is the first groups with signal in draw
  order, every drawn group completes;
- drawing ahead: the batch is full, its groups are the first with signal to complete, every
  slot is used once, what was in flight at the end is aborted and counted, and a second stream
  for the same step samples exactly the same (the step's stream is deterministic);
- carrying on (``partial: resume``): what was in flight goes into the next step's stream as far
  as it got (each token tagged with its version), continues from there, completes with tokens of
  both versions; the next step is as deterministic, and a group too stale is not carried.
Reports ``OK rank R``.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field, replace

import torch.distributed as dist

from prorl_megatron.config import PrecisionConfig, RolloutConfig
from prorl_megatron.metrics import PhaseTimer
from prorl_megatron.parallel import init_parallel
from prorl_megatron.rollout.engine import RolloutEngine
from prorl_megatron.rollout.stream import StepStream, StreamSettings
from prorl_megatron.seeds import request_seed
from tests.procs import report_rank

N, TARGET, BASE = 4, 6, 5000


@dataclass
class Prompt:
    ids: list[int]
    row: object = None
    opened_think: bool = False
    drawn: list = field(default_factory=list)


def check(ok: bool, message: str) -> None:
    if not ok:
        sys.exit(f"FAIL rank {dist.get_rank()}: {message}")


def parity(prompts, rollouts) -> list[list[float]]:
    return [[float(r.response_ids[0] % 2) if r.response_ids else 0.0 for r in samples] for samples in rollouts]


def stream(engine, settings, base=BASE, offset=0, **kwargs) -> tuple[StepStream, object]:
    pool = [[3 + i, 17, (5 * i) % 90 + 2, 9] for i in range(offset, offset + 64)]
    drawn = []

    def draw(count):
        out = [Prompt(pool[len(drawn) + i]) for i in range(count)]
        drawn.extend(out)
        return out

    s = StepStream(engine, settings, base, draw, parity, lambda: None, PhaseTimer(), slots=4 * TARGET, **kwargs)
    return s, s.run()


def main(hf_dir: str, engine_tp: int) -> None:
    init_parallel(1, 1, seed=0)
    cfg = RolloutConfig(n=N, temperature=1.5, max_prompt_tokens=8, max_response_tokens=6,
                        engine_tensor_parallel=engine_tp, cpu_kvcache_gib=1.0)
    engine = RolloutEngine(hf_dir, cfg, PrecisionConfig(params_dtype="float32"), seed=0, tokenizer=False)
    waves = StreamSettings(target=TARGET, n=N, max_tokens=6, dynamic=True, max_waves=3, max_prompts=3 * TARGET,
                           overdraw=0.0)
    s, result = stream(engine, waves)
    check(len(result.complete) == len(s.groups) == result.drawn and result.aborted == 0, "a wave's group was cut")
    for w in range(result.waves):  # each wave = the round generate_global would have sampled
        wave = [g for g in s.groups if g.slot // TARGET == w]
        again = engine.generate_global([g.prompt.ids for g in wave], seed=BASE + w * TARGET * N, n=N, max_tokens=6)
        check([[r.response_ids for r in g.samples] for g in wave] == [[r.response_ids for r in x] for x in again],
              f"wave {w} differs from the round generate_global samples")
    informative = [g for g in s.groups if len(set(g.rewards)) > 1]
    check([g.order for g in result.batch] == [g.order for g in informative][:TARGET], "waves: not draw order")

    # drawing 4x what is missing: a wave a step until the cap, so later waves are cut in flight
    ahead = StreamSettings(target=TARGET, n=N, max_tokens=6, dynamic=True, max_waves=3, max_prompts=4 * TARGET,
                           overdraw=3.0)
    s, result = stream(engine, ahead)
    check(len(result.batch) == TARGET, f"the batch holds {len(result.batch)} groups, not {TARGET}")
    done = sorted((g for g in s.groups if g.rewards is not None), key=lambda g: g.done_at)
    check([g.order for g in result.batch] == [g.order for g in done if len(set(g.rewards)) > 1][:TARGET],
          "drawing ahead: the batch is not the first groups with signal to complete")
    check(sorted(g.slot for g in s.groups) == list(range(len(s.groups))), "slots are not the draw positions")
    check(result.drawn <= 4 * TARGET and result.aborted == result.drawn - len(result.complete), "counts")
    check(result.aborted > 0, "nothing was in flight when the batch was full: the test exercises no abort")
    check(not engine.busy, "requests left in the engine")
    for g in result.complete:
        seed = request_seed(BASE, g.slot, N)
        again = engine.generate([g.prompt.ids], seed=seed, n=N, max_tokens=6)[0]
        check([r.response_ids for r in again] == [r.response_ids for r in g.samples], f"slot {g.slot} resampled")
    s2, result2 = stream(engine, ahead)
    check([(g.order, [r.response_ids for r in g.samples]) for g in result2.batch]
          == [(g.order, [r.response_ids for r in g.samples]) for g in result.batch], "the stream is not deterministic")
    carry_on(engine, ahead)
    report_rank("OK", dist.get_rank(), f"waves {result.waves} drawn {result.drawn} aborted {result.aborted}")


def carry_on(engine, ahead) -> None:
    """Step 1 carries what is in flight at its cut into step 2, which finishes it with version 1."""
    resume = replace(ahead, resume=True, max_staleness=1)
    s1, first = stream(engine, resume, version=0)
    check(first.carried and first.aborted == 0, f"nothing carried ({first.aborted} aborted)")
    check(all(v == 0 for c in first.carried for p in c.samples for v, _ in p.versions), "step 1's tokens: version 0")
    check(not engine.busy, "requests left in the engine")
    before = copy.deepcopy(first.carried)
    s2, second = stream(engine, resume, base=BASE + 10_000, offset=40, version=1, carried=first.carried)
    again = stream(engine, resume, base=BASE + 10_000, offset=40, version=1, carried=copy.deepcopy(before))[1]
    check([[r.response_ids for r in g.samples] for g in second.complete]
          == [[r.response_ids for r in g.samples] for g in again.complete], "step 2 is not deterministic")
    finished = [g for g in s2.groups if g.slot == -1 and g.samples is not None]
    check(bool(finished), "no carried group completed in step 2")
    for g in finished:
        old = before[g.order].samples
        for new, was in zip(g.partial, old):
            check(new.tokens[:len(was.tokens)] == was.tokens, "a continuation lost the tokens it started from")
            versions = [v for v, _ in new.versions]
            check(versions in ([0], [0, 1], [1]) and sum(c for _, c in new.versions) == len(new.tokens),
                  f"version tags {new.versions}")
            check(was.finish_reason is None or new.tokens == was.tokens, "a finished sample was continued")
        check(g.oldest == 0 or all(not p.versions for p in old), "a carried group's oldest version")
    stale = stream(engine, replace(resume, max_staleness=0), version=0)[1]
    check(stale.carried == [] and stale.aborted > 0, "a group that would be too stale was carried")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
