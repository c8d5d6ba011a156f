"""Bounds on one sandbox run as a whole: a cgroup per run where we may create one, else a watchdog.

:mod:`.sandbox` bounds tasks (processes + threads) with ``RLIMIT_NPROC`` set *inside* the
run's own user namespace, which since Linux 5.14 counts only that namespace's tasks. This
module adds what rlimits cannot give:

- :class:`RunCgroup`: a child cgroup per run, with ``pids.max`` and a memory limit covering
  every process of the run and its ``/tmp`` (tmpfs pages are charged to the writer's cgroup).
  Parents are found by :func:`cgroup_parents`: ``$PRORL_SANDBOX_CGROUP`` (``:``-separated
  directories delegated to us), else our own cgroups where we may create children (root, or
  a delegated cgroup v1 directory; on cgroup v2 only one that already has ``memory`` and
  ``pids`` in ``cgroup.subtree_control``).
- :func:`tree_memory_bytes`: the resident private memory of a process tree, which the
  sandbox's watchdog polls when no memory cgroup is available. That is best effort: a program
  can allocate between two polls, so the hard bound is then only each process's
  ``RLIMIT_AS`` times the task limit.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

CGROUP_ENV = "PRORL_SANDBOX_CGROUP"
CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class CgroupParent:
    """A cgroup directory we may create per-run children in, and what they can limit."""

    path: Path
    version: int  # 1 or 2
    controllers: frozenset  # a subset of CONTROLLERS


def _classify(path: Path, mounted: frozenset = frozenset()) -> Optional[CgroupParent]:
    """``mounted``: the v1 controllers of the hierarchy (a root cgroup has no ``pids.max``)."""
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        return None
    if (path / "cgroup.subtree_control").exists():  # v2: children get what the subtree enables
        try:
            enabled = set((path / "cgroup.subtree_control").read_text().split())
        except OSError:
            return None
        found = frozenset(c for c in CONTROLLERS if c in enabled)
        return CgroupParent(path, 2, found) if found else None
    found = frozenset(c for c, f in (("memory", "memory.limit_in_bytes"), ("pids", "pids.max"))
                      if c in mounted or (path / f).exists())
    return CgroupParent(path, 1, found) if found else None


def _own_cgroup_dirs() -> list[tuple[Path, frozenset]]:
    """Our cgroup directory in each mounted hierarchy, with the hierarchy's v1 controllers."""
    try:
        own = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    dirs = []
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) < 5 or len(after) < 3 or after[0] not in ("cgroup", "cgroup2"):
            continue
        root, mountpoint = fields[3], fields[4]
        options = set(after[2].split(","))
        for _, names, cg_path in own:
            is_v2 = names == "" and after[0] == "cgroup2"
            if not (is_v2 or (after[0] == "cgroup" and names and set(names.split(",")) <= options)):
                continue
            if root != "/" and not (cg_path == root or cg_path.startswith(root.rstrip("/") + "/")):
                continue
            rel = cg_path[len(root):] if root != "/" else cg_path
            dirs.append((Path(mountpoint) / rel.lstrip("/"), frozenset(options & set(CONTROLLERS))))
    return dirs


def cgroup_parents() -> list[CgroupParent]:
    """Where per-run cgroups go: at most one parent per controller (see the module docstring)."""
    env = os.environ.get(CGROUP_ENV, "")
    candidates = [(Path(p), frozenset()) for p in env.split(":") if p] if env else _own_cgroup_dirs()
    chosen: list[CgroupParent] = []
    covered: set[str] = set()
    for path, mounted in candidates:
        parent = _classify(path, mounted)
        if parent is None:
            if env:
                log.warning("%s: %s is not a writable cgroup with memory or pids", CGROUP_ENV, path)
            continue
        new = parent.controllers - covered
        if new:
            chosen.append(CgroupParent(parent.path, parent.version, frozenset(new)))
            covered |= new
    return chosen


class RunCgroup:
    """One run's cgroup(s): created with limits, joined by the run's first process, then removed."""

    def __init__(self, parents: list[CgroupParent], name: str, memory_bytes: int, max_tasks: int) -> None:
        self.dirs: list[tuple[CgroupParent, Path]] = []
        try:
            for parent in parents:
                path = parent.path / name
                path.mkdir()
                self.dirs.append((parent, path))
                if "pids" in parent.controllers:
                    _write(path / "pids.max", max_tasks)
                if "memory" in parent.controllers and parent.version == 2:
                    _write(path / "memory.max", memory_bytes)
                    _write(path / "memory.swap.max", 0, optional=True)
                    _write(path / "memory.oom.group", 1, optional=True)  # the OOM kill takes the whole run
                elif "memory" in parent.controllers:
                    _write(path / "memory.limit_in_bytes", memory_bytes)
                    _write(path / "memory.memsw.limit_in_bytes", memory_bytes, optional=True)  # no swap
        except OSError:
            self.remove()
            raise
        self.controllers = frozenset().union(*(p.controllers for p, _ in self.dirs))
        self._procs = [str(path / "cgroup.procs") for _, path in self.dirs]

    def join(self) -> None:
        """Move the calling process in (runs in the child between fork and exec)."""
        pid = str(os.getpid()).encode()
        for procs in self._procs:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def memory_killed(self) -> bool:
        """Whether the kernel OOM-killed something of the run for its memory limit."""
        for parent, path in self.dirs:
            if "memory" not in parent.controllers:
                continue
            events = path / ("memory.events" if parent.version == 2 else "memory.oom_control")
            try:
                for line in events.read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key in ("oom_kill", "oom_group_kill") and int(value) > 0:
                        return True
            except (OSError, ValueError):
                pass
        return False

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self._procs:
            try:
                found.update(int(p) for p in Path(procs).read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL whatever of the run is still in its cgroup, until it is empty."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            left = self.pids()
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.005)
        log.warning("sandbox cgroup still holds processes %s after SIGKILL", sorted(self.pids())[:10])

    def remove(self) -> None:
        for _, path in reversed(self.dirs):
            for _ in range(200):  # the kernel removes exited tasks from the cgroup asynchronously
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)
            else:
                log.warning("could not remove sandbox cgroup %s", path)
        self.dirs = []


def _write(path: Path, value: int, optional: bool = False) -> None:
    try:
        path.write_text(str(value))
    except FileNotFoundError:
        if not optional:
            raise


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants, via ``/proc/PID/task/TID/children``.

    A sandbox's processes all descend from bwrap: orphans are re-parented to the PID
    namespace's init, which is bwrap's child.
    """
    seen, stack = [], [root]
    while stack:
        pid = stack.pop()
        seen.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                pass
    return seen


def tree_memory_bytes(root: int) -> int:
    """Resident anonymous + shared-memory bytes of ``root``'s process tree.

    File-backed pages (the interpreter, libraries) are left out: they are page cache the kernel
    can drop. Pages still shared copy-on-write after a fork count once per process, which
    errs on the side of killing.
    """
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssShmem:")):
                        total += int(line.split()[1]) << 10
        except (OSError, ValueError, IndexError):
            pass
    return total


def proc_children_available() -> bool:
    return Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()
