"""Score a batch of responses in worker processes, with a timeout per sample.

``RewardPool.score([ScoreRequest(domain, response, ground_truth), ...])`` returns one
:class:`~prorl_megatron.rewards.text.Score` per request, in order. A verifier that raises,
hangs past its deadline, or takes its worker process down (a crash, an OOM kill) yields
reward 0 with the reason in ``info["reason"]``; the failure is logged and counted in
:attr:`RewardPool.failures`, the worker is replaced, and the batch goes on.
"""

from __future__ import annotations

import collections
import importlib
import logging
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

from prorl_megatron.rewards.sandbox import Limits, Sandbox
from prorl_megatron.rewards.text import Score, VerifyContext, final_answer

log = logging.getLogger(__name__)

# domain -> "module:function" with the signature (final, ground_truth, VerifyContext) -> Score
VERIFIERS: dict[str, str] = {
    "math": "prorl_megatron.rewards.math:score_math",
    "code": "prorl_megatron.rewards.code:score_code",
    "stem": "prorl_megatron.rewards.stem:score_stem",
    "logic": "prorl_megatron.rewards.logic:score_logic",
    "instruction": "prorl_megatron.rewards.instruction:score_instruction",
}
NEEDS_SANDBOX = {"code"}
SANDBOX_UID_BASE = 61000  # worker i runs code as uid SANDBOX_UID_BASE + i (when root)
WARM_UP_TIMEOUT_S = 300.0  # importing sympy/math-verify/reasoning-gym in a fresh process


@dataclass
class ScoreRequest:
    domain: str
    response: str
    ground_truth: dict
    prompt_opened_think: bool = False  # the chat template opened <think> in the prompt


@dataclass(frozen=True)
class PoolSettings:
    timeout_s: float = 10.0  # per sample; code gets this plus each test's wall limit
    strip_think: bool = True
    allow_unsandboxed: bool = False
    isolate: bool = True  # False: rewards.code_sandbox=none (needs allow_unsandboxed)
    limits: Limits = Limits()
    extra_verifiers: tuple[tuple[str, str], ...] = ()  # more (domain, "module:function") pairs

    def verifiers(self) -> dict[str, str]:
        return {**VERIFIERS, **dict(self.extra_verifiers)}


def pool_settings(rewards: Any) -> PoolSettings:
    """PoolSettings from the recipe's ``rewards`` section (:class:`prorl_megatron.config.RewardsConfig`)."""
    limits = Limits(cpu_s=rewards.code_cpu_s, wall_s=max(rewards.code_cpu_s * 2, 1.0),
                    memory_mib=rewards.code_memory_mib)
    return PoolSettings(timeout_s=rewards.timeout_s, strip_think=rewards.strip_think,
                        allow_unsandboxed=rewards.allow_unsandboxed, isolate=rewards.code_sandbox == "bwrap",
                        limits=limits)


