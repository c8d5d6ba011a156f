"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

``<checkpoint.dir>/step_00000012/`` is one megatron dist checkpoint holding the policy
(unprefixed keys, so :func:`prorl_megatron.checkpoint.dist_ckpt.load_model` and ``eval.py``
read it like a converted model), the reference (``reference.`` keys) and the optimizer state;
``rng/rank_XXXXX.pt`` (each rank's RNG states), ``hf/`` and ``prorl_meta.json`` (step,
reset-scheduler state, data position, counters), written last. The directory appears by an
atomic rename, and ``<checkpoint.dir>/latest`` (the name of the newest complete checkpoint)
is replaced after it, so a run killed at any moment resumes from a complete checkpoint.
Only the newest ``keep_last`` are kept.

With ``train.distributed_optimizer`` the optimizer state is saved in megatron's
``fully_reshardable`` layout (:data:`DIST_OPT_LAYOUT`): tensors shaped like the parameters, so
the checkpoint loads at any DP (and TP/PP) size.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from prorl_megatron.checkpoint.dist_ckpt import read_meta, save_state
from prorl_megatron.checkpoint.hf_io import CheckpointError
from prorl_megatron.models.policy import reset_optimizer_state

log = logging.getLogger(__name__)

LATEST = "latest"
REFERENCE_PREFIX = "reference."
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# megatron's DistributedOptimizer checkpoint format (megatron-core 0.16.1). 'fully_reshardable'
# gathers each data-parallel group's fp32 main weights and moments onto its DP rank 0 (over the
# gloo DP group, into host memory: the memory-efficient variant; megatron's other one all-gathers
# the whole state onto every rank) and saves them in model space, like the plain optimizer's
# state; loading, each rank reads the whole of it (host memory) and keeps its own slices. The
# alternatives: 'dp_reshardable' (no gather: the buckets as they are, so it loads only where the
# model, TP/PP and bucket layout are the same) and 'fully_sharded_model_space', which 0.16.1
# can no longer save ("ShardedTensor.flattened_range is not supported").
DIST_OPT_LAYOUT = {"distrib_optim_sharding_type": "fully_reshardable",
                   "distrib_optim_fully_reshardable_mem_efficient": True}


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def rng_states() -> dict[str, Any]:
    """This process's RNG states (Python, numpy, torch, megatron's tracker, CUDA)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank_{rank:05d}.pt"


def _sharded_state(policy: Any, reference: Any, optimizer: Any, moments: bool, is_loading: bool = False) -> dict[str, Any]:
    """The policy, the reference and the optimizer: its fp32 main weights (bf16/fp16), loss
    scaler and param groups always, and Adam's moments when it has them (``moments``: not
    right after a reset, when a fresh optimizer has none; megatron then saves none and must
    not be asked to allocate them for loading; the distributed optimizer saves zeros, see
    :func:`_allocate_moments`)."""
    state = dict(policy.sharded_state_dict())
    policy_state = dict(state)
    state.update(reference.sharded_state_dict(prefix=REFERENCE_PREFIX))
    distributed = _distributed_optimizer(optimizer)
    if distributed is None:
        opt_state = optimizer.sharded_state_dict(policy_state, is_loading=is_loading and moments)
    else:  # megatron's saves and loads moments always: an empty one gets zeros for the time being
        _allocate_moments(distributed)
        opt_state = optimizer.sharded_state_dict(policy_state, is_loading=is_loading, metadata=DIST_OPT_LAYOUT)
    state["optimizer"] = _scaler_on_cpu(opt_state)
    return state


def _distributed_optimizer(optimizer: Any) -> Any:
    """The policy's megatron ``DistributedOptimizer`` (None: the plain optimizer)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    distributed = [o for o in chained if isinstance(o, DistributedOptimizer)]
    if not distributed:
        return None
    if len(chained) != 1:  # megatron chains a second optimizer for MoE expert parameters only
        raise NotImplementedError(f"checkpoints of {len(chained)} chained distributed optimizers")
    return distributed[0]


