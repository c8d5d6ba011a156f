"""Megatron model checkpoints with ``megatron.core.dist_checkpointing`` (resharding on load).

A checkpoint directory holds megatron's ``torch_dist`` files (global tensors stored as
chunks, so a checkpoint saved at one TP/PP loads at any other), ``hf/`` (the HF
``config.json`` and tokenizer files the model was built from) and ``prorl_meta.json``,
written last: a directory without it is incomplete and is never loaded. Saving goes to a
temporary sibling directory that is renamed when every rank has finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from prorl_megatron.checkpoint.hf_io import CheckpointError, copy_metadata
from prorl_megatron.models.architectures import ModelDims

META_FILE = "prorl_meta.json"
HF_DIR = "hf"
FORMAT_VERSION = 1


def _broadcast_str(value: Optional[str]) -> str:
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def save_model(model: torch.nn.Module, directory: str | Path, hf_metadata_dir: str | Path,
               meta: Optional[dict[str, Any]] = None) -> Path:
    """Save this model (all ranks call it) into ``directory`` atomically; return the path.

    ``hf_metadata_dir``: where ``config.json`` and the tokenizer files come from (copied
    into ``hf/``). ``meta``: extra JSON-able facts recorded in ``prorl_meta.json``.
    """
    return save_state(model.sharded_state_dict(), directory, hf_metadata_dir, meta)


def save_state(sharded_state: dict[str, Any], directory: str | Path, hf_metadata_dir: str | Path,
               meta: Optional[dict[str, Any]] = None,
               rank_files: Optional[Callable[[Path], None]] = None, replace: bool = False) -> Path:
    """Save a megatron sharded state dict into ``directory`` atomically (all ranks call it).

    Everything goes to a temporary sibling directory: the dist checkpoint, then whatever
    ``rank_files(tmp)`` writes on each rank, then ``hf/`` and ``prorl_meta.json`` (last);
    only then is it renamed to ``directory``. ``replace``: an existing ``directory`` (a
    leftover of a run that died before it was recorded anywhere) is replaced, not refused.
    """
    from megatron.core import dist_checkpointing

    final = Path(directory)
    tmp = None
    if dist.get_rank() == 0:
        if final.exists() and not replace:
            raise CheckpointError(f"{final}: already exists; refusing to overwrite it")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{final.name}.incomplete-", dir=final.parent)
    tmp = Path(_broadcast_str(tmp))
    try:
        dist_checkpointing.save(sharded_state, str(tmp))
        if rank_files is not None:
            rank_files(tmp)
        dist.barrier()
        if dist.get_rank() == 0:
            (tmp / HF_DIR).mkdir()
            copied = copy_metadata(hf_metadata_dir, tmp / HF_DIR)
            if "config.json" not in copied:
                raise CheckpointError(f"{hf_metadata_dir}: no config.json to record with the checkpoint")
            record = {"format_version": FORMAT_VERSION, **(meta or {})}
            (tmp / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            if final.exists():
                stale = final.with_name(f".{final.name}.replaced-{os.getpid()}")
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
        dist.barrier()
    finally:
        if dist.get_rank() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's ``prorl_meta.json``; raises CheckpointError for an incomplete directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    path = directory / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {META_FILE}); it was never finished")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from None


def load_model(model: torch.nn.Module, directory: str | Path) -> dict[str, Any]:
    """Load weights saved by :func:`save_model` into ``model`` at the current TP/PP; return meta."""
    from megatron.core import dist_checkpointing

    meta = read_meta(directory)
    wanted = model.sharded_state_dict()
    try:
        state = dist_checkpointing.load(wanted, str(directory))
    except Exception as e:  # megatron raises assorted errors for missing or mismatched shards
        raise CheckpointError(f"{directory}: cannot load into this model: {type(e).__name__}: {e}") from e
    # the checkpoint's common state comes too (a training checkpoint's optimizer param groups): not the model's
    state = {k: v for k, v in state.items() if k in wanted}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: missing {missing}, unexpected {unexpected}")
    return meta


def hf_config_dir(directory: str | Path) -> Path:
    """Where the checkpoint keeps its HF config and tokenizer."""
    return Path(directory) / HF_DIR


def dims_meta(dims: ModelDims) -> dict[str, Any]:
    return {"architecture": dims.architecture, "vocab_size": dims.vocab_size,
            "padded_vocab_size": dims.padded_vocab_size, "num_layers": dims.num_layers}
