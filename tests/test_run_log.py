"""run_log.routed: the console keeps our lines (rank 0) and every rank's errors; the log file
gets everything, library notices and what is written straight to the file descriptors."""

import subprocess
import sys
import textwrap

import pytest

from tests import procs
from tests.megatron.conftest import env

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from prorl_megatron import run_log

    with run_log.routed(sys.argv[1]) as path:
        logging.getLogger("prorl_megatron.demo").info("our set-up line")
        logging.getLogger("prorl_megatron.demo").warning("our warning")
        logging.getLogger("vllm.engine").warning("library warning")
        logging.getLogger("megatron.core").info("library notice")
        warnings.warn("a library's warning")  # this file is outside the package: a library's
        warnings.warn_explicit("our own warning", UserWarning, run_log.PACKAGE_DIR + "train.py", 1)
        print("a library print")
        os.write(2, b"C++ writes to fd 2\\n")
        run_log.console().write("the bar\\n")
        if sys.argv[2] == "crash":
            raise RuntimeError("boom")
    print("after the block")
""")


def routed(tmp_path, rank: int, crash: bool = False) -> tuple[subprocess.CompletedProcess, str]:
    out = procs.run([sys.executable, "-c", SCRIPT, str(tmp_path), "crash" if crash else "ok"], timeout=120,
                    env={**env(), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    return out, (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("rank", [0, 1])
def test_console_and_log(tmp_path, rank):
    out, log = routed(tmp_path, rank)
    assert out.returncode == 0, out.stderr
    console = out.stdout + out.stderr
    for library in ("library warning", "library notice", "a library's warning", "a library print", "C++ writes"):
        assert library not in console
        assert library in log
    assert "the bar" in console and "after the block" in out.stdout  # the descriptors are restored
    if rank == 0:
        assert "our set-up line" in out.stderr and "WARNING our warning" in out.stderr
        assert "UserWarning: our own warning" in out.stderr  # a warning raised in the package's files
    else:  # only errors from the other ranks
        assert "our set-up line" not in console and "our warning" not in console and "our own" not in console
    assert f"rank{rank} INFO prorl_megatron.demo: our set-up line" in log
    assert f"rank{rank} WARNING py.warnings:" in log and "our own warning" in log


def test_a_crash_reaches_the_console_of_any_rank(tmp_path):
    out, log = routed(tmp_path, rank=1, crash=True)
    assert out.returncode == 1
    assert "RuntimeError: boom" in out.stderr and "Traceback" in out.stderr
    assert "rank1 ERROR prorl_megatron: the run ended with RuntimeError: boom" in log and "Traceback" in log
