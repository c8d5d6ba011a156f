"""Hugging Face configs -> Megatron-Core model settings, one table entry per architecture.

Supported: ``Qwen2ForCausalLM`` (the 1.5B target: QKV bias, GQA, RMSNorm, SwiGLU, RoPE,
tied or untied embeddings), ``LlamaForCausalLM`` and ``Qwen3ForCausalLM`` (QK-norm).
Dispatch is by the exact ``architectures`` string of ``config.json``, never by model name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

VOCAB_PAD_MULTIPLE = 128  # fixed, so the padded vocabulary is the same at every TP size


class UnsupportedModelError(ValueError):
    """The HF config describes a model this project cannot build."""


@dataclass(frozen=True)
class Architecture:
    """What differs between the supported decoder-only architectures."""

    hf_name: str
    qkv_bias: bool | None  # None: read ``attention_bias`` from the config
    qk_norm: bool


ARCHITECTURES: dict[str, Architecture] = {
    "Qwen2ForCausalLM": Architecture("Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", qkv_bias=None, qk_norm=False),
    "Qwen3ForCausalLM": Architecture("Qwen3ForCausalLM", qkv_bias=None, qk_norm=True),
}


@dataclass(frozen=True)
class ModelDims:
    """The shapes that the HF <-> Megatron mapping needs (all from the HF config)."""

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the HF vocabulary (rows of embed_tokens)
    padded_vocab_size: int  # Megatron's, a multiple of VOCAB_PAD_MULTIPLE
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    initializer_range: float

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-vocab_size // multiple) * multiple


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, default)
    return default if value is None else value


def _rope_theta(config: Any) -> float:
    params = _get(config, "rope_parameters") or {}
    scaling = _get(config, "rope_scaling")
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModelError(
            f"RoPE scaling type {rope_type!r} is not supported (only unscaled RoPE); config {config.architectures}"
        )
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else _get(config, "rope_theta", 10000.0))


def model_dims(config: Any) -> ModelDims:
    """Read the dimensions of a supported HF config (``transformers.PretrainedConfig``)."""
    names = list(_get(config, "architectures", []) or [])
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {names or '(none in config.json)'}; supported: {', '.join(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[names[0]]
    if _get(config, "use_sliding_window", False):
        raise UnsupportedModelError(f"{arch.hf_name} with use_sliding_window=true is not supported")
    if _get(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{arch.hf_name}: hidden_act {config.hidden_act!r} (only silu/SwiGLU)")
    if _get(config, "mlp_bias", False):
        raise UnsupportedModelError(f"{arch.hf_name}: mlp_bias=true is not supported")
    heads = int(config.num_attention_heads)
    kv_heads = int(_get(config, "num_key_value_heads", heads))
    head_dim = int(_get(config, "head_dim", config.hidden_size // heads))
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    qkv_bias = arch.qkv_bias if arch.qkv_bias is not None else bool(_get(config, "attention_bias", False))
    vocab = int(config.vocab_size)
    return ModelDims(
        architecture=arch.hf_name,
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        ffn_hidden_size=int(config.intermediate_size),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab),
        tied_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=arch.qk_norm,
        rope_theta=_rope_theta(config),
        rms_norm_eps=float(_get(config, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(_get(config, "max_position_embeddings", 4096)),
        initializer_range=float(_get(config, "initializer_range", 0.02)),
    )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"precision.params_dtype: unknown dtype {name!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def read_hf_config(directory: str) -> Any:
    """The ``transformers`` config of a local HF checkpoint directory (never the hub)."""
    from pathlib import Path

    from transformers import AutoConfig

    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    return AutoConfig.from_pretrained(str(directory), local_files_only=True)
