"""Run untrusted Python (model-written programs) in a bubblewrap sandbox with hard limits.

Each run: a fresh ``bwrap`` with every namespace unshared (no network, own PID namespace),
only the system's ``/usr`` mounted read-only (no home, no project, no /etc, no host /tmp),
the program bound read-only at ``/sandbox/main.py``, a private writable tmpfs as ``/tmp``;
as an unprivileged user (``nobody`` when we are root); rlimits on CPU seconds, address space,
processes, file size and open files; a wall-clock timeout after which the whole process group
is killed (and with it the sandbox's PID namespace). Output goes to size-capped files.

Where bubblewrap cannot run, :class:`Sandbox` raises :class:`SandboxUnavailable` unless it was
built with ``allow_unsandboxed=True``: then programs run directly, with the same rlimits and
timeout but no isolation (the recipe must say ``rewards.allow_unsandboxed: true``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

NOBODY = 65534
SANDBOX_PYTHON = "/usr/bin/python3"  # the system interpreter: the venv's lives under a private home


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create its namespaces on this machine."""


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mib: int = 1024
    max_processes: int = 64  # per sandbox user, across concurrent sandboxes
    max_file_mib: int = 16  # any file written, stdout/stderr included
    max_open_files: int = 256


@dataclass
class RunResult:
    stdout: str
    stderr: str
    returncode: Optional[int]
    timed_out: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _bwrap_command(bwrap: str, program_dir: str, python: str, info_fd: int) -> list[str]:
    cmd = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--info-fd", str(info_fd), "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):  # merged-/usr symlinks (Debian 12)
        path = Path("/") / name
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            cmd += ["--ro-bind", str(path), f"/{name}"]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", program_dir, "/sandbox",
            "--chdir", "/tmp", "--setenv", "HOME", "/tmp", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--", python, "-I", "/sandbox/main.py"]
    return cmd


class Sandbox:
    """Runs Python programs under :class:`Limits`; see the module docstring for what is isolated."""

    def __init__(self, limits: Limits = Limits(), allow_unsandboxed: bool = False,
                 python: str = SANDBOX_PYTHON, uid: int = NOBODY, isolate: bool = True) -> None:
        """``uid``: the unprivileged user programs run as when we are root; give concurrent
        sandboxes distinct uids so that one program's fork bomb cannot use up another's
        process limit. ``isolate=False`` (recipe ``rewards.code_sandbox: none``) skips
        bubblewrap on purpose, which also needs ``allow_unsandboxed``."""
        self.limits = limits
        self.python = python
        self.uid = uid
        self.isolated = True
        self._drop_privileges = os.geteuid() == 0
        self._bwrap = shutil.which("bwrap")
        problem = self._probe() if isolate else "rewards.code_sandbox is none"
        if problem:
            if not allow_unsandboxed:
                raise SandboxUnavailable(
                    f"cannot isolate model-written code: {problem}. Install bubblewrap (Debian: "
                    "apt-get install bubblewrap) on a kernel with user namespaces, or set "
                    "rewards.allow_unsandboxed=true to run it on the host (unsafe)."
                )
            log.warning("code sandbox unavailable (%s): running model code UNSANDBOXED", problem)
            self.isolated = False

    def _probe(self) -> Optional[str]:
        if not Path(self.python).is_file():
            return f"{self.python} not found"
        if self._bwrap is None:
            return "bwrap not found on PATH"
        result = self.run("print('sandbox-ok')")
        if result.stdout.strip() != "sandbox-ok":
            return f"bwrap failed: {result.stderr.strip()[-300:] or result.returncode}"
        return None

    def _set_limits(self) -> None:  # runs in the child between fork and exec
        lim = self.limits
        cpu = max(1, int(lim.cpu_s + 0.999))
        for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, lim.memory_mib << 20),
                           (resource.RLIMIT_FSIZE, lim.max_file_mib << 20), (resource.RLIMIT_CORE, 0),
                           (resource.RLIMIT_NOFILE, lim.max_open_files)):
            resource.setrlimit(res, (value, value))
        if self._drop_privileges:  # RLIMIT_NPROC counts the sandbox user's processes
            resource.setrlimit(resource.RLIMIT_NPROC, (lim.max_processes, lim.max_processes))

    def run(self, code: str, stdin: str = "") -> RunResult:
        """Run ``code`` with ``stdin``; never raises for anything the program does."""
        workdir = Path(tempfile.mkdtemp(prefix="prorl-sandbox-"))
        try:
            program_dir = workdir / "program"
            program_dir.mkdir()
            (program_dir / "main.py").write_text(code)
            (workdir / "stdin").write_text(stdin)
            os.chmod(workdir, 0o755)
            os.chmod(program_dir, 0o755)
            os.chmod(program_dir / "main.py", 0o644)
            info_r, info_w = os.pipe()
            try:
                if self._bwrap is not None and self.isolated:
                    cmd = _bwrap_command(self._bwrap, str(program_dir), self.python, info_w)
                else:
                    cmd = [self.python, "-I", str(program_dir / "main.py")]
                return self._execute(cmd, workdir, info_r, info_w)
            finally:
                os.close(info_r)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _execute(self, cmd: list[str], workdir: Path, info_r: int, info_w: int) -> RunResult:
        out_path, err_path = workdir / "stdout", workdir / "stderr"
        user = {"user": self.uid, "group": self.uid, "extra_groups": []} if self._drop_privileges else {}
        start = time.monotonic()
        timed_out = False
        with open(workdir / "stdin", "rb") as fin, open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
            try:
                proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=str(workdir),
                                        start_new_session=True, preexec_fn=self._set_limits, pass_fds=(info_w,),
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, **user)
            finally:
                os.close(info_w)
            try:
                proc.wait(timeout=self.limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
                _wait_for_namespace(info_r)
        cap = self.limits.max_file_mib << 20
        return RunResult(
            stdout=out_path.read_bytes()[:cap].decode("utf-8", "replace"),
            stderr=err_path.read_bytes()[-65536:].decode("utf-8", "replace"),
            returncode=None if timed_out else proc.returncode,
            timed_out=timed_out,
            wall_s=time.monotonic() - start,
        )


def _wait_for_namespace(info_r: int, timeout_s: float = 10.0) -> None:
    """Wait until the sandbox's PID-namespace init is gone.

    Killing bwrap kills the namespace's init, and the kernel then kills every process in the
    namespace; init only disappears once all of them have (a fork bomb takes a moment).
    """
    try:
        info = json.loads(os.read(info_r, 65536).decode() or "{}")
    except (OSError, ValueError):
        return
    pid = info.get("child-pid")
    deadline = time.monotonic() + timeout_s
    while pid and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in ("Z", "X"):  # init is a zombie only after every process of its namespace died
            return
        time.sleep(0.002)
    if pid:
        log.warning("sandbox namespace init %s still alive %.0f s after the kill", pid, timeout_s)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (its PID namespace dies with bwrap) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
