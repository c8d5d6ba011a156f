"""The step stream (prorl_megatron/rollout/stream.py) on a real vLLM engine under torchrun.

    torchrun --nproc_per_node 2 tests/rollout/stream_worker.py HF_DIR ENGINE_TP

Prompts are drawn from a fixed list; a group's reward per sample is the parity of its response's
first token (a verifier stand-in whose groups carry signal about half the time). Checks:

- waves (no drawing ahead): the samples of every wave are exactly what ``generate_global``
  gives for that round with the rounds' seeds, the batch is the first groups with signal in draw
  order, every drawn group completes;
- drawing ahead: the batch is full, its groups are the first with signal to complete, every
  slot is used once, what was in flight at the end is aborted and counted, and a second stream
  for the same step samples exactly the same (the step's stream is deterministic).
Reports ``OK rank R``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

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


def stream(engine, settings) -> tuple[StepStream, object]:
    pool = [[3 + i, 17, (5 * i) % 90 + 2, 9] for i in range(64)]
    drawn = []

    def draw(count):
        out = [Prompt(pool[len(drawn) + i]) for i in range(count)]
        drawn.extend(out)
        return out

    s = StepStream(engine, settings, BASE, draw, parity, lambda: None, PhaseTimer())
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
    report_rank("OK", dist.get_rank(), f"waves {result.waves} drawn {result.drawn} aborted {result.aborted}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
