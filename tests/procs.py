"""Child processes in tests: a deadline on every wait, output in files, the whole tree killed.

A test that starts a process must never wait without a deadline, and must never count on lines
from several processes arriving whole on one pipe: under ``python -u`` a ``print`` writes its
text and its newline separately, so two ranks' lines interleave (``READY rank 0READY rank 1``,
then two newlines) and a parent counting lines reads on forever. Here:

- :class:`Child` starts a command in a session of its own with stdout and stderr going to files
  (readable at any moment; no pipe for a child to fill or a grandchild to hold open) and a token
  in its environment that every descendant inherits;
- every wait has a deadline that fires whether or not the child writes anything; on expiry, on a
  child that ends before the point waited for, and on any exception while waiting (pytest-timeout's
  too), the whole tree is killed — every descendant, those in sessions of their own (torchrun's
  workers) and those already orphaned (found by the token) — and the test fails with the child's
  output so far;
- workers report with :func:`report` (one ``os.write`` of a complete line) and parents parse
  reports with :func:`reported`, a pattern over the whole output, never line by line.

Only the standard library and psutil: workers import :func:`report` from here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
TOKEN_VAR = "PRORL_TEST_CHILD"  # in every descendant's environment: finds orphans to kill
TAIL = 6000  # characters of output a failure shows


class ChildTimeout(AssertionError):
    """A child did not finish (or reach the point waited for) within its deadline; it was killed."""


class ChildEnded(AssertionError):
    """A child ended before the point waited for."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment children run in: the repository importable, one OpenMP thread each."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def report(line: str) -> None:
    """Write ``line`` and its newline to stdout in one ``os.write`` (whole, whoever else writes)."""
    data = (line.rstrip("\n") + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def report_rank(word: str, rank: int, detail: str = "") -> None:
    """``report("<word> rank <rank> <detail>")``: what :func:`reported` parses."""
    report(f"{word} rank {rank}" + (f" {detail}" if detail else ""))


def reported(text: str, word: str) -> set[int]:
    """The ranks that reported ``word`` (``"<word> rank <r>"`` anywhere in ``text``, however the
    writes of several processes interleaved)."""
    return {int(r) for r in re.findall(rf"(?<![A-Za-z]){re.escape(word)} rank (\d+)", text)}


def descendants(pid: Optional[int], token: Optional[str] = None) -> list:
    """psutil processes: ``pid``'s descendants, and (with ``token``) every process of ours whose
    environment carries it (descendants orphaned when a parent died)."""
    import psutil

    found = {}
    if pid is not None:
        try:
            found = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    if token:
        for p in psutil.process_iter():
            if p.pid in found or p.pid in (pid, os.getpid()):
                continue
            try:
                if p.environ().get(TOKEN_VAR) == token:
                    found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
    return list(found.values())


def kill_tree(pid: Optional[int], token: Optional[str] = None, timeout: float = 30.0) -> None:
    """SIGKILL ``pid`` and every descendant, and every process carrying ``token`` (see
    :func:`descendants`); wait until they are gone."""
    import psutil

    procs = descendants(pid, token)
    if pid is not None:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(procs, timeout=timeout)


class Child:
    """``cmd`` started in a session of its own, stdout and stderr to files; a context manager
    that kills the whole tree on exit. Every wait takes a deadline in seconds.

    ``token``: a token shared with other processes (a test cluster's daemons and clients, whose
    jobs outlive the client that submitted them); the kill then takes only this child's own
    descendants, and whoever owns the token kills the rest (``kill_tree(None, token)``).
    """

    def __init__(self, cmd: Sequence[str], *, cwd: Path | str = ROOT, env: Optional[dict[str, str]] = None,
                 input: Optional[str] = None, token: Optional[str] = None) -> None:
        self.cmd = [str(c) for c in cmd]
        self.token = token or uuid.uuid4().hex
        self._owns_token = token is None
        self._dir = Path(tempfile.mkdtemp(prefix="prorl-child-"))
        self._paths = {name: self._dir / name for name in ("stdout", "stderr")}
        stdin = subprocess.DEVNULL
        if input is not None:
            (self._dir / "stdin").write_text(input)
            stdin = open(self._dir / "stdin", "rb")
        files = {name: open(path, "wb") for name, path in self._paths.items()}
        try:
            self.proc = subprocess.Popen(self.cmd, cwd=str(cwd), env={**(env or child_env()), TOKEN_VAR: self.token},
                                         stdin=stdin, stdout=files["stdout"], stderr=files["stderr"],
                                         start_new_session=True)
        finally:
            for f in files.values():
                f.close()
            if stdin is not subprocess.DEVNULL:
                stdin.close()
        self._final: Optional[dict[str, str]] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.returncode

    def _read(self, name: str) -> str:
        if self._final is not None:
            return self._final[name]
        # universal newlines, as subprocess's text mode reads them: a progress bar's "\r" ends a line
        return self._paths[name].read_bytes().decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")

    @property
    def stdout(self) -> str:
        return self._read("stdout")

    @property
    def stderr(self) -> str:
        return self._read("stderr")

    def output(self) -> str:
        """stdout, then stderr (each in the order written)."""
        return self.stdout + self.stderr

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def describe(self, what: str) -> str:
        return f"{' '.join(self.cmd)[:300]}: {what}; its output so far (last {TAIL} characters):\n" \
               f"{self.output()[-TAIL:]}"

    def wait(self, timeout: float) -> int:
        """The exit status; past ``timeout`` seconds the tree is killed and :class:`ChildTimeout`
        raised with the output."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ChildTimeout(self.describe(f"did not finish within {timeout:g} s (killed)")) from None
        except BaseException:
            self.kill()
            raise

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str = "the point waited for") -> None:
        """Poll ``condition()`` until it holds; the tree is killed (and the test fails with the
        output) if the child ends first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        try:
            while not condition():
                if self.proc.poll() is not None:
                    if condition():
                        return
                    raise ChildEnded(self.describe(f"ended (status {self.proc.returncode}) before {what}"))
                if time.monotonic() > deadline:
                    raise ChildTimeout(self.describe(f"{what} not reached within {timeout:g} s (killed)"))
                time.sleep(0.01)
        except BaseException:
            self.kill()
            raise

    def signal_children(self, sig: int) -> None:
        """Send ``sig`` to the direct children (torchrun's workers, as srun signals every task)."""
        import psutil

        for worker in psutil.Process(self.pid).children():
            try:
                worker.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def kill(self) -> None:
        """SIGKILL the whole tree (idempotent); the output stays readable."""
        kill_tree(self.pid, self.token if self._owns_token else None)
        self.proc.wait()
        self.close()

    def close(self) -> None:
        """Keep the output in memory and remove the files (after the process is gone)."""
        if self._final is None:
            self._final = {name: self._read(name) for name in self._paths}
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()  # orphaned grandchildren too, even after the root exited by itself


def run(cmd: Sequence[str], *, timeout: float, cwd: Path | str = ROOT, env: Optional[dict[str, str]] = None,
        input: Optional[str] = None, token: Optional[str] = None) -> subprocess.CompletedProcess:
    """``subprocess.run`` with a deadline that kills the whole tree and fails with the output
    (:class:`ChildTimeout`); no descendant outlives the call (``token``: see :class:`Child`)."""
    with Child(cmd, cwd=cwd, env=env, input=input, token=token) as child:
        code = child.wait(timeout)
    return subprocess.CompletedProcess(child.cmd, code, child.stdout, child.stderr)


def torchrun_command(nproc: int, *args: str | Path) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N ARGS...``."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *[str(a) for a in args]]
