import signal
import subprocess
import sys
from pathlib import Path

from tests import procs
from tests.megatron.conftest import ROOT, env  # noqa: F401 (ROOT: re-exported to the run tests)


def train_command(run_dir: Path, hf_dir: Path, *overrides: str, nproc: int = 2, module: str = "prorl_megatron.train"):
    """torchrun + the tiny recipe, shrunk for tests (8 prompts x 8 samples, 2 updates per step)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, "--recipe", "recipes/tiny_cpu.yaml", f"model.hf_path={hf_dir}",
            f"checkpoint.dir={run_dir}/ckpt", f"logging.dir={run_dir}/logs", "train.prompts_per_step=8",
            "train.mini_batch_prompts=4", "train.max_tokens_per_micro_batch=384", "eval.n_samples=4", "eval.ks=[1,4]",
            "eval.every_n_steps=0", "logging.console_every=1", *overrides]


def run(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``command`` to its end (the whole tree killed and the test failed past ``timeout`` s)."""
    return procs.run(command, timeout=timeout, env=env())


def start_until(command: list[str], condition, timeout: float = 600) -> procs.Child:
    """Start ``command`` in a session of its own; return it once ``condition()`` holds (the tree
    killed and the test failed with its output if it ends first or ``timeout`` s pass)."""
    child = procs.Child(command, env=env())
    child.wait_until(condition, timeout)
    return child


def kill_when(command: list[str], condition, timeout: float = 600) -> str:
    """Start ``command``; SIGKILL it and all its descendants as soon as ``condition()`` holds;
    return its output."""
    child = start_until(command, condition, timeout)
    child.kill()
    return child.output()


def signal_when(command: list[str], condition, sig: int = signal.SIGUSR1, timeout: float = 600) -> tuple[int, str]:
    """Start ``command`` (torchrun); once ``condition()`` holds, send ``sig`` to every worker
    (torchrun's children, as srun signals every task); return its exit status and output."""
    with start_until(command, condition, timeout) as child:
        child.signal_children(sig)
        status = child.wait(timeout)
    return status, child.output()
