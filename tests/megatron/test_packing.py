"""Sequence packing (THD): pack/unpack bookkeeping, and the packed forward of a real model.

The packed forward needs Transformer Engine's attention, which a CPU machine cannot have. The
model check therefore swaps megatron's local core attention for :class:`ThdAttention`, a plain
torch stand-in that honours ``cu_seqlens`` (per-sequence causal softmax attention): everything
else megatron does with ``packed_seq_params`` (THD RoPE restarting per sequence, the [T, 1, H]
reshapes, pipeline p2p of [T, 1, H]) and all of our packing runs for real, and its logprobs,
entropy and gradients must equal the padded forward's. Run as a script, this file is that
worker (``python tests/megatron/test_packing.py HF_DIR`` or under torchrun with ``--pp``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from prorl_megatron.models.forward import (  # noqa: E402
    MicroBatch, pack_sequences, packed_tokens, packing_multiples, run_microbatches,
)
from tests import procs  # noqa: E402


def _rows(lengths: list[int], width: int, seed: int = 0) -> torch.Tensor:
    """Right-padded rows [B, width] of random tokens 1..99 (padding -1, to spot leaks)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), -1, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, 100, (n,), generator=g)
    return ids


def test_pack_lays_sequences_end_to_end_with_padding():
    ids = _rows([3, 5, 1], width=6)
    packed = pack_sequences(ids, torch.tensor([3, 5, 1]), multiple=4)
    assert packed.cu_seqlens.tolist() == [0, 4, 12, 16] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 8 and packed.tokens == 16
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    want = torch.cat([ids[0, :3], torch.zeros(1), ids[1, :5], torch.zeros(3), ids[2, :1], torch.zeros(3)])
    assert packed.input_ids[0].tolist() == want.long().tolist()  # no -1 (row padding) leaks in
    # the row's tail padding goes to the last sequence, so cu_seqlens[-1] is the row length
    packed = pack_sequences(ids, [3, 5, 1], multiple=2, total_multiple=16)
    assert packed.cu_seqlens.tolist() == [0, 4, 10, 16] and packed.max_seqlen == 6
    assert pack_sequences(ids, [3, 5, 1]).cu_seqlens.tolist() == [0, 3, 8, 9]


def test_labels_are_each_sequences_own_next_tokens():
    lengths = [4, 2, 5]
    ids = _rows(lengths, width=5, seed=1)
    packed = pack_sequences(ids, lengths, multiple=3)
    cu = packed.cu_seqlens.tolist()
    for b, n in enumerate(lengths):
        labels = packed.labels[0, cu[b]: cu[b + 1]].tolist()
        assert labels[: n - 1] == ids[b, 1:n].tolist()
        assert all(x == 0 for x in labels[n - 1:])  # never the next sequence's first token, never padding


def test_unpack_inverts_pack_on_every_real_position():
    lengths = [7, 1, 4, 2]
    ids = _rows(lengths, width=7, seed=2)
    for multiple, total in [(1, 1), (2, 1), (4, 16)]:
        packed = pack_sequences(ids, lengths, multiple, total)
        # a per-position value that encodes (token, its label): unpacked, it must equal the padded layout's
        value = (packed.input_ids * 1000 + packed.labels).float()[0]  # [T]
        got = packed.unpack(value, width=ids.shape[1] - 1)  # [B, S-1]
        for b, n in enumerate(lengths):
            want = (ids[b, : n - 1] * 1000 + ids[b, 1:n]).float()
            assert torch.equal(got[b, : n - 1], want)
            assert torch.all(got[b, n - 1:] == 0)
        both = packed.unpack(torch.stack([value, -value]), width=6)  # leading dims (logprobs, entropy)
        assert both.shape == (2, 4, 6) and torch.equal(both[1], -got)


def test_unpack_carries_gradients_to_real_positions_only():
    packed = pack_sequences(_rows([3, 2], width=3), [3, 2], multiple=4)
    value = torch.zeros(packed.tokens, requires_grad=True)
    packed.unpack(value, width=2).sum().backward()
    assert value.grad.tolist() == [1, 1, 0, 0, 1, 0, 0, 0]


def test_pack_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        pack_sequences(_rows([2, 2], width=2), [2, 3])
    with pytest.raises(ValueError, match="lengths"):
        pack_sequences(_rows([2, 2], width=2), [2])


def _config(tp=1, sp=False, fp8=None, recipe="delayed"):
    return SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=sp, fp8=fp8, fp8_recipe=recipe)


def test_multiples_and_token_cost():
    assert packing_multiples(_config(tp=4)) == (1, 1)  # without SP the row is not split over TP
    assert packing_multiples(_config(tp=4, sp=True)) == (4, 4)
    assert packing_multiples(_config(tp=2, sp=True, fp8="e4m3")) == (2, 32)
    assert packing_multiples(_config(fp8="hybrid", recipe="mxfp8")) == (1, 32)
    assert packing_multiples(_config(fp8="e4m3", recipe="blockwise")) == (1, 128)
    assert packed_tokens([3, 5, 1], _config()) == 9
    assert packed_tokens([3, 5, 1], _config(tp=2, sp=True)) == 4 + 6 + 2
    lengths = [5, 9, 2]
    ids = _rows(lengths, width=9)
    for cfg in (_config(tp=2, sp=True, fp8="e4m3"), _config(tp=4, sp=True)):
        assert packed_tokens(lengths, cfg) == pack_sequences(ids, lengths, *packing_multiples(cfg)).tokens


# ---- the packed forward of a real model (subprocess: megatron's global state stays out of pytest)


