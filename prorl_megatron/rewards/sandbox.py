"""Run untrusted Python (model-written programs) in a bubblewrap sandbox with hard limits.

Each run: a fresh ``bwrap`` with every namespace unshared (its own user namespace, no network,
own PID namespace), only the system's ``/usr`` mounted read-only (no home, no project, no /etc,
no host /tmp), the program bound read-only at ``/sandbox/main.py``, a private size-capped tmpfs
as ``/tmp``; as an unprivileged user (``nobody`` when we are root); rlimits on CPU seconds,
address space, file size and open files; a wall-clock timeout after which the whole process
group is killed (and with it the sandbox's PID namespace). Output goes to size-capped files.

What bounds one run as a whole, whether the trainer runs as root or as an ordinary user
(``python -m prorl_megatron.rewards.sandbox --check`` prints which of these a machine gives):

- tasks (processes + threads): ``RLIMIT_NPROC`` set by a shim *inside* the run's user
  namespace. Since Linux 5.14 the kernel counts it per (user namespace, uid), so it counts this
  run's tasks only, and the program can neither raise it nor escape it (a nested namespace
  inherits it as a cap). Plus ``pids.max`` where a cgroup is available (:mod:`.sandbox_bounds`).
- memory of all the run's processes together: a memory cgroup per run where one can be
  created (root, or a delegated cgroup); otherwise a watchdog that polls the run's resident
  memory and kills it over the limit (best effort: between two polls only ``RLIMIT_AS`` per
  process, times the task limit, bounds it).
- ``/tmp``: a tmpfs of ``Limits.tmp_mib`` (bwrap's ``--size``, bubblewrap >= 0.7).

Where bubblewrap cannot run, or the task or ``/tmp`` bound is missing, :class:`Sandbox` raises
:class:`SandboxUnavailable` unless it was built with ``allow_unsandboxed=True`` (the recipe's
``rewards.allow_unsandboxed: true``): then it runs with whatever it has, without bubblewrap
directly on the host with the same rlimits and timeout, and logs a warning.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from prorl_megatron.rewards.sandbox_bounds import (
    RunCgroup,
    cgroup_parents,
    proc_children_available,
    tree_memory_bytes,
)

log = logging.getLogger(__name__)

NOBODY = 65534
SANDBOX_PYTHON = "/usr/bin/python3"  # the system interpreter: the venv's lives under a private home
WATCHDOG_INTERVAL_S = 0.02  # how often a run is checked for its memory cgroup OOM kill, or by the watchdog
EXTRA_TASKS = 4  # bwrap's own processes, outside the program's RLIMIT_NPROC: pids.max = limit + this
# Runs as the sandbox's first process, inside its user namespace: sets the task limit, then
# becomes the program. Lowering an rlimit needs no privilege; raising it back needs
# CAP_SYS_RESOURCE in the initial namespace, which nothing in the sandbox has.
_NPROC_SHIM = ("import os,resource as r,sys;n=int(sys.argv[1]);r.setrlimit(r.RLIMIT_NPROC,(n,n));"
               "os.execv(sys.argv[2],sys.argv[2:])")
_PROBE = """
import json, threading
done, threads, written = threading.Event(), 0, 0
try:
    while threads < 64:
        threading.Thread(target=done.wait, daemon=True).start()
        threads += 1
except RuntimeError:
    pass
done.set()
try:
    with open("/tmp/fill", "wb") as f:
        while written < 8 << 20:
            f.write(bytes(65536))
            f.flush()
            written += 65536
except OSError:
    pass
print(json.dumps({"threads": threads, "tmp_bytes": written}))
"""
_PROBE_LIMITS = dict(max_processes=8, tmp_mib=1)  # the probe may start 7 threads, write 1 MiB to /tmp
_names = itertools.count()


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create its namespaces, or a run bound cannot be enforced."""


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mib: int = 1024  # all the run's processes together; also each one's address space
    max_processes: int = 64  # tasks (processes and threads) of one run together
    max_file_mib: int = 16  # any file written, stdout/stderr included
    max_open_files: int = 256
    tmp_mib: int = 64  # the private /tmp (a tmpfs: its files are memory too)


@dataclass
class RunResult:
    stdout: str
    stderr: str
    returncode: Optional[int]
    timed_out: bool
    wall_s: float
    memory_exceeded: bool = False  # killed for Limits.memory_mib (cgroup OOM kill or watchdog)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.memory_exceeded


