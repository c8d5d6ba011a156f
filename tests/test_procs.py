"""The test utilities for child processes (tests/procs.py) and the suite's per-test timeout."""

import sys
import textwrap
import time

import psutil
import pytest

from tests import procs
from tests.procs import ROOT

# A child that starts a grandchild in a session of its own (as torchrun starts its workers), says
# where both are, then (``hang``) waits silently forever or (``orphan``) exits at once.
FAMILY = textwrap.dedent("""
    import subprocess, sys, time
    mode, pids = sys.argv[1], sys.argv[2]
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10000)"], start_new_session=True)
    with open(pids, "w") as f:
        f.write(f"{__import__('os').getpid()} {grandchild.pid}")
    sys.stderr.write("family started\\n"); sys.stderr.flush()
    if mode == "hang":
        time.sleep(10000)
""")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def family_pids(path) -> list[int]:
    deadline = time.monotonic() + 30
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, "the child never said where its processes are"
        time.sleep(0.01)
    return [int(p) for p in path.read_text().split()]


def test_a_silent_child_that_never_exits_fails_within_its_deadline_and_leaves_nothing(tmp_path):
    pids = tmp_path / "pids"
    start = time.monotonic()
    with pytest.raises(procs.ChildTimeout) as failure:
        procs.run([sys.executable, "-c", FAMILY, "hang", str(pids)], timeout=5)
    assert time.monotonic() - start < 5 + 35  # the deadline, then at most the kill's own wait
    assert "did not finish within 5 s" in str(failure.value)
    assert "family started" in str(failure.value)  # the output so far comes with the failure
    child, grandchild = family_pids(pids)
    assert not alive(child) and not alive(grandchild)


def test_a_grandchild_orphaned_by_its_parent_is_killed_too(tmp_path):
    """The child exits at once; its grandchild (another session, re-parented) must not outlive the call."""
    pids = tmp_path / "pids"
    done = procs.run([sys.executable, "-c", FAMILY, "orphan", str(pids)], timeout=60)
    assert done.returncode == 0 and "family started" in done.stderr
    _, grandchild = family_pids(pids)
    assert not alive(grandchild)


# Two ranks writing as ``print`` does under ``python -u`` (the text, then the newline: two writes)
# on one shared stdout, forced into the worst order: "READY rank 0READY rank 1\n\n".
RANKS = textwrap.dedent("""
    import os, subprocess, sys, time
    from pathlib import Path
    rank, flags = int(sys.argv[1]), Path(sys.argv[2])
    def wait(name):
        while not (flags / name).exists():
            time.sleep(0.01)
    if rank == 0:
        peer = subprocess.Popen([sys.executable, "-c", sys.argv[3], "1", str(flags), sys.argv[3]])
        os.write(1, b"READY rank 0"); (flags / "0").touch(); wait("1")
        os.write(1, b"\\n"); peer.wait()
    else:
        wait("0"); os.write(1, b"READY rank 1"); (flags / "1").touch()
        os.write(1, b"\\n")
    time.sleep(10000 if rank == 0 else 0)  # rank 0 stays up, as a worker waiting for its release
""")


def test_reports_interleaved_on_one_pipe_are_all_counted(tmp_path):
    with procs.Child([sys.executable, "-c", RANKS, "0", str(tmp_path), RANKS]) as child:
        child.wait_until(lambda: procs.reported(child.stdout, "READY") == {0, 1}, timeout=60, what="both READY")
        text = child.stdout
    assert text.startswith("READY rank 0READY rank 1\n")
    assert sum("READY rank" in line for line in text.splitlines()) == 1  # what a line count would have seen


def test_waiting_for_a_point_a_child_never_reaches_fails_when_it_ends():
    with pytest.raises(procs.ChildEnded, match=r"ended \(status 3\) before the READY lines"):
        with procs.Child([sys.executable, "-c", "import sys; print('bye'); sys.exit(3)"]) as child:
            child.wait_until(lambda: False, timeout=60, what="the READY lines")


def test_report_writes_whole_lines(tmp_path):
    code = "from tests.procs import report_rank\nfor r in range(50): report_rank('OK', r, 'x' * 100)"
    done = procs.run([sys.executable, "-c", code], timeout=60)
    assert procs.reported(done.stdout, "OK") == set(range(50))
    assert all(line.endswith("x" * 100) for line in done.stdout.splitlines())


STUCK = textwrap.dedent("""
    import threading

    def test_stuck_forever():
        threading.Thread(target=threading.Event().wait, name="helper-thread", daemon=True).start()
        threading.Event().wait()

    def test_after_it():
        assert True
""")


def test_the_suite_timeout_fails_one_stuck_test_dumps_stacks_and_goes_on(tmp_path):
    """The project's pytest settings (pyproject.toml) with the limit lowered to 3 s: the stuck test
    fails with every thread's stack, and the next test still runs."""
    test_file = tmp_path / "test_stuck.py"
    test_file.write_text(STUCK)
    start = time.monotonic()
    done = procs.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                      "-p", "no:cacheprovider", "--timeout", "3", str(test_file)], timeout=120, cwd=tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 1 and "1 failed, 1 passed" in text, text[-4000:]
    assert "Timeout (>3.0s)" in text and "Stack of helper-thread" in text, text[-4000:]
    assert time.monotonic() - start < 60
