"""The one mapping between Hugging Face tensors and Megatron-Core's, names and layouts.

A table of :class:`Rule` per model: each Megatron tensor, the HF tensors it is made of, and
how it is laid out and split across tensor-parallel ranks:

- ``replicated``: norms — the same on every TP rank;
- ``column``: split along dim 0 (output features);
- ``row``: split along dim 1 (input features);
- ``qkv``: q, k and v fused per query group — ``[g0: q(heads_per_group) k v, g1: ...]`` —
  so that a contiguous dim-0 split gives each TP rank whole query groups;
- ``glu``: gate and up projections fused as ``[gate; up]``; each TP rank holds
  ``[gate_r; up_r]``;
- ``vocab``: embedding/output rows, padded with zeros to the padded vocabulary, split along dim 0.

Pipeline stages hold consecutive layers; a stage's Megatron names count its layers from 0.
Used by ``tools/convert_hf.py`` (HF -> Megatron shards, Megatron -> HF) and by weight sync to
vLLM (the same :func:`to_hf` on all-gathered tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from prorl_megatron.models.architectures import ModelDims

Kind = Literal["replicated", "column", "row", "qkv", "glu", "vocab"]


class MappingError(ValueError):
    """A tensor is missing, unexpected or mis-shaped; the message names it."""


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor (global layer numbering) and the HF tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    kind: Kind
    layer: int | None = None  # global layer index, None for embedding/final norm/output

    def mcore_local(self, layer_offset: int) -> str:
        """The name in a pipeline stage whose first layer is ``layer_offset``."""
        if self.layer is None:
            return self.mcore
        return self.mcore.replace(f"decoder.layers.{self.layer}.", f"decoder.layers.{self.layer - layer_offset}.", 1)


def _layer_rules(dims: ModelDims, i: int, te_names: bool) -> list[Rule]:
    hf = f"model.layers.{i}."
    mc = f"decoder.layers.{i}."
    input_norm = mc + ("self_attention.linear_qkv.layer_norm_weight" if te_names else "input_layernorm.weight")
    mlp_norm = mc + ("mlp.linear_fc1.layer_norm_weight" if te_names else "pre_mlp_layernorm.weight")
    attn = hf + "self_attn."
    rules = [
        Rule(input_norm, (hf + "input_layernorm.weight",), "replicated", i),
        Rule(mc + "self_attention.linear_qkv.weight",
             (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), "qkv", i),
    ]
    if dims.qkv_bias:
        rules.append(Rule(mc + "self_attention.linear_qkv.bias",
                          (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"), "qkv", i))
    if dims.qk_norm:
        rules += [
            Rule(mc + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), "replicated", i),
            Rule(mc + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), "replicated", i),
        ]
    rules += [
        Rule(mc + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "row", i),
        Rule(mlp_norm, (hf + "post_attention_layernorm.weight",), "replicated", i),
        Rule(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), "glu", i),
        Rule(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), "row", i),
    ]
    return rules


def rules(dims: ModelDims, te_names: bool = False) -> list[Rule]:
    """Every rule of the model, in HF checkpoint order (embedding, layers, norm, head).

    ``te_names``: Transformer Engine's layer spec fuses the pre-attention and pre-MLP norms
    into ``linear_qkv``/``linear_fc1`` (``layer_norm_weight``).
    """
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(dims.num_layers):
        out += _layer_rules(dims, i, te_names)
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
    if not dims.tied_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return out


def stage_rules(dims: ModelDims, pp_rank: int, pp_size: int, te_names: bool = False) -> list[tuple[Rule, str]]:
    """The rules a pipeline stage holds, each with its stage-local Megatron name.

    With tied embeddings and more than one stage, the last stage holds its own copy of the
    embedding as ``output_layer.weight`` (megatron keeps the two in sync).
    """
    per_stage = dims.num_layers // pp_size
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    offset = pp_rank * per_stage
    out = []
    for rule in rules(dims, te_names):
        if rule.layer is not None:
            if offset <= rule.layer < offset + per_stage:
                out.append((rule, rule.mcore_local(offset)))
        elif rule.mcore.startswith("embedding."):
            if first:
                out.append((rule, rule.mcore))
            if last and not first and dims.tied_embeddings:
                out.append((rule, "output_layer.weight"))
        elif last:
            out.append((rule, rule.mcore))
    return out


# --------------------------------------------------------------------------------------
# Layout: HF tensors <-> one full Megatron tensor <-> TP shards
# --------------------------------------------------------------------------------------


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise MappingError(f"{name}: expected shape {list(shape)}, got {list(tensor.shape)}")


def hf_shapes(rule: Rule, dims: ModelDims) -> list[tuple[int, ...]]:
    """The shapes the HF tensors of ``rule`` must have."""
    h, hd, nq, nkv = dims.hidden_size, dims.head_dim, dims.num_heads, dims.num_kv_heads
    name = rule.hf[0]
    if rule.kind == "vocab":
        return [(dims.vocab_size, h)]
    if rule.kind == "qkv":
        tail = (h,) if name.endswith("weight") else ()
        return [(nq * hd, *tail), (nkv * hd, *tail), (nkv * hd, *tail)]
    if rule.kind == "glu":
        return [(dims.ffn_hidden_size, h)] * 2
    if name.endswith("o_proj.weight"):
        return [(h, nq * hd)]
    if name.endswith("down_proj.weight"):
        return [(h, dims.ffn_hidden_size)]
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return [(hd,)]
    return [(h,)]  # RMSNorm weights


def to_mcore(rule: Rule, hf_tensors: list[torch.Tensor], dims: ModelDims) -> torch.Tensor:
    """Fuse/pad the HF tensors of ``rule`` into the full (unsharded) Megatron tensor."""
    if len(hf_tensors) != len(rule.hf):
        raise MappingError(f"{rule.mcore}: expected {len(rule.hf)} HF tensors {rule.hf}, got {len(hf_tensors)}")
    for name, tensor, shape in zip(rule.hf, hf_tensors, hf_shapes(rule, dims)):
        _expect(name, tensor, shape)
    if rule.kind == "qkv":
        q, k, v = hf_tensors
        g, hd = dims.num_kv_heads, dims.head_dim
        tail = q.shape[1:]
        fused = torch.cat([q.reshape(g, dims.heads_per_group * hd, *tail), k.reshape(g, hd, *tail),
                           v.reshape(g, hd, *tail)], dim=1)
        return fused.reshape(-1, *tail)
    if rule.kind == "glu":
        return torch.cat(hf_tensors, dim=0)
    if rule.kind == "vocab":
        (w,) = hf_tensors
        pad = dims.padded_vocab_size - dims.vocab_size
        return torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w
    return hf_tensors[0]


def to_hf(rule: Rule, full: torch.Tensor, dims: ModelDims) -> list[tuple[str, torch.Tensor]]:
    """Split a full Megatron tensor back into its HF-named tensors (inverse of :func:`to_mcore`)."""
    if rule.kind == "qkv":
        g, hd, hpg = dims.num_kv_heads, dims.head_dim, dims.heads_per_group
        tail = full.shape[1:]
        grouped = full.reshape(g, (hpg + 2) * hd, *tail)
        q, k, v = grouped.split([hpg * hd, hd, hd], dim=1)
        parts = [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]
    elif rule.kind == "glu":
        parts = list(full.chunk(2, dim=0))
    elif rule.kind == "vocab":
        parts = [full[: dims.vocab_size]]
    else:
        parts = [full]
    out = []
    for name, tensor, shape in zip(rule.hf, parts, hf_shapes(rule, dims)):
        _expect(f"{name} (from {rule.mcore})", tensor, shape)
        out.append((name, tensor.contiguous()))
    return out


def mcore_shape(rule: Rule, dims: ModelDims) -> tuple[int, ...]:
    """Shape of the full Megatron tensor of ``rule``."""
    shapes = hf_shapes(rule, dims)
    if rule.kind in ("qkv", "glu"):
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    if rule.kind == "vocab":
        return (dims.padded_vocab_size, dims.hidden_size)
    return shapes[0]


def shard(rule: Rule, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of the full Megatron tensor."""
    if rule.kind == "replicated" or tp_size == 1:
        return full
    if rule.kind == "glu":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    dim = 1 if rule.kind == "row" else 0
    if full.shape[dim] % tp_size:
        raise MappingError(f"{rule.mcore}: dim {dim} of size {full.shape[dim]} does not split over TP {tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full Megatron tensor from every TP rank's shard, in rank order (inverse of :func:`shard`)."""
    if rule.kind == "replicated" or len(shards) == 1:
        return shards[0]
    if rule.kind == "glu":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=1 if rule.kind == "row" else 0)
