import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.megatron.conftest import ROOT, env


def train_command(run_dir: Path, hf_dir: Path, *overrides: str, nproc: int = 2, module: str = "prorl_megatron.train"):
    """torchrun + the tiny recipe, shrunk for tests (8 prompts x 8 samples, 2 updates per step)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, "--recipe", "recipes/tiny_cpu.yaml", f"model.hf_path={hf_dir}",
            f"checkpoint.dir={run_dir}/ckpt", f"logging.dir={run_dir}/logs", "train.prompts_per_step=8",
            "train.mini_batch_prompts=4", "train.max_tokens_per_micro_batch=384", "eval.n_samples=4", "eval.ks=[1,4]",
            "eval.every_n_steps=0", "logging.console_every=1", *overrides]


def run(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its workers in sessions of their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def start_until(command: list[str], condition, timeout: float = 600) -> subprocess.Popen:
    """Start ``command`` in a session of its own; return it once ``condition()`` holds."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before the point waited for:\n"
                                     + proc.stdout.read()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError("the point waited for was not reached in time")
            time.sleep(0.005)
    except BaseException:
        kill_tree(proc.pid)
        proc.wait()
        raise
    return proc


def kill_when(command: list[str], condition, timeout: float = 600) -> str:
    """Start ``command``; SIGKILL it and all its descendants as soon as ``condition()`` holds."""
    proc = start_until(command, condition, timeout)
    kill_tree(proc.pid)
    proc.wait()
    return proc.stdout.read()


def signal_when(command: list[str], condition, sig: int = signal.SIGUSR1, timeout: float = 600) -> tuple[int, str]:
    """Start ``command`` (torchrun); once ``condition()`` holds, send ``sig`` to every worker
    (torchrun's children, as srun signals every task); return its exit status and output."""
    import psutil

    proc = start_until(command, condition, timeout)
    try:
        for worker in psutil.Process(proc.pid).children():
            worker.send_signal(sig)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    return proc.returncode, out
