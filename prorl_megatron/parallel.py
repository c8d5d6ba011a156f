"""Start torch.distributed and Megatron's ``parallel_state`` from the launcher's environment.

One process per device, started by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK) or by
Slurm's ``srun`` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID), with MASTER_ADDR and
MASTER_PORT naming the rendezvous. A plain ``python`` process is a world of one. With CUDA
the default group has two backends, ``cpu:gloo,cuda:nccl`` (:func:`process_group_backend`):
NCCL carries CUDA tensors, gloo CPU tensors, object collectives and barriers, so a CPU tensor
reaching a collective is not fatal; still, every tensor collective of the package runs on
the layout's device (:func:`prorl_megatron.collect.collective_device`). Without CUDA it is
gloo (and :mod:`prorl_megatron.cpu_patches` is applied first). Megatron's groups are made by
``new_group`` without a backend, so they inherit both. The world is laid out as TP x PP x DP;
DP is what remains.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist


class ParallelError(RuntimeError):
    """The launch environment or the requested layout cannot be used."""


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is, as the launcher says."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


@dataclass(frozen=True)
class Layout:
    """The parallel layout of this process (sizes and its coordinates)."""

    world_size: int
    tensor: int
    pipeline: int
    data: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline - 1


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ParallelError(f"environment variable {name}={env[name]!r} is not an integer") from None


def free_port() -> int:
    """An unused TCP port on the loopback interface (for single-machine rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read rank/world/local rank and the rendezvous address from torchrun's or Slurm's variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher, names = "torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher, names = "slurm", ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        launcher, names = "single", ()
    rank, world, local = (_int_env(env, names[0]), _int_env(env, names[1]),
                          _int_env(env, names[2]) if names[2] in env else 0) if names else (0, 1, 0)
    if not 0 <= rank < world:
        raise ParallelError(f"rank {rank} is outside a world of size {world} ({launcher} environment)")
    if world > 1 and "MASTER_ADDR" not in env:
        raise ParallelError(f"MASTER_ADDR is not set: a {launcher}-launched world of {world} processes "
                            "needs a rendezvous address (the Slurm script sets it from "
                            "`scontrol show hostnames`)")
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else (29500 if world > 1 else free_port())
    return LaunchEnv(rank, world, local, addr, port, launcher)


def check_layout(world_size: int, tensor: int, pipeline: int) -> int:
    """Return the data-parallel size, or raise naming the sizes that do not factor."""
    if tensor < 1 or pipeline < 1:
        raise ParallelError(f"parallel.tensor ({tensor}) and parallel.pipeline ({pipeline}) must be >= 1")
    if world_size % (tensor * pipeline) != 0:
        raise ParallelError(
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
            f"{tensor} x {pipeline} = {tensor * pipeline}; launch a multiple of {tensor * pipeline} processes"
        )
    return world_size // (tensor * pipeline)


def process_group_backend(use_cuda: bool) -> str:
    """The default group's backend: ``cpu:gloo,cuda:nccl`` with CUDA (NCCL rejects CPU tensors:
    "No backend type associated with device type cpu"), ``gloo`` without.

    No ``device_id`` is bound: it would only make NCCL connect eagerly and split sub-groups
    from the world communicator (``ncclCommSplit``); object collectives and barriers on a
    two-backend group go through gloo, so they need no bound device either.
    """
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_parallel(tensor: int = 1, pipeline: int = 1, seed: int = 1234,
                  timeout_s: float = 1800.0, env: Optional[Mapping[str, str]] = None) -> Layout:
    """Initialise torch.distributed (if needed) and megatron ``parallel_state``; seed the RNGs.

    Args:
        tensor, pipeline: model-parallel sizes (the recipe's ``parallel`` section).
        seed: base seed; megatron's tracker derives the per-TP-rank model-parallel seeds.
    Returns:
        this process's :class:`Layout`.
    """
    launch = read_launch_env(env)
    data = check_layout(launch.world_size, tensor, pipeline)
    use_cuda = torch.cuda.is_available()
    # the device this process uses: its local rank among the GPUs it sees (one, where the
    # scheduler binds a GPU per task)
    device_index = launch.local_rank % torch.cuda.device_count() if use_cuda else launch.local_rank
    if env is None:  # libraries that expect torchrun's variables (vLLM's external launcher) get them under srun too;
        # vLLM takes LOCAL_RANK as its CUDA device index, so it names the device chosen here
        for name, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size), ("LOCAL_RANK", device_index),
                            ("MASTER_ADDR", launch.master_addr), ("MASTER_PORT", launch.master_port)):
            os.environ.setdefault(name, str(value))
    if use_cuda:
        torch.cuda.set_device(device_index)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        from prorl_megatron import cpu_patches

        cpu_patches.apply()
        device = torch.device("cpu")

    if not dist.is_initialized():
        dist.init_process_group(
            backend=process_group_backend(use_cuda),
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    elif dist.get_world_size() != launch.world_size:
        raise ParallelError(f"torch.distributed already runs a world of {dist.get_world_size()}, "
                            f"the environment says {launch.world_size}")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return Layout(
        world_size=launch.world_size, tensor=tensor, pipeline=pipeline, data=data,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (idempotent)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
