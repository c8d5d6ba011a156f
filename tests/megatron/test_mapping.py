"""The HF <-> Megatron mapping table, tensor layouts and TP sharding (single process)."""

import types

import pytest
import torch

from prorl_megatron.checkpoint import hf_mapping as M
from prorl_megatron.checkpoint.transfer import check_hf_checkpoint
from prorl_megatron.models.architectures import UnsupportedModelError, model_dims


def config(arch="Qwen2ForCausalLM", **kw):
    base = dict(architectures=[arch], vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                tie_word_embeddings=False, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    base.update(kw)
    return types.SimpleNamespace(**base)


def random_hf(dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=g)
            for rule in M.rules(dims) for name, shape in zip(rule.hf, M.hf_shapes(rule, dims))}


@pytest.mark.parametrize("arch,kw", [("Qwen2ForCausalLM", {}), ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
                                     ("LlamaForCausalLM", {"attention_bias": True}), ("Qwen3ForCausalLM", {"head_dim": 32})])
@pytest.mark.parametrize("tp", [1, 2])
def test_to_mcore_shard_unshard_to_hf_is_identity(arch, kw, tp):
    dims = model_dims(config(arch, **kw))
    hf = random_hf(dims)
    seen = set()
    for rule in M.rules(dims):
        full = M.to_mcore(rule, [hf[n] for n in rule.hf], dims)
        assert tuple(full.shape) == M.mcore_shape(rule, dims)
        shards = [M.shard(rule, full, r, tp) for r in range(tp)]
        back = M.to_hf(rule, M.unshard(rule, shards), dims)
        for name, tensor in back:
            assert torch.equal(tensor, hf[name]), name
            seen.add(name)
    assert seen == set(hf)


def test_qkv_is_fused_per_query_group():
    dims = model_dims(config(num_attention_heads=4, num_key_value_heads=2, hidden_size=8))  # head_dim 2
    rule = next(r for r in M.rules(dims) if r.mcore.endswith("linear_qkv.weight"))
    q = torch.arange(8).float()[:, None].expand(8, 8)  # rows 0..7: heads q0 q1 q2 q3 (2 rows each)
    k = 100 + torch.arange(4).float()[:, None].expand(4, 8)  # k0 k1
    v = 200 + torch.arange(4).float()[:, None].expand(4, 8)
    fused = M.to_mcore(rule, [q, k, v], dims)[:, 0].tolist()
    # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1
    assert fused == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    # TP2: each rank holds whole query groups
    assert M.shard(rule, M.to_mcore(rule, [q, k, v], dims), 1, 2)[:, 0].tolist() == fused[8:]


def test_glu_shards_hold_gate_and_up_halves():
    dims = model_dims(config())
    rule = next(r for r in M.rules(dims) if r.mcore.endswith("linear_fc1.weight"))
    gate, up = torch.zeros(96, 64), torch.ones(96, 64)
    part = M.shard(rule, M.to_mcore(rule, [gate, up], dims), 0, 2)
    assert part.shape == (96, 64) and part[:48].sum() == 0 and (part[48:] == 1).all()


def test_vocab_is_padded_and_unpadded():
    dims = model_dims(config(vocab_size=200))
    assert dims.padded_vocab_size == 256
    rule = M.rules(dims)[0]
    w = torch.randn(200, 64)
    full = M.to_mcore(rule, [w], dims)
    assert full.shape == (256, 64) and (full[200:] == 0).all()
    assert torch.equal(M.to_hf(rule, full, dims)[0][1], w)


def test_pipeline_stages_renumber_layers_and_split_ends():
    dims = model_dims(config(tie_word_embeddings=True))
    first = dict((r.mcore, local) for r, local in M.stage_rules(dims, 0, 2))
    last = [local for _, local in M.stage_rules(dims, 1, 2)]
    assert "embedding.word_embeddings.weight" in first.values()
    assert first["decoder.layers.1.mlp.linear_fc2.weight"] == "decoder.layers.1.mlp.linear_fc2.weight"
    assert "decoder.layers.0.mlp.linear_fc2.weight" in last  # global layer 2
    assert "output_layer.weight" in last and "decoder.final_layernorm.weight" in last  # tied copy on last stage
    assert not any(n.startswith("decoder.layers.2") for n in last)


def test_te_names_fuse_the_norms():
    dims = model_dims(config())
    names = {r.mcore for r in M.rules(dims, te_names=True)}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)


def test_checkpoint_check_names_every_problem():
    dims = model_dims(config())
    hf = random_hf(dims)
    del hf["model.layers.3.self_attn.v_proj.weight"]
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # ignored buffer
    hf["model.extra.weight"] = torch.zeros(1)
    hf["model.norm.weight"] = torch.zeros(65)
    with pytest.raises(M.MappingError) as e:
        check_hf_checkpoint(list(hf), lambda n: tuple(hf[n].shape), dims)
    msg = str(e.value)
    assert "missing tensors: model.layers.3.self_attn.v_proj.weight" in msg
    assert "unexpected tensors: model.extra.weight" in msg and "inv_freq" not in msg
    assert "model.norm.weight: expected shape [64], got [65]" in msg


def test_to_mcore_rejects_wrong_shapes():
    dims = model_dims(config())
    rule = next(r for r in M.rules(dims) if r.mcore.endswith("linear_proj.weight"))
    with pytest.raises(M.MappingError, match=r"o_proj.weight: expected shape \[64, 64\], got \[64, 63\]"):
        M.to_mcore(rule, [torch.zeros(64, 63)], dims)


def test_architecture_errors():
    with pytest.raises(UnsupportedModelError, match=r"unsupported architecture \['GPT2LMHeadModel'\]; supported: "
                                                    r"Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM"):
        model_dims(config("GPT2LMHeadModel"))
    with pytest.raises(UnsupportedModelError, match="RoPE scaling type 'yarn' is not supported"):
        model_dims(config(rope_parameters={"rope_theta": 1e6, "rope_type": "yarn"}))
    with pytest.raises(UnsupportedModelError, match="use_sliding_window=true"):
        model_dims(config(use_sliding_window=True))


def test_dims_of_the_1p5b_target():
    # DeepSeek-R1-Distill-Qwen-1.5B's config.json values
    dims = model_dims(config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False,
                             max_position_embeddings=131072, rope_parameters={"rope_theta": 10000.0}))
    assert (dims.head_dim, dims.heads_per_group, dims.padded_vocab_size) == (128, 6, 151936)
    assert dims.qkv_bias and not dims.qk_norm


@pytest.mark.parametrize("bucket_bytes", [1, 30_000, 10**9])
@pytest.mark.parametrize("pp", [1, 2])
def test_sync_buckets_are_bounded_ordered_and_stay_on_one_stage(bucket_bytes, pp):
    from prorl_megatron.checkpoint.transfer import _buckets, _owner_stage

    dims = model_dims(config(tie_word_embeddings=False))
    all_rules = M.rules(dims)
    buckets = list(_buckets(all_rules, dims, pp, bucket_bytes, element_size=4))
    assert [r for b in buckets for r in b] == all_rules
    for bucket in buckets:
        size = sum(4 * torch.Size(M.mcore_shape(r, dims)).numel() for r in bucket)
        assert size <= bucket_bytes or len(bucket) == 1
        assert len({_owner_stage(r, dims, pp) for r in bucket}) == 1
    if bucket_bytes == 10**9:
        assert len(buckets) == pp
