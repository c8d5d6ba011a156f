"""Verifiers that misbehave on purpose, loaded by the pool's workers through PoolSettings."""

import os
import signal
import time


def sleeps(final, ground_truth, ctx):
    time.sleep(3600)


def dies(final, ground_truth, ctx):
    os.kill(os.getpid(), signal.SIGKILL)


def raises(final, ground_truth, ctx):
    raise RuntimeError("boom")
