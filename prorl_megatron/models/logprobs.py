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


def _chunk_logprobs(hidden: torch.Tensor, labels: torch.Tensor, gpt: Any, vocab_size: int,
                    temperature: float) -> torch.Tensor:
    """Logprobs [c, B] of ``labels`` [c, B] from hidden states [c, B, H] (one chunk)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    logits, _ = gpt.output_layer(hidden, weight=weight)  # [c, B, V/tp], model dtype
    logits = logits.float() / temperature
    per_rank = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * per_rank
    if start + per_rank > vocab_size:  # padded vocabulary rows are not tokens
        padded = torch.arange(start, start + per_rank, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    return -vocab_parallel_cross_entropy(logits, labels)


def logprobs_from_hidden(model: Any, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         temperature: float = 1.0, chunk_tokens: int = 4096) -> torch.Tensor:
    """Logprobs of ``labels`` under the model's output layer, chunked over the sequence.

    Args:
        hidden: [S, B, H] final hidden states (last pipeline stage).
        labels: [B, S] int64 token ids to score at each position (the next tokens).
        vocab_size: the real vocabulary; padded rows are excluded from the softmax.
        chunk_tokens: at most this many (positions x batch) tokens of logits at once.
    Returns:
        float32 [B, S].
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
            pieces.append(checkpoint(_chunk_logprobs, h, y, gpt, vocab_size, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, y, gpt, vocab_size, temperature))
    return torch.cat(pieces, dim=0).transpose(0, 1)  # [B, S]


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels [B, S]: position s is scored on token s+1; the last position on token 0 (ignore it)."""
    return torch.roll(input_ids, shifts=-1, dims=1)