def _allocate_moments(opt: Any) -> None:
    """Give every parameter of a distributed optimizer that has no Adam state (fresh, or just
    reset) zero moments: megatron's ``DistributedOptimizer`` saves and loads the moments of every
    parameter (a fresh one has none to load into), and with torch's Adam (no apex/TE, as on CPU)
    its ``state_dict`` asserts one step count across the per-parameter states, so they also get
    torch's initial step, 0. A checkpoint of an empty optimizer thus holds zero moments, and
    the optimizer is emptied again after saving and loading it (``optimizer_empty``)."""
    opt.init_state_fn(opt.optimizer, opt.config)
    if isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        for state in opt.optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))


def _load_distributed(opt: Any, state: dict[str, Any]) -> None:
    """megatron's ``DistributedOptimizer.load_state_dict``, with its parameter state loaded apart.

    Its ``fully_reshardable`` loader copies every tensor of each parameter's state from the
    checkpoint, but saved only the main weights and moments: torch's Adam (no apex/TE, as on
    CPU) also keeps a per-parameter ``step`` (restored from the param groups instead), on which
    it fails. And ``load_state_dict`` gives all parameters one and the same ``step`` tensor,
    which torch's Adam increments in place, once per parameter: each gets its own copy back.
    """
    param_state = state.pop("param_state")
    if state.pop("param_state_sharding_type") != DIST_OPT_LAYOUT["distrib_optim_sharding_type"]:
        raise CheckpointError("the distributed optimizer's state is not in the fully_reshardable layout")
    opt.load_state_dict(state)  # param groups (step counts), loss scaler
    for group in opt.optimizer.param_groups:  # saved from torch's Adam (CPU) as a float; apex's and
        if "step" in group and not torch.is_tensor(group["step"]):  # TE's FusedAdam pass it to an int
            group["step"] = int(group["step"])  # argument of their CUDA kernel
    steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    opt.load_parameter_state_from_fully_reshardable(param_state)
    for p, step in steps.items():
        opt.optimizer.state[p]["step"] = step.clone()


def _scaler_on_cpu(state: Any) -> Any:
    """The fp16 loss scaler's tensors (CUDA on a GPU) moved to the CPU: they are common state,
    which megatron broadcasts from rank 0 on save; unpickled elsewhere, a CUDA tensor would land
    on rank 0's device (an extra CUDA context per rank on GPU 0). Loading moves them back."""
    if isinstance(state, dict):
        return {k: ({n: t.cpu() if torch.is_tensor(t) else t for n, t in v.items()} if k == "grad_scaler"
                    and isinstance(v, dict) else _scaler_on_cpu(v)) for k, v in state.items()}
    if isinstance(state, list):
        return [_scaler_on_cpu(v) for v in state]
    return state


