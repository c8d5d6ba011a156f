"""Reading and writing Hugging Face checkpoints (config + safetensors + tokenizer) tensor by tensor.

Tensors are read lazily, one at a time, from a single ``model.safetensors`` or from the
shards listed in ``model.safetensors.index.json``; they are written in shards of bounded
size. Output directories are built under a temporary name and renamed at the end, so a
killed conversion never leaves a half checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied through unchanged between HF checkpoints (config and tokenizer).
METADATA_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the path."""


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise CheckpointError(f"{self.directory}: no config.json (not a Hugging Face checkpoint directory)")
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable safetensors index ({e})") from None
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(str(self.directory / SINGLE_FILE), framework="pt") as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        for file in sorted(set(weight_map.values())):
            if not (self.directory / file).is_file():
                raise CheckpointError(f"{self.directory / file}: listed in {INDEX_FILE} but missing")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (no tensor data is read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only that tensor's bytes)."""
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


class HFWriter:
    """Write named tensors into safetensors shards of at most ``max_shard_bytes`` each."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._files):
            raise CheckpointError(f"tensor {name!r} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = f"part-{len(self._files):05d}.safetensors"
        save_file(self._pending, str(self.directory / file), metadata={"format": "pt"})
        os.chmod(self.directory / file, 0o644)
        self._files.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        """Flush and name the files as HF does (one file, or shards plus an index)."""
        if self._pending or not self._files:
            self._flush()
        if len(self._files) == 1:
            os.replace(self.directory / self._files[0][0], self.directory / SINGLE_FILE)
            return
        total = len(self._files)
        weight_map = {}
        for i, (file, names) in enumerate(self._files, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / file, self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def copy_metadata(source: str | Path, target: str | Path) -> list[str]:
    """Copy config and tokenizer files that exist in ``source`` into ``target``."""
    copied = []
    for name in METADATA_FILES:
        path = Path(source) / name
        if path.is_file():
            shutil.copy2(path, Path(target) / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it to ``final`` only if the block succeeds.

    ``final`` must not exist yet (an existing checkpoint is never overwritten).
    """
    final = Path(final)
    if final.exists():
        raise CheckpointError(f"{final}: already exists; refusing to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.incomplete-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
