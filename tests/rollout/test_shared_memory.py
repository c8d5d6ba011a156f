"""vLLM's CPU engine and /dev/shm: a SIGKILLed run blocks nothing, concurrent runs do not collide."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.rollout.test_rollout import ROOT, tiny_qwen2  # noqa: F401 (fixture)
from tests.train.conftest import kill_tree

WORKER = ROOT / "tests" / "rollout" / "shm_worker.py"
SHM = Path("/dev/shm")


def segments() -> set[str]:
    """Every name in /dev/shm: vLLM's SHM collectives (``*-cpushm_<rank>``, AVX-512 builds) and
    its broadcast ring buffers (``psm_*``) live there."""
    return {p.name for p in SHM.iterdir()}


def command(hf_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
            str(hf_dir), *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def finish(hf_dir: Path) -> None:
    done = subprocess.run(command(hf_dir), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0 and text.count("OK rank") == 2, text[-5000:]


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_killed_and_concurrent_engines_leave_and_share_nothing(tiny_qwen2, tmp_path):  # noqa: F811
    before = segments()
    release = tmp_path / "release"
    first = subprocess.Popen(command(tiny_qwen2, "--wait-for", str(release)), cwd=ROOT, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 600
        while sum("READY rank" in line for line in lines) < 2:
            line = first.stdout.readline()
            assert line or first.poll() is None, "".join(lines)[-5000:]
            assert time.monotonic() < deadline, "the first engine did not start in time"
            lines.append(line)
        # the engine is up and using its shared memory: none of it is left named in /dev/shm
        assert segments() - before == set()
        finish(tiny_qwen2)  # a second run on the machine while the first holds its engine
        kill_tree(first.pid)  # SIGKILL of every process: no destructor runs
        first.wait()
        finish(tiny_qwen2)  # the same command again, nothing cleaned by hand
    finally:
        kill_tree(first.pid)
        first.stdout.close()
    assert segments() - before == set()
