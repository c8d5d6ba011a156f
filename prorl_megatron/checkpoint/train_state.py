"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

``<checkpoint.dir>/step_00000012/`` is one megatron dist checkpoint holding the policy
(unprefixed keys, so :func:`prorl_megatron.checkpoint.dist_ckpt.load_model` and ``eval.py``
read it like a converted model), the reference (``reference.`` keys) and the optimizer state;
``rng/rank_XXXXX.pt`` (each rank's RNG states), ``hf/`` and ``prorl_meta.json`` (step,
reset-scheduler state, data position, counters), written last. The directory appears by an
atomic rename, and ``<checkpoint.dir>/latest`` (the name of the newest complete checkpoint)
is replaced after it, so a run killed at any moment resumes from a complete checkpoint.
Only the newest ``keep_last`` are kept.
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

log = logging.getLogger(__name__)

LATEST = "latest"
REFERENCE_PREFIX = "reference."
_STEP_DIR = re.compile(r"^step_(\d{8})$")


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
    not be asked to allocate them for loading)."""
    state = dict(policy.sharded_state_dict())
    policy_state = dict(state)
    state.update(reference.sharded_state_dict(prefix=REFERENCE_PREFIX))
    state["optimizer"] = _scaler_on_cpu(optimizer.sharded_state_dict(policy_state, is_loading=is_loading and moments))
    return state


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
            "loop": loop_state}
    target = save_state(_sharded_state(policy, reference, optimizer, not optimizer_empty), step_dir(root, step),
                        hf_metadata_dir, meta, rank_files=write_rng, replace=True)
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
    optimizer.load_state_dict(opt_state)  # with the fp32 main weights: nothing reverts to the base model
    rng = _rng_file(path, dist.get_rank())
    if meta.get("world_size") == dist.get_world_size() and rng.is_file():
        restore_rng(torch.load(rng, weights_only=False))
    else:
        log.warning("%s: saved by a world of %s processes, this one has %d: RNG states not restored",
                    path, meta.get("world_size"), dist.get_world_size())
    return meta
