"""Forward (and backward) of a Megatron GPT model through megatron's pipeline schedules.

:func:`run_microbatches` is the one way the project runs the model: it hands micro-batches to
``get_forward_backward_func()`` (no pipelining at PP1, 1F1B at PP>1), and on the last stage
turns hidden states into token logprobs with :mod:`prorl_megatron.models.logprobs` and then
into whatever ``loss_fn`` computes from them.

Sequence packing (``pack=True``): the B rows of a micro-batch are laid end to end in one row
[1, T] (megatron's THD layout, :class:`Packed`), so no compute is spent on right padding.
Attention keeps the sequences apart through ``PackedSeqParams`` (``cu_seqlens``), RoPE
restarts at every sequence, and each sequence is scored on its own next tokens; the
logprobs are unpacked to [B, S-1] before ``loss_fn`` sees them, so callers do not change.
Only Transformer Engine's attention takes packed sequences (:func:`packing_unavailable_reason`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from prorl_megatron.models.logprobs import hidden_states_output, logprobs_from_hidden, next_token_labels, unwrap


@dataclass
class MicroBatch:
    """One micro-batch of right-padded sequences.

    ``input_ids`` [B, S] int64; ``extras`` travel to ``loss_fn`` untouched (masks, advantages...);
    ``lengths`` [B] int64 is each row's real length (prompt + response), needed to pack.
    """

    input_ids: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    lengths: Optional[torch.Tensor] = None


# loss_fn(logprobs [B, S-1] float32, micro-batch) -> (scalar loss, dict of reported values)
LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, Any]]]

# tokens an FP8 GEMM needs its token dimension divisible by: megatron's get_fp8_align_size
# (16, MXFP8 32); blockwise scaling works on 128-token tiles (NeMo-RL pads packed rows to 128)
FP8_ALIGN = {"mxfp8": 32, "blockwise": 128}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class Packed:
    """The rows of a micro-batch laid end to end in one row (THD layout).

    Sequence ``b`` occupies packed positions ``[cu_seqlens[b], cu_seqlens[b+1])``: its
    ``lengths[b]`` real tokens, then padding up to the required multiple (the last sequence
    also takes the row's tail padding). Padding tokens belong to their sequence in
    ``cu_seqlens``, so attention computes them like any token (no uninitialised outputs)
    and, being last, no real token attends to them.
    """

    input_ids: torch.Tensor  # [1, T] int64, padding 0
    positions: torch.Tensor  # [1, T] int64, 0.. within each sequence
    labels: torch.Tensor  # [1, T] int64: the sequence's own next token; 0 at its last and padded positions
    cu_seqlens: torch.Tensor  # [B+1] int32, padded bounds (cu_seqlens[-1] == T)
    lengths: list[int]  # [B] real lengths
    max_seqlen: int  # the longest padded sequence

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def seq_params(self) -> Any:
        """megatron's ``PackedSeqParams`` (q and kv are the same sequences)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        # padding is part of each sequence (as NeMo-RL does), so TE never leaves padded positions
        # uncomputed and no *_padded bounds are needed: given equal to the plain ones, TE would
        # compare the two on the device (a host sync) in every attention call to find that out
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def unpack(self, values: torch.Tensor, width: int) -> torch.Tensor:
        """Per-position values [..., T] -> [..., B, width] in the unpacked layout.

        Position ``j`` of row ``b`` (scored on token ``j+1``) is packed position
        ``cu_seqlens[b] + j``; positions ``j >= lengths[b] - 1`` score no real token and are 0.
        Differentiable (a gather).
        """
        device = values.device
        offsets = torch.arange(width, device=device)  # [W]
        starts = self.cu_seqlens[:-1].to(device=device, dtype=torch.long)  # [B]
        lengths = torch.tensor(self.lengths, device=device)
        real = offsets.unsqueeze(0) < (lengths - 1).unsqueeze(1)  # [B, W]
        index = torch.where(real, starts.unsqueeze(1) + offsets.unsqueeze(0), 0)  # [B, W]
        return torch.where(real, values[..., index], torch.zeros((), dtype=values.dtype, device=device))


def padded_lengths(lengths: Sequence[int], multiple: int = 1, total_multiple: int = 1) -> list[int]:
    """Tokens each sequence of these real ``lengths`` takes in a packed row: its length rounded up
    to ``multiple``, the last one also taking the row's tail up to a multiple of ``total_multiple``."""
    padded = [_round_up(int(n), multiple) for n in lengths]
    if padded:
        padded[-1] += _round_up(sum(padded), total_multiple) - sum(padded)
    return padded


def pack_sequences(input_ids: torch.Tensor, lengths: torch.Tensor | Sequence[int], multiple: int = 1,
                   total_multiple: int = 1) -> Packed:
    """Lay the right-padded rows ``input_ids`` [B, S] end to end (see :class:`Packed`).

    Each sequence is padded to a multiple of ``multiple``; the packed row to a multiple of
    ``total_multiple`` (the last sequence takes that tail). See :func:`packing_multiples`.
    """
    lengths = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]  # a host sync
    rows, width = input_ids.shape
    if len(lengths) != rows or not all(1 <= n <= width for n in lengths):
        raise ValueError(f"lengths {lengths}: expected {rows} values in [1, {width}] "
                         f"(input_ids {list(input_ids.shape)})")
    padded = padded_lengths(lengths, multiple, total_multiple)
    device = input_ids.device
    padded_t = torch.tensor(padded, device=device)
    cu = torch.zeros(rows + 1, dtype=torch.long, device=device)
    cu[1:] = torch.cumsum(padded_t, 0)
    total = sum(padded)
    seq = torch.repeat_interleave(torch.arange(rows, device=device), padded_t, output_size=total)  # [T] its sequence
    offset = torch.arange(total, device=device) - cu[seq]  # [T] position within its sequence
    length = torch.tensor(lengths, device=device)[seq]  # [T]
    token = input_ids[seq, offset.clamp(max=width - 1)]
    following = input_ids[seq, (offset + 1).clamp(max=width - 1)]
    zero = torch.zeros((), dtype=input_ids.dtype, device=device)
    return Packed(
        input_ids=torch.where(offset < length, token, zero).unsqueeze(0),
        positions=offset.unsqueeze(0),
        labels=torch.where(offset + 1 < length, following, zero).unsqueeze(0),
        cu_seqlens=cu.to(torch.int32),
        lengths=lengths,
        max_seqlen=max(padded),
    )


