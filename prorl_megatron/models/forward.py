"""Forward (and backward) of a Megatron GPT model through megatron's pipeline schedules.

:func:`run_microbatches` is the one way the project runs the model: it hands micro-batches to
``get_forward_backward_func()`` (no pipelining at PP1, 1F1B at PP>1), and on the last stage
turns hidden states into token logprobs with :mod:`prorl_megatron.models.logprobs` and then
into whatever ``loss_fn`` computes from them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from prorl_megatron.models.logprobs import hidden_states_output, logprobs_from_hidden, next_token_labels


@dataclass
class MicroBatch:
    """One micro-batch of right-padded sequences.

    ``input_ids`` [B, S] int64; ``extras`` travel to ``loss_fn`` untouched (masks, advantages...).
    """

    input_ids: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


# loss_fn(logprobs [B, S-1] float32, micro-batch) -> (scalar loss, dict of reported values)
LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, Any]]]


def _forward_step(batches: list[MicroBatch], loss_fn: Optional[LossFn], vocab_size: int,
                  temperature: float, chunk_tokens: int, with_entropy: bool):
    from megatron.core import parallel_state

    iterator = iter(batches)

    def step(data_iterator: Any, model: Any):
        batch = next(iterator)
        ids = batch.input_ids
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        last = parallel_state.is_pipeline_last_stage()
        with hidden_states_output(model) if last else contextlib.nullcontext():
            output = model(ids, positions, None)  # last stage: hidden [S, B, H]

        def reduce(output_tensor: torch.Tensor, non_loss_data: bool = False):
            result = logprobs_from_hidden(model, output_tensor, next_token_labels(ids), vocab_size,
                                          temperature, chunk_tokens, with_entropy and loss_fn is None)
            if loss_fn is None:  # [B, S-1], or [2, B, S-1] with the entropy
                return result[..., :-1].detach()
            return loss_fn(result[:, :-1], batch)

        return output, reduce

    return step


def run_microbatches(model: Any, batches: list[MicroBatch], *, vocab_size: int, loss_fn: Optional[LossFn] = None,
                     forward_only: bool = False, temperature: float = 1.0, chunk_tokens: int = 4096,
                     with_entropy: bool = False) -> list[Any]:
    """Run every micro-batch through the pipeline schedule; return per-micro-batch results.

    With ``loss_fn=None`` (forward only) the result on the last stage is each micro-batch's
    logprobs [B, S-1] (with ``with_entropy``: [2, B, S-1], logprobs and the entropy of the
    sampling distribution at each position); with a ``loss_fn`` it is each report dict, and (unless
    ``forward_only``) gradients of the losses are accumulated into the model's ``.grad``
    (or DDP main grads). Megatron divides each loss by the number of micro-batches.
    Other pipeline stages get an empty list. All ranks of the model-parallel group call it.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return []
    seq = max(b.input_ids.shape[1] for b in batches)
    mbs = max(b.input_ids.shape[0] for b in batches)
    collect = loss_fn is None
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step(batches, loss_fn, vocab_size, temperature, chunk_tokens, with_entropy),
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only or collect,
        collect_non_loss_data=collect,
    )
    return list(outputs or [])
