"""vLLM's CPU engine and /dev/shm: a SIGKILLed run blocks nothing, concurrent runs do not collide."""

from pathlib import Path

import pytest

from tests import procs
from tests.rollout.test_rollout import ROOT, tiny_qwen2  # noqa: F401 (fixture)

WORKER = ROOT / "tests" / "rollout" / "shm_worker.py"
SHM = Path("/dev/shm")
START_S = 600  # an engine's start on a loaded 2-core machine takes well under a minute


def segments() -> set[str]:
    """Every name in /dev/shm: vLLM's SHM collectives (``*-cpushm_<rank>``, AVX-512 builds) and
    its broadcast ring buffers (``psm_*``) live there."""
    return {p.name for p in SHM.iterdir()}


def command(hf_dir: Path, *args: str) -> list[str]:
    return procs.torchrun_command(2, WORKER, hf_dir, *args)


def finish(hf_dir: Path) -> None:
    done = procs.run(command(hf_dir), timeout=START_S)
    text = done.stdout + done.stderr
    assert done.returncode == 0 and procs.reported(text, "OK") == {0, 1}, text[-5000:]


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_killed_and_concurrent_engines_leave_and_share_nothing(tiny_qwen2, tmp_path):  # noqa: F811
    before = segments()
    release = tmp_path / "release"  # never created: the first run holds its engine until killed
    with procs.Child(command(tiny_qwen2, "--wait-for", str(release))) as first:
        first.wait_until(lambda: procs.reported(first.stdout, "READY") == {0, 1}, timeout=START_S,
                         what="both ranks' READY")
        # the engine is up and using its shared memory: none of it is left named in /dev/shm
        assert segments() - before == set()
        finish(tiny_qwen2)  # a second run on the machine while the first holds its engine
        first.kill()  # SIGKILL of every process: no destructor runs
    finish(tiny_qwen2)  # the same command again, nothing cleaned by hand
    assert segments() - before == set()