@dataclass(frozen=True)
class Guarantee:
    """One bound a run gets on this machine: ``status`` is held, partial or missing."""

    name: str
    status: str
    how: str


def _bwrap_options(bwrap: str) -> set[str]:
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", text, re.M))


def _uid_mapped(uid: int) -> bool:
    """Whether our user namespace has ``uid`` (the initial namespace has them all)."""
    try:
        lines = Path("/proc/self/uid_map").read_text().splitlines()
    except OSError:
        return True
    for line in lines:
        inside, _, count = (int(x) for x in line.split())
        if inside <= uid < inside + count:
            return True
    return False


def _kernel_counts_nproc_per_userns() -> bool:
    """Linux >= 5.14 charges RLIMIT_NPROC per (user namespace, uid) (the ucounts rework)."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return bool(match) and (int(match[1]), int(match[2])) >= (5, 14)


def _task_guarantee(threads: int, limit: int, per_userns: bool, pids_cgroup: Optional[str],
                    sandbox_uid: Optional[int], stderr: str = "") -> Guarantee:
    """The task bound, from what a probe run limited to ``limit`` tasks could start (``threads``
    besides its main thread; -1: the probe failed) and the mechanisms this machine has."""
    if threads < 0:
        return Guarantee("task bound", "missing", f"the probe run failed: {stderr.strip()[-300:]}")
    if not 1 <= threads + 1 <= limit:
        return Guarantee("task bound", "missing", f"a run limited to {limit} tasks started {threads} threads")
    if per_userns:
        return Guarantee("task bound", "held", "RLIMIT_NPROC in the run's own user namespace (Linux >= 5.14)"
                         + (f", and pids.max ({pids_cgroup})" if pids_cgroup else ""))
    if pids_cgroup:
        return Guarantee("task bound", "held", f"pids.max ({pids_cgroup})")
    if sandbox_uid:
        return Guarantee("task bound", "partial", f"RLIMIT_NPROC of uid {sandbox_uid}, shared by every run as "
                         "that uid (Linux < 5.14 counts it across user namespaces)")
    return Guarantee("task bound", "missing", "Linux < 5.14 counts RLIMIT_NPROC across user namespaces, and "
                     "no pids cgroup is writable")


def _bwrap_command(bwrap: str, program_dir: str, python: str, info_fd: int, options: set[str],
                   tmp_bytes: Optional[int], nproc: Optional[int]) -> list[str]:
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--info-fd", str(info_fd), "--ro-bind", "/usr", "/usr"]
    if "--disable-userns" in options:  # no nested user namespaces (less kernel surface)
        cmd.append("--disable-userns")
    for name in ("bin", "lib", "lib64", "sbin"):  # merged-/usr symlinks (Debian 12)
        path = Path("/") / name
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            cmd += ["--ro-bind", str(path), f"/{name}"]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    if tmp_bytes is not None:
        cmd += ["--size", str(tmp_bytes)]
    cmd += ["--tmpfs", "/tmp", "--ro-bind", program_dir, "/sandbox",
            "--chdir", "/tmp", "--setenv", "HOME", "/tmp", "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--"]
    if nproc is not None:
        cmd += [python, "-I", "-S", "-c", _NPROC_SHIM, str(nproc)]
    return cmd + [python, "-I", "/sandbox/main.py"]


class Sandbox:
    """Runs Python programs under :class:`Limits`; see the module docstring for what is isolated."""

    def __init__(self, limits: Limits = Limits(), allow_unsandboxed: bool = False,
                 python: str = SANDBOX_PYTHON, uid: int = NOBODY, isolate: bool = True) -> None:
        """``uid``: the unprivileged user programs run as when we are root (never root itself:
        the kernel exempts root from RLIMIT_NPROC). ``isolate=False`` (recipe
        ``rewards.code_sandbox: none``) skips bubblewrap on purpose, which also needs
        ``allow_unsandboxed``."""
        self.limits = limits
        self.python = python
        self.uid = uid
        self.isolated = True
        # root of a container's user namespace that maps only the user's own uid (enroot, pyxis,
        # unshare -r) cannot switch uid, and needs not: it is not the kernel's root
        self._drop_privileges = os.geteuid() == 0 and _uid_mapped(uid)
        self._bwrap = shutil.which("bwrap")
        self._options = _bwrap_options(self._bwrap) if self._bwrap and isolate else set()
        self._nproc_in_userns = _kernel_counts_nproc_per_userns()
        self._tmp_size = "--size" in self._options
        try:
            self._cgroups = cgroup_parents()
        except OSError as e:
            log.warning("cannot look for a cgroup for sandbox runs: %s", e)
            self._cgroups = []
        self.guarantees: list[Guarantee] = []
        problem = self._probe() if isolate else "rewards.code_sandbox is none"
        if problem:
            self.isolated = False
        self.guarantees = self._check_bounds(problem)
        missing = [g for g in self.guarantees if g.status == "missing"]
        if missing:
            what = "; ".join(f"{g.name}: {g.how}" for g in missing)
            if not allow_unsandboxed:
                raise SandboxUnavailable(
                    f"cannot isolate and bound model-written code: {what}. Install bubblewrap >= 0.7 "
                    "(Debian: apt-get install bubblewrap) on a kernel >= 5.14 with user namespaces "
                    "(docs/cluster.md, 'Isolation of model-written code'; check with python -m "
                    "prorl_megatron.rewards.sandbox --check), or set rewards.allow_unsandboxed=true to "
                    "run it without these guarantees (unsafe)."
                )
            log.warning("code sandbox incomplete (%s): running model code %s", what,
                        "UNSANDBOXED" if not self.isolated else "without these bounds")

    def _probe(self) -> Optional[str]:
        if not Path(self.python).is_file():
            return f"{self.python} not found"
        if self._bwrap is None:
            return "bwrap not found on PATH"
        try:
            result = self.run("print('sandbox-ok')")
        except (OSError, subprocess.SubprocessError) as e:
            return f"cannot start bwrap: {e}"
        if result.stdout.strip() != "sandbox-ok":
            return f"bwrap failed: {result.stderr.strip()[-300:] or result.returncode}"
        return None

    def _check_bounds(self, problem: Optional[str]) -> list[Guarantee]:
        """What each run gets here, measured by a probe run with a small task and /tmp limit."""
        if problem:
            return [Guarantee("isolation", "missing", problem),
                    Guarantee("task bound", "missing", "needs the sandbox's user namespace"),
                    Guarantee("memory bound", "missing", "needs the sandbox"),
                    Guarantee("/tmp bound", "missing", "needs the sandbox")]
        probe_limits = replace(self.limits, **_PROBE_LIMITS)
        result = self._run(_PROBE, "", probe_limits)
        try:
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            threads, tmp_bytes = int(measured["threads"]), int(measured["tmp_bytes"])
        except (IndexError, KeyError, ValueError):
            threads, tmp_bytes = -1, -1
        controllers = set().union(*(c.controllers for c in self._cgroups))
        where = {c: f"cgroup v{p.version} under {p.path}" for p in self._cgroups for c in p.controllers}
        tasks = _task_guarantee(threads, probe_limits.max_processes, self._nproc_in_userns, where.get("pids"),
                                self.uid if self._drop_privileges else None, result.stderr)
        if "memory" in controllers:
            memory = Guarantee("memory bound", "held", f"memory limit per run ({where['memory']})")
        elif proc_children_available():
            worst = self.limits.max_processes * self.limits.memory_mib / 1024
            memory = Guarantee("memory bound", "partial", f"no writable memory cgroup: a watchdog checks the "
                               f"run's resident memory every {WATCHDOG_INTERVAL_S * 1000:.0f} ms; between "
                               f"checks only RLIMIT_AS x tasks bounds it ({worst:.0f} GiB)")
        else:
            memory = Guarantee("memory bound", "missing", "no writable memory cgroup, and no "
                               "/proc/PID/task/TID/children for the watchdog")
        if not self._tmp_size:
            tmp = Guarantee("/tmp bound", "missing", "this bubblewrap has no --size (needs >= 0.7)")
        elif not 0 <= tmp_bytes <= (probe_limits.tmp_mib << 20):
            tmp = Guarantee("/tmp bound", "missing", f"the probe wrote {tmp_bytes} bytes to a "
                            f"{probe_limits.tmp_mib} MiB /tmp")
        else:
            tmp = Guarantee("/tmp bound", "held", "a tmpfs of Limits.tmp_mib (bwrap --size)")
        isolation = Guarantee("isolation", "held", "bubblewrap: own user, PID, mount, network and IPC namespaces")
        return [isolation, tasks, memory, tmp]

    def _set_limits(self, limits: Limits, cgroup: Optional[RunCgroup]) -> None:
        """Runs in the child between fork and exec: join the cgroup, set rlimits, drop root."""
        if cgroup is not None:
            cgroup.join()
        cpu = max(1, int(limits.cpu_s + 0.999))
        for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, limits.memory_mib << 20),
                           (resource.RLIMIT_FSIZE, limits.max_file_mib << 20), (resource.RLIMIT_CORE, 0),
                           (resource.RLIMIT_NOFILE, limits.max_open_files)):
            resource.setrlimit(res, (value, value))
        if self._drop_privileges:
            if not (self.isolated and self._nproc_in_userns):  # then it counts the sandbox uid's processes
                resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
            os.setgroups([])
            os.setresgid(self.uid, self.uid, self.uid)
            os.setresuid(self.uid, self.uid, self.uid)

    def run(self, code: str, stdin: str = "") -> RunResult:
        """Run ``code`` with ``stdin``; never raises for anything the program does."""
        return self._run(code, stdin, self.limits)

    def _run(self, code: str, stdin: str, limits: Limits) -> RunResult:
        workdir = Path(tempfile.mkdtemp(prefix="prorl-sandbox-"))
        try:
            program_dir = workdir / "program"
            program_dir.mkdir()
            (program_dir / "main.py").write_text(code)
            (workdir / "stdin").write_text(stdin)
            os.chmod(workdir, 0o755)
            os.chmod(program_dir, 0o755)
            os.chmod(program_dir / "main.py", 0o644)
            return self._execute(functools.partial(self._command, str(program_dir), limits), workdir, limits)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _command(self, program_dir: str, limits: Limits, info_fd: int) -> list[str]:
        if self._bwrap is None or not self.isolated:
            return [self.python, "-I", f"{program_dir}/main.py"]
        return _bwrap_command(self._bwrap, program_dir, self.python, info_fd, self._options,
                              limits.tmp_mib << 20 if self._tmp_size else None,
                              limits.max_processes if self._nproc_in_userns else None)

    def _new_cgroup(self, limits: Limits) -> Optional[RunCgroup]:
        if not self._cgroups:
            return None
        name = f"prorl-sandbox-{os.getpid()}-{next(_names)}"
        memory = (limits.memory_mib + limits.tmp_mib) << 20
        try:
            return RunCgroup(self._cgroups, name, memory, limits.max_processes + EXTRA_TASKS)
        except OSError as e:
            self._cgroup_failed(e)
            return None

    def _cgroup_failed(self, error: BaseException) -> None:
        log.warning("cannot use cgroups %s for sandbox runs (%s): going on with the memory watchdog",
                    [str(c.path) for c in self._cgroups], error)
        self._cgroups = []
        self.guarantees = [Guarantee(g.name, "partial", "watchdog (the cgroup failed)") if g.name == "memory bound"
                           else g for g in self.guarantees]

    def _spawn(self, cmd_for: Callable[[int], list[str]], files: tuple, workdir: Path, limits: Limits,
               cgroup: Optional[RunCgroup]) -> tuple[subprocess.Popen, int]:
        """Start the run; return it and the read end of bwrap's info pipe."""
        info_r, info_w = os.pipe()
        try:
            proc = subprocess.Popen(cmd_for(info_w), stdin=files[0], stdout=files[1], stderr=files[2],
                                    cwd=str(workdir), start_new_session=True, pass_fds=(info_w,),
                                    preexec_fn=lambda: self._set_limits(limits, cgroup),
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        except BaseException:
            os.close(info_r)
            raise
        finally:
            os.close(info_w)
        return proc, info_r

    def _execute(self, cmd_for: Callable[[int], list[str]], workdir: Path, limits: Limits) -> RunResult:
        out_path, err_path = workdir / "stdout", workdir / "stderr"
        start = time.monotonic()
        cgroup = self._new_cgroup(limits)
        try:
            with open(workdir / "stdin", "rb") as fin, open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
                try:
                    proc, info_r = self._spawn(cmd_for, (fin, fout, ferr), workdir, limits, cgroup)
                except subprocess.SubprocessError as e:  # the child could not join the cgroup
                    if cgroup is None:
                        raise
                    cgroup.remove()
                    cgroup = None
                    self._cgroup_failed(e)
                    proc, info_r = self._spawn(cmd_for, (fin, fout, ferr), workdir, limits, None)
                try:
                    timed_out, memory_exceeded = self._wait(proc, limits, cgroup)
                finally:
                    _kill_group(proc)
                    _wait_for_namespace(info_r)
                    os.close(info_r)
                    if cgroup is not None:
                        memory_exceeded = cgroup.memory_killed() or memory_exceeded
                        cgroup.kill_all()
        finally:
            if cgroup is not None:
                cgroup.remove()
        cap = limits.max_file_mib << 20
        return RunResult(
            stdout=out_path.read_bytes()[:cap].decode("utf-8", "replace"),
            stderr=err_path.read_bytes()[-65536:].decode("utf-8", "replace"),
            returncode=None if timed_out else proc.returncode,
            timed_out=timed_out,
            wall_s=time.monotonic() - start,
            memory_exceeded=memory_exceeded,
        )

    def _wait(self, proc: subprocess.Popen, limits: Limits, cgroup: Optional[RunCgroup]) -> tuple[bool, bool]:
        """Wait for the run to end: (timed out, memory exceeded). Every WATCHDOG_INTERVAL_S, stop
        at the first OOM kill of its memory cgroup (the rest of the run goes with it), or,
        without one, when its resident memory is over the limit (the watchdog)."""
        deadline = time.monotonic() + limits.wall_s
        memcg = cgroup is not None and "memory" in cgroup.controllers
        budget = limits.memory_mib << 20
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True, False
            try:
                proc.wait(timeout=min(left, WATCHDOG_INTERVAL_S))
                return False, False
            except subprocess.TimeoutExpired:
                pass
            if cgroup.memory_killed() if memcg else tree_memory_bytes(proc.pid) > budget:
                return False, True

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


def _environment() -> list[tuple[str, str]]:
    """Facts behind the guarantees, for --check."""
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return "absent"

    bwrap = shutil.which("bwrap")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip() if bwrap else ""
    parents = cgroup_parents()
    return [
        ("user", f"uid {os.geteuid()}" + (" (root: programs run as an unprivileged uid)" if os.geteuid() == 0
                                          and _uid_mapped(NOBODY) else "")),
        ("kernel", f"{os.uname().release} (RLIMIT_NPROC per user namespace: "
                   f"{'yes' if _kernel_counts_nproc_per_userns() else 'no, needs >= 5.14'})"),
        ("bubblewrap", version or "not on PATH"),
        ("user.max_user_namespaces", read("/proc/sys/user/max_user_namespaces")),
        ("kernel.unprivileged_userns_clone", read("/proc/sys/kernel/unprivileged_userns_clone")),
        ("kernel.apparmor_restrict_unprivileged_userns",
         read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")),
        ("writable cgroups", ", ".join(f"v{p.version} {p.path} ({'+'.join(sorted(p.controllers))})" for p in parents)
         or "none (no delegation)"),
    ]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prorl_megatron.rewards.sandbox",
                                     description="Check what the code sandbox guarantees on this machine.")
    parser.add_argument("--check", action="store_true", help="print each guarantee as held, partial or missing")
    parser.add_argument("--memory-mib", type=int, default=Limits.memory_mib)
    parser.add_argument("--max-processes", type=int, default=Limits.max_processes)
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.ERROR)
    limits = Limits(memory_mib=args.memory_mib, max_processes=args.max_processes)
    sandbox = Sandbox(limits, allow_unsandboxed=True)
    for name, value in _environment():
        print(f"{name + ':':48} {value}")
    print()
    for g in sandbox.guarantees:
        print(f"{g.status.upper():8} {g.name:14} {g.how}")
    missing = [g.name for g in sandbox.guarantees if g.status == "missing"]
    partial = [g.name for g in sandbox.guarantees if g.status == "partial"]
    print()
    if missing:
        print(f"missing: {', '.join(missing)}: the trainer refuses to score code here unless "
              "rewards.allow_unsandboxed=true")
    elif partial:
        print(f"partial: {', '.join(partial)} (see docs/cluster.md, 'Isolation of model-written code')")
    else:
        print("every guarantee is held")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
