"""HF <-> Megatron checkpoint conversion (the logic behind ``tools/convert_hf.py``).

``hf_to_mcore`` starts a local world of TP x PP processes (gloo on CPU); each builds its
shard of the model, reads only the HF tensors it needs, tensor by tensor, and the shards are
saved together as one megatron dist checkpoint (which then loads at any TP/PP).
``mcore_to_hf`` loads a dist checkpoint into one process and streams HF-named tensors into
safetensors shards. Both write to a temporary directory renamed at the end.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from prorl_megatron.checkpoint import dist_ckpt
from prorl_megatron.checkpoint.hf_mapping import rules, stage_rules
from prorl_megatron.checkpoint.hf_io import CheckpointError, HFReader, HFWriter, atomic_directory, copy_metadata
from prorl_megatron.checkpoint.transfer import check_hf_checkpoint, export_hf_weights, load_hf_weights
from prorl_megatron.config import PrecisionConfig
from prorl_megatron.models.architectures import ModelDims, model_dims, read_hf_config
from prorl_megatron.parallel import free_port


@dataclass(frozen=True)
class HFToMcore:
    hf: str
    out: str
    tp: int = 1
    pp: int = 1
    dtype: Optional[str] = None  # default: the HF checkpoint's dtype


def _checkpoint_dtype(config, override: Optional[str]) -> str:
    if override:
        return override
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    name = str(dtype).replace("torch.", "")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _progress(total: int, enabled: bool, desc: str) -> Callable[[str], None]:
    """A tqdm bar on stderr (rank 0 only); returns the per-tensor callback."""
    if not enabled:
        return lambda name: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, dynamic_ncols=True)
    return lambda name: bar.update(1)


def _hf_to_mcore_rank(rank: int, job: HFToMcore, port: int, dims: ModelDims, dtype: str) -> None:
    from prorl_megatron.models.gpt import build_gpt_model
    from prorl_megatron.parallel import destroy_parallel, init_parallel

    world = job.tp * job.pp
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    layout = init_parallel(job.tp, job.pp, env=env)
    try:
        model = build_gpt_model(dims, PrecisionConfig(params_dtype=dtype), perform_initialization=False)
        reader = HFReader(job.hf)
        n_rules = len(stage_rules(dims, layout.pp_rank, job.pp))
        load_hf_weights(model, reader.get, dims, progress=_progress(n_rules, rank == 0, "hf -> mcore"))
        reader.close()
        meta = {**dist_ckpt.dims_meta(dims), "dtype": dtype, "saved_tp": job.tp, "saved_pp": job.pp}
        dist_ckpt.save_model(model, job.out, job.hf, meta)
    finally:
        destroy_parallel()


def hf_to_mcore(job: HFToMcore) -> Path:
    """Convert an HF checkpoint into a megatron dist checkpoint saved at TP x PP."""
    config = read_hf_config(job.hf)
    dims = model_dims(config)
    reader = HFReader(job.hf)
    check_hf_checkpoint(reader.names(), reader.shape, dims)  # fail before any work or process starts
    if Path(job.out).exists():
        raise CheckpointError(f"{job.out}: already exists; refusing to overwrite it")
    if dims.num_layers % job.pp:
        raise ValueError(f"--pp {job.pp} does not divide num_hidden_layers {dims.num_layers}")
    if dims.num_kv_heads % job.tp or dims.ffn_hidden_size % job.tp or dims.padded_vocab_size % job.tp:
        raise ValueError(f"--tp {job.tp} must divide num_key_value_heads {dims.num_kv_heads}, "
                         f"intermediate_size {dims.ffn_hidden_size} and the padded vocabulary {dims.padded_vocab_size}")
    dtype = _checkpoint_dtype(config, job.dtype)
    port = free_port()
    world = job.tp * job.pp
    if world == 1:
        _hf_to_mcore_rank(0, job, port, dims, dtype)
    else:
        import torch.multiprocessing as mp

        mp.start_processes(_hf_to_mcore_rank, args=(job, port, dims, dtype), nprocs=world,
                           start_method="spawn", join=True)
    return Path(job.out)


def mcore_to_hf(ckpt: str, out: str, hf_config: Optional[str] = None, dtype: Optional[str] = None,
                max_shard_bytes: int = 1024**3) -> Path:
    """Convert a megatron dist checkpoint (any TP/PP) into an HF checkpoint directory."""
    from prorl_megatron.models.gpt import build_gpt_model
    from prorl_megatron.parallel import destroy_parallel, init_parallel

    meta = dist_ckpt.read_meta(ckpt)
    config_dir = Path(hf_config) if hf_config else dist_ckpt.hf_config_dir(ckpt)
    dims = model_dims(read_hf_config(str(config_dir)))
    if meta.get("architecture") not in (None, dims.architecture):
        raise CheckpointError(f"{ckpt}: saved as {meta['architecture']}, but {config_dir}/config.json "
                              f"describes {dims.architecture}")
    params_dtype = meta.get("dtype", "float32")
    out_dtype = getattr(torch, dtype) if dtype else None
    if Path(out).exists():
        raise CheckpointError(f"{out}: already exists; refusing to overwrite it")
    init_parallel(1, 1, env={})
    try:
        model = build_gpt_model(dims, PrecisionConfig(params_dtype=params_dtype), perform_initialization=False)
        dist_ckpt.load_model(model, ckpt)
        with atomic_directory(out) as tmp:
            writer = HFWriter(tmp, max_shard_bytes=max_shard_bytes)
            progress = _progress(sum(len(rule.hf) for rule in rules(dims)), True, "mcore -> hf")
            for name, tensor in export_hf_weights(model, dims, dtype=out_dtype):
                writer.add(name, tensor)
                progress(name)
            writer.finish()
            copy_metadata(config_dir, tmp)
    finally:
        destroy_parallel()
    return Path(out)

