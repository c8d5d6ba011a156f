"""A real single-node Slurm for tests: munged, slurmctld and slurmd started as root, no systemd.

Everything lives in one temporary directory (config, munge key and socket, state, spool,
logs); the daemons run in the foreground as child processes and are stopped by their PIDs.
Clients find the cluster through ``SLURM_CONF``. Daemons, clients and so every job (sbatch
exports its environment) carry one token (tests/procs.py): stopping the cluster kills whatever
of it is left, a job's processes included, whatever a failed test left running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

from tests import procs

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def missing() -> str:
    """Why this machine cannot host the test cluster ('' when it can)."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"Slurm/munge not installed ({', '.join(absent)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the test cluster's daemons must start as root"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.token = uuid.uuid4().hex

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), procs.TOKEN_VAR: self.token}

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        cpus = os.cpu_count() or 1
        self.conf.write_text(f"""\
ClusterName=prorl-ci
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=5
SchedulerType=sched/backfill
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={max(memory - 1024, 1024)} State=UNKNOWN
PartitionName=ci Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def start(self) -> "Cluster":
        self.write_config()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.root / "munge"
        self._spawn(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={m}/munge.socket",
                     f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "munge.socket").exists(), "munged socket")
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping").returncode == 0, "slurmctld")
        self._spawn(["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, "an idle node")
        return self

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{cmd[0]}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}:\n"
                                       + self.logs())
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n" + self.logs())
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*"))
                         if p.is_file())

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command (the test fails with its output past ``timeout`` s)."""
        return procs.run(list(cmd), timeout=timeout, env=self.env, token=self.token)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "GONE"

    def stop(self) -> None:
        """Stop the daemons by their PIDs, then kill whatever still carries the cluster's token
        (a job a failed test left running: its batch script, srun, torchrun, the trainers)."""
        for p in reversed(self.procs):  # slurmd, slurmctld, munged: by PID
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        procs.kill_tree(None, self.token)