class ThdAttention(torch.nn.Module):
    """Test stand-in for TE's THD attention: causal softmax attention within each sequence.

    Takes what megatron's ``Attention`` hands the core attention in THD: query [T, np, hn],
    key/value [T, ng, hn]; returns [T, np * hn].
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        assert torch.equal(packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv)
        cu = packed_seq_params.cu_seqlens_q.tolist()
        assert cu[-1] == query.shape[0] and max(b - a for a, b in zip(cu, cu[1:])) == packed_seq_params.max_seqlen_q
        groups = query.shape[1] // key.shape[1]
        out = []
        for a, b in zip(cu, cu[1:]):
            q, k, v = (x[a:b].transpose(0, 1) for x in (query, key, value))  # [heads, L, hn]
            k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
            out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1))
        return torch.cat(out).reshape(query.shape[0], -1)


def _micro_batches(vocab: int) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(5)
    out = []
    for lengths in ([9, 3, 12, 1], [6, 6], [2]):
        ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)  # right-padded with 0
        for b, n in enumerate(lengths):
            ids[b, :n] = torch.randint(0, vocab, (n,), generator=g)
        weights = torch.randn(len(lengths), ids.shape[1] - 1, generator=g)
        mask = torch.arange(ids.shape[1] - 1).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1) - 1
        out.append(MicroBatch(ids, {"weights": weights * mask}, lengths=torch.tensor(lengths)))
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _worker(hf_dir: str, pp: int) -> None:
    from prorl_megatron.checkpoint.hf_io import HFReader
    from prorl_megatron.checkpoint.transfer import load_hf_weights
    from prorl_megatron.config import PrecisionConfig
    from prorl_megatron.models.architectures import model_dims, read_hf_config
    from prorl_megatron.models.forward import packing_unavailable_reason
    from prorl_megatron.models.gpt import build_gpt_model
    from prorl_megatron.parallel import destroy_parallel, init_parallel

    layout = init_parallel(1, pp, seed=1)
    dims = model_dims(read_hf_config(hf_dir))
    model = build_gpt_model(dims, PrecisionConfig(params_dtype="float32"), perform_initialization=False)
    load_hf_weights(model, HFReader(hf_dir).get, dims)
    data = _micro_batches(dims.vocab_size)
    kw = dict(vocab_size=dims.vocab_size, temperature=0.7, chunk_tokens=5)

    reason = packing_unavailable_reason(model)
    assert reason is not None and "Transformer Engine" in reason, reason
    try:
        run_microbatches(model, data, pack=True, **kw)
        sys.exit("MISMATCH: pack=True ran on megatron's local attention")
    except ValueError as e:
        assert str(e) == reason, e

    def loss_fn(logprobs, batch):
        return (logprobs * batch.extras["weights"]).sum(), {}

    with torch.no_grad():
        padded = run_microbatches(model, data, with_entropy=True, **kw)
    run_microbatches(model, data, loss_fn=loss_fn, **kw)
    padded_grads = _grads(model)

    for layer in model.decoder.layers:
        layer.self_attention.core_attention = ThdAttention()
    assert packing_unavailable_reason(model) is None
    try:
        run_microbatches(model, [MicroBatch(data[0].input_ids)], pack=True, **kw)
        sys.exit("MISMATCH: pack=True ran without lengths")
    except ValueError as e:
        assert "lengths" in str(e), e
    with torch.no_grad():
        packed = run_microbatches(model, data, with_entropy=True, pack=True, **kw)
    run_microbatches(model, data, loss_fn=loss_fn, pack=True, **kw)
    packed_grads = _grads(model)

    if layout.is_last_stage:
        assert len(packed) == len(data)
        for i, (batch, want, got) in enumerate(zip(data, padded, packed)):
            assert got.shape == want.shape == (2, *batch.input_ids.shape[:1], batch.input_ids.shape[1] - 1)
            for b, n in enumerate(batch.lengths.tolist()):
                if not torch.allclose(got[:, b, : n - 1], want[:, b, : n - 1], atol=2e-5, rtol=1e-4):
                    sys.exit(f"MISMATCH logprobs/entropy micro-batch {i} row {b}: max |diff| "
                             f"{(got[:, b, :n - 1] - want[:, b, :n - 1]).abs().max():.3g}")
                assert torch.all(got[:, b, n - 1:] == 0)
    else:
        assert packed == [] == padded
    assert sorted(padded_grads) == sorted(packed_grads) and padded_grads
    for name, want in padded_grads.items():
        if not torch.allclose(packed_grads[name], want, atol=1e-5, rtol=1e-3):
            sys.exit(f"MISMATCH grad {name}: max |diff| {(packed_grads[name] - want).abs().max():.3g}")
    destroy_parallel()
    print(f"OK packed PP{pp}")


@pytest.mark.parametrize("pp", [1, 2], ids=["pp1", "pp2"])
def test_packed_forward_matches_padded(hf_models, pp):
    """Local attention refuses packing with the message; with a THD attention stand-in, the packed
    forward's logprobs, entropy and gradients equal the padded forward's (PP2: [T, 1, H] p2p)."""
    from tests.megatron.conftest import env

    hf_dir = str(hf_models["qwen3"])  # qk-norm, GQA (4 heads, 2 groups), tied embeddings
    cmd = [sys.executable, __file__, hf_dir] if pp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
        "--pp", "2", hf_dir]
    out = procs.run(cmd, timeout=600, env=env())
    text = out.stdout + out.stderr
    assert out.returncode == 0 and text.count("OK packed") == pp, text[-6000:]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("hf_dir")
    args = parser.parse_args()
    _worker(args.hf_dir, args.pp)