def save_checkpoint(root: str | Path, step: int, policy: Any, reference: Any, optimizer: Any,
                    hf_metadata_dir: str | Path, loop_state: dict[str, Any], optimizer_empty: bool,
                    keep_last: int) -> Path:
    """Write step ``step``'s checkpoint (collective), point ``latest`` at it, prune old ones.

    ``policy``/``reference``: the GPTModel shards; ``loop_state``: JSON-able (scheduler,
    data position, counters); ``optimizer_empty``: Adam has no moments (just reset).
    """
    root = Path(root)
    if dist.get_rank() == 0:
        for leftover in root.glob(".step_*.incomplete-*"):  # a save that was killed mid-write
            shutil.rmtree(leftover, ignore_errors=True)

    def write_rng(tmp: Path) -> None:
        path = _rng_file(tmp, dist.get_rank())
        path.parent.mkdir(exist_ok=True)
        torch.save(rng_states(), path)

    meta = {"step": step, "world_size": dist.get_world_size(), "optimizer_empty": optimizer_empty,
            "distributed_optimizer": _distributed_optimizer(optimizer) is not None, "loop": loop_state}
    target = save_state(_sharded_state(policy, reference, optimizer, not optimizer_empty), step_dir(root, step),
                        hf_metadata_dir, meta, rank_files=write_rng, replace=True)
    if optimizer_empty and meta["distributed_optimizer"]:
        reset_optimizer_state(optimizer)  # drop the zero moments it was saved with
    if dist.get_rank() == 0:
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(target.name + "\n")
        os.replace(pointer, root / LATEST)
        complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and p != target)
        for old in complete[: max(0, len(complete) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return target


def find_checkpoint(root: str | Path, resume: str) -> Optional[Path]:
    """The checkpoint to resume from: ``resume`` is ``none``, ``auto`` (what ``latest`` names
    under ``root``; None for a fresh run) or a checkpoint directory. Raises
    :class:`CheckpointError` naming the path when it is missing, incomplete or corrupt."""
    if resume == "none":
        return None
    if resume != "auto":
        read_meta(resume)
        return Path(resume)
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.match(name):
        raise CheckpointError(f"{pointer}: corrupt pointer {name!r} (expected step_NNNNNNNN)")
    path = Path(root) / name
    read_meta(path)
    return path


def load_checkpoint(path: str | Path, policy: Any, reference: Any, optimizer: Any) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (any TP/PP layout); return its meta.

    RNG states are restored only when the world size is unchanged (they are per rank).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = read_meta(path)
    moments = not meta.get("optimizer_empty", False)
    distributed = _distributed_optimizer(optimizer)
    if meta.get("distributed_optimizer", False) != (distributed is not None):
        raise CheckpointError(f"{path}: saved with train.distributed_optimizer={meta.get('distributed_optimizer', False)}"
                              f", this run has {distributed is not None}: their optimizer states differ in layout")
    try:
        state = dist_checkpointing.load(_sharded_state(policy, reference, optimizer, moments, True), str(path))
    except Exception as e:  # megatron raises assorted errors for missing or mismatched shards
        raise CheckpointError(f"{path}: cannot load: {type(e).__name__}: {e}") from e
    opt_state = state.pop("optimizer")
    ref_state = {k[len(REFERENCE_PREFIX):]: v for k, v in state.items() if k.startswith(REFERENCE_PREFIX)}
    policy_state = {k: v for k, v in state.items() if not k.startswith(REFERENCE_PREFIX)}
    for name, model, part in (("policy", policy, policy_state), ("reference", reference, ref_state)):
        missing, unexpected = model.load_state_dict(part, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{path}: {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if distributed is None:
        optimizer.load_state_dict(opt_state)  # with the fp32 main weights: nothing reverts to the base model
    else:
        _load_distributed(distributed, opt_state)
        if not moments:
            reset_optimizer_state(optimizer)  # the zero moments it was saved with
    rng = _rng_file(path, dist.get_rank())
    if meta.get("world_size") == dist.get_world_size() and rng.is_file():
        restore_rng(torch.load(rng, weights_only=False))
    else:
        log.warning("%s: saved by a world of %s processes, this one has %d: RNG states not restored",
                    path, meta.get("world_size"), dist.get_world_size())
    return meta


def checkpoint_before(root: str | Path, step: int) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` of a step before ``step`` (None: none)."""
    root = Path(root)
    found = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and int(p.name[5:]) < step) \
        if root.is_dir() else []
    return found[-1] if found else None


def rewind_checkpoints(root: str | Path, path: str | Path) -> None:
    """Make checkpoint ``path`` the newest under ``root`` (collective; rank 0 writes): ``latest``
    names it, then the checkpoints of later steps are removed (a rollback discarded those steps;
    a resume must not find them)."""
    root, name = Path(root), Path(path).name
    if dist.get_rank() == 0:
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / LATEST)
        for later in root.iterdir():
            if _STEP_DIR.match(later.name) and later.name > name:
                shutil.rmtree(later, ignore_errors=True)
    dist.barrier()