def packing_multiples(config: Any) -> tuple[int, int]:
    """(per-sequence, packed-row) token multiples a packed row needs under ``config``.

    Sequence parallelism splits the row over the TP ranks; each sequence is padded to TP
    (as NeMo-RL's ``_get_pack_sequence_parameters_for_megatron`` and verl's
    ``preprocess_packed_seqs`` do). FP8 GEMMs need each rank's token count divisible by
    :data:`FP8_ALIGN`.
    """
    per_sequence = config.tensor_model_parallel_size if config.sequence_parallel else 1
    total = per_sequence
    if config.fp8:
        total *= FP8_ALIGN.get(str(getattr(config.fp8_recipe, "value", config.fp8_recipe)), 16)
    return per_sequence, total


def packed_tokens(lengths: Sequence[int], config: Any) -> int:
    """T of the packed row of sequences of these real ``lengths``: a micro-batch's token cost."""
    return sum(padded_lengths(lengths, *packing_multiples(config)))


def packing_unavailable_reason(model: Any) -> Optional[str]:
    """Why ``model`` cannot run packed sequences, or None when it can.

    Megatron's local ``DotProductAttention`` (the spec without Transformer Engine) asserts
    ``packed_seq_params is None``; TE's ``TEDotProductAttention`` takes THD. Context
    parallelism would also need each sequence split over the CP ranks, which is not done here.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    gpt = unwrap(model)
    if gpt.config.context_parallel_size > 1:
        return "sequence packing is not implemented with context parallelism (context_parallel_size > 1)"
    for layer in gpt.decoder.layers:
        if isinstance(getattr(layer.self_attention, "core_attention", None), DotProductAttention):
            return ("sequence packing needs Transformer Engine's attention (THD layout); this model uses "
                    "megatron's local DotProductAttention (no Transformer Engine here), which cannot take "
                    "packed sequences: micro-batches stay padded rows")
    return None


def _forward_step(batches: list[MicroBatch], packs: Optional[list[Packed]], loss_fn: Optional[LossFn],
                  vocab_size: int, temperature: float, chunk_tokens: int, with_entropy: bool):
    from megatron.core import parallel_state

    iterator = iter(range(len(batches)))

    def step(data_iterator: Any, model: Any):
        i = next(iterator)
        batch = batches[i]
        ids = batch.input_ids
        last = parallel_state.is_pipeline_last_stage()
        if packs is None:
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            labels, kwargs = next_token_labels(ids), {}
        else:
            packed = packs[i]
            ids, positions, labels = packed.input_ids, packed.positions, packed.labels
            kwargs = {"packed_seq_params": packed.seq_params()}
        with hidden_states_output(model) if last else contextlib.nullcontext():
            output = model(ids, positions, None, **kwargs)  # last stage: hidden [S, B, H] ([T, 1, H] packed)

        def reduce(output_tensor: torch.Tensor, non_loss_data: bool = False):
            result = logprobs_from_hidden(model, output_tensor, labels, vocab_size, temperature, chunk_tokens,
                                          with_entropy and loss_fn is None)  # [B, S] (or [2, B, S])
            width = batch.input_ids.shape[1] - 1
            result = result[..., :width] if packs is None else packs[i].unpack(result[..., 0, :], width)
            if loss_fn is None:  # [B, S-1], or [2, B, S-1] with the entropy
                return result.detach()
            return loss_fn(result, batch)

        return output, reduce

    return step


def run_microbatches(model: Any, batches: list[MicroBatch], *, vocab_size: int, loss_fn: Optional[LossFn] = None,
                     forward_only: bool = False, temperature: float = 1.0, chunk_tokens: int = 4096,
                     with_entropy: bool = False, pack: bool = False) -> list[Any]:
    """Run every micro-batch through the pipeline schedule; return per-micro-batch results.

    With ``loss_fn=None`` (forward only) the result on the last stage is each micro-batch's
    logprobs [B, S-1] (with ``with_entropy``: [2, B, S-1], logprobs and the entropy of the
    sampling distribution at each position); with a ``loss_fn`` it is each report dict, and (unless
    ``forward_only``) gradients of the losses are accumulated into the model's ``.grad``
    (or DDP main grads). Megatron divides each loss by the number of micro-batches.
    Other pipeline stages get an empty list. All ranks of the model-parallel group call it.

    ``pack``: run each micro-batch as one packed row (needs ``MicroBatch.lengths`` and a model
    :func:`packing_unavailable_reason` accepts; raises ValueError otherwise). Results keep the
    [B, S-1] layout; positions at or past a row's last real token are 0 there.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return []
    packs = None
    if pack:
        reason = packing_unavailable_reason(model)
        if reason is not None:
            raise ValueError(reason)
        if any(b.lengths is None for b in batches):
            raise ValueError("pack=True needs MicroBatch.lengths (each row's real length)")
        multiple, total = packing_multiples(unwrap(model).config)
        packs = [pack_sequences(b.input_ids, b.lengths, multiple, total) for b in batches]
    # the p2p shapes between pipeline stages: [S, B, H], or [T, 1, H] packed
    seq = max(p.tokens for p in packs) if packs else max(b.input_ids.shape[1] for b in batches)
    mbs = 1 if packs else max(b.input_ids.shape[0] for b in batches)
    collect = loss_fn is None
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step(batches, packs, loss_fn, vocab_size, temperature, chunk_tokens,
                                        with_entropy),
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only or collect,
        collect_non_loss_data=collect,
    )
    return list(outputs or [])
