"""Tiny random Hugging Face models, made with ``transformers`` and saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

VARIANTS = {
    # name: (architecture, extra config)
    "qwen2_tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2_untied": ("Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "llama": ("LlamaForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 32}),
}


def make_tiny_hf(variant: str, directory: str | Path, seed: int = 0, num_layers: int = 4,
                 vocab_size: int = 200, dtype: torch.dtype = torch.float32,
                 max_shard_size: str | None = None, hidden_size: int = 64, intermediate_size: int = 96) -> Path:
    """Save a random tiny model of ``variant`` into ``directory``; return it.

    Vocabulary 200 is padded to 256 by Megatron, so the padding path is always exercised.
    ``max_shard_size`` (e.g. "100KB") writes sharded safetensors with an index file.
    """
    import transformers

    arch, extra = VARIANTS[variant]
    config_cls = {"Qwen2ForCausalLM": transformers.Qwen2Config, "LlamaForCausalLM": transformers.LlamaConfig,
                  "Qwen3ForCausalLM": transformers.Qwen3Config}[arch]
    config = config_cls(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        architectures=[arch], **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(dtype)
    with torch.no_grad():  # random norms and biases, so that every tensor's mapping matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    return Path(directory)
