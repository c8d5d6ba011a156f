"""Token logprobs from a (tensor- and pipeline-parallel) Megatron GPT model.

The model's last stage returns hidden states; the output layer and megatron's
``vocab_parallel_cross_entropy`` then run over chunks of the sequence, so no rank ever
holds the full vocabulary and the float32 logits of one chunk are the most that exists at
once. Under autograd each chunk is recomputed in the backward pass (activation
checkpointing), so the saved softmax of the whole sequence is never kept either.

Logprobs are those of the sampling distribution, ``log_softmax(logits / temperature)``,
over the real (unpadded) vocabulary.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils.checkpoint import checkpoint


def unwrap(model: Any) -> Any:
    """The GPTModel inside DDP/Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def hidden_states_output(model: Any) -> Iterator[None]:
    """Make the last pipeline stage return final hidden states [S, B, H] instead of logits.

    GPTModel skips its output layer when ``post_process`` is False (the decoder still applies
    the final norm), which is how non-last stages already behave.
    """
    gpt = unwrap(model)
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def _vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [c, B] of softmax over the full vocabulary from this rank's slice [c, B, V/tp].

    ``H = log Z - sum(e * (x - m)) / Z`` with ``e = exp(x - m)``, ``Z = sum(e)`` and the
    global max ``m``: one max and one (Z, sum) all-reduce over the TP group. Padded
    vocabulary rows (-inf) contribute nothing.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    top = logits.amax(dim=-1)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = logits - top.unsqueeze(-1)
    e = shifted.exp()
    sums = torch.stack([e.sum(-1), torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(-1)])
    torch.distributed.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]


def _chunk_logprobs(hidden: torch.Tensor, labels: torch.Tensor, gpt: Any, vocab_size: int,
                    temperature: float, with_entropy: bool = False) -> torch.Tensor:
    """Logprobs [c, B] of ``labels`` [c, B] from hidden states [c, B, H] (one chunk).

    ``with_entropy``: stacked [2, c, B] of (logprobs, entropy of the sampling distribution).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    dtype = (weight if weight is not None else gpt.output_layer.weight).dtype
    logits, _ = gpt.output_layer(hidden.to(dtype), weight=weight)  # [c, B, V/tp]; Float16Module hands fp32 hidden
    logits = logits.float() / temperature
    per_rank = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * per_rank
    if start + per_rank > vocab_size:  # padded vocabulary rows are not tokens
        padded = torch.arange(start, start + per_rank, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    entropy = _vocab_parallel_entropy(logits.detach()) if with_entropy else None
    logprobs = -vocab_parallel_cross_entropy(logits, labels)
    return torch.stack([logprobs, entropy]) if with_entropy else logprobs


def logprobs_from_hidden(model: Any, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         temperature: float = 1.0, chunk_tokens: int = 4096,
                         with_entropy: bool = False) -> torch.Tensor:
    """Logprobs of ``labels`` under the model's output layer, chunked over the sequence.

    Args:
        hidden: [S, B, H] final hidden states (last pipeline stage).
        labels: [B, S] int64 token ids to score at each position (the next tokens).
        vocab_size: the real vocabulary; padded rows are excluded from the softmax.
        chunk_tokens: at most this many (positions x batch) tokens of logits at once.
        with_entropy: also return the entropy of each position's sampling distribution
            (no gradient; computed from the same vocab-parallel float32 chunk).
    Returns:
        float32 [B, S] logprobs, or [2, B, S] (logprobs, entropy) with ``with_entropy``.
    """
    gpt = unwrap(model)
    seq, batch = hidden.shape[0], hidden.shape[1]
    if tuple(labels.shape) != (batch, seq):
        raise ValueError(f"labels: expected shape [B, S] = {[batch, seq]}, got {list(labels.shape)}")
    step = max(1, chunk_tokens // max(batch, 1))
    labels_sb = labels.transpose(0, 1)  # [S, B]
    pieces = []
    for begin in range(0, seq, step):
        h, y = hidden[begin: begin + step], labels_sb[begin: begin + step].contiguous()
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, h, y, gpt, vocab_size, temperature, with_entropy,
                                     use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, y, gpt, vocab_size, temperature, with_entropy))
    return torch.cat(pieces, dim=-2).transpose(-2, -1)  # [B, S] or [2, B, S]


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels [B, S]: position s is scored on token s+1; the last position on token 0 (ignore it)."""
    return torch.roll(input_ids, shifts=-1, dims=1)