def load_verifier(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def score_one(request: ScoreRequest, settings: PoolSettings, sandbox: Optional[Sandbox]) -> Score:
    """Score one request in this process (what a worker does)."""
    verifiers = settings.verifiers()
    if request.domain not in verifiers:
        return Score.zero(f"unknown domain {request.domain!r}; valid: {', '.join(verifiers)}")
    final = final_answer(request.response, request.prompt_opened_think) if settings.strip_think else request.response
    if final is None:
        return Score.zero("unfinished <think> block")
    ctx = VerifyContext(timeout_s=settings.timeout_s, sandbox=sandbox)
    return load_verifier(verifiers[request.domain])(final, request.ground_truth, ctx)


def _warm_up(settings: PoolSettings) -> None:
    """Import every verifier and parse once, so that no sample's time budget pays for it."""
    for path in settings.verifiers().values():
        load_verifier(path)
    from prorl_megatron.rewards.math import score_math

    score_math("\\boxed{1}", {"answer": "1"})


def _worker(conn: Connection, settings: PoolSettings, uid: int) -> None:
    # Slurm signals every process of a job step (SIGUSR1 before the time limit); it is meant
    # for the trainer, which checkpoints and stops the pool itself
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sandbox: Optional[Sandbox] = None
    try:
        _warm_up(settings)
        conn.send("ready")
    except Exception as e:  # report it: the pool fails loudly at start rather than per sample
        conn.send(f"warm-up failed: {type(e).__name__}: {e}")
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, request = message
        try:
            if request.domain in NEEDS_SANDBOX and sandbox is None:
                sandbox = Sandbox(settings.limits, settings.allow_unsandboxed, uid=uid, isolate=settings.isolate)
            score = score_one(request, settings, sandbox)
        except Exception as e:  # a verifier bug or bad ground truth must not end the batch
            score = Score.zero(f"verifier error: {type(e).__name__}: {e}"[:500])
        conn.send((index, score))


class _Slot:
    """One worker process and the request it is working on."""

    def __init__(self, ctx: Any, settings: PoolSettings, uid: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, settings, uid), daemon=True)
        self.process.start()
        child.close()
        self.task: Optional[int] = None
        self.budget_s = 0.0
        self.deadline = 0.0

    def wait_ready(self) -> "_Slot":
        """Block until the worker has warmed up; raise if it cannot start."""
        if not self.conn.poll(WARM_UP_TIMEOUT_S):
            self.stop(kill=True)
            raise RuntimeError(f"a reward worker did not start within {WARM_UP_TIMEOUT_S:.0f} s")
        status = self.conn.recv()
        if status != "ready":
            self.stop(kill=True)
            raise RuntimeError(f"a reward worker could not start: {status}")
        return self

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class RewardPool:
    """Verifier worker processes. Use as a context manager, or call :meth:`close`."""

    def __init__(self, workers: int = 8, settings: PoolSettings = PoolSettings(), code: bool = True) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected >= 1, got {workers}")
        if code:  # refuse up front, in the trainer, rather than zero every code sample later
            Sandbox(settings.limits, settings.allow_unsandboxed, uid=SANDBOX_UID_BASE, isolate=settings.isolate)
        self.settings = settings
        self._ctx = mp.get_context("spawn")  # never fork a process that holds threads or CUDA state
        self._uids = [SANDBOX_UID_BASE + i for i in range(workers)]
        self._slots = [_Slot(self._ctx, settings, uid) for uid in self._uids]  # they warm up in parallel
        for slot in self._slots:
            slot.wait_ready()
        self.failures: collections.Counter[str] = collections.Counter()

    def _budget_s(self, request: ScoreRequest) -> float:
        extra = 0.0
        if request.domain in NEEDS_SANDBOX:
            # one sandbox run per test; the assert style's test program is one run
            extra = max(1, len(request.ground_truth.get("tests") or [])) * (self.settings.limits.wall_s + 1.0)
        return self.settings.timeout_s + extra

    def _fail(self, kind: str, reason: str, request: ScoreRequest) -> Score:
        self.failures[kind] += 1
        log.warning("reward %s (%s sample): %s", kind, request.domain, reason)
        return Score.zero(reason)

    def _replace(self, i: int) -> None:
        self._slots[i].stop(kill=True)
        self._slots[i] = _Slot(self._ctx, self.settings, self._uids[i]).wait_ready()

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        """Scores for ``requests``, in order (see the module docstring for failures)."""
        results: list[Optional[Score]] = [None] * len(requests)
        pending = collections.deque(range(len(requests)))
        while pending or any(s.task is not None for s in self._slots):
            for i, slot in enumerate(self._slots):
                if slot.task is None and pending:
                    slot.task = pending.popleft()
                    slot.budget_s = self._budget_s(requests[slot.task])
                    slot.deadline = time.monotonic() + slot.budget_s
                    try:
                        slot.conn.send((slot.task, requests[slot.task]))
                    except OSError:  # the worker died while idle (killed from outside): replace, retry
                        pending.appendleft(slot.task)
                        slot.task = None
                        self.failures["crash"] += 1
                        log.warning("reward worker died while idle (exit code %s); replaced", slot.process.exitcode)
                        self._replace(i)
            busy = [s for s in self._slots if s.task is not None]
            if not busy:
                continue
            timeout = max(0.0, min(s.deadline for s in busy) - time.monotonic())
            ready = wait([s.conn for s in busy] + [s.process.sentinel for s in busy], timeout=timeout)
            for i, slot in enumerate(self._slots):
                if slot.task is None:
                    continue
                task = slot.task
                if slot.conn in ready:
                    try:
                        index, score = slot.conn.recv()
                        results[index] = score
                        if score.info.get("reason", "").startswith("verifier error"):
                            self.failures["error"] += 1
                            log.warning("reward error (%s sample): %s", requests[index].domain, score.info["reason"])
                        slot.task = None
                        continue
                    except (EOFError, OSError):
                        pass  # died while answering: handled below
                if not slot.process.is_alive() or slot.conn in ready:
                    slot.process.join(timeout=5)  # reap it, so that its exit code is known
                    code = slot.process.exitcode
                    results[task] = self._fail("crash", f"verifier process died (exit code {code})", requests[task])
                    slot.task = None
                    self._replace(i)
                elif time.monotonic() >= slot.deadline:
                    results[task] = self._fail("timeout", f"verifier timed out after {slot.budget_s:.0f} s",
                                               requests[task])
                    slot.task = None
                    self._replace(i)
        return [r if r is not None else Score.zero("not scored") for r in results]

    def close(self) -> None:
        for slot in self._slots:
            slot.stop()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
