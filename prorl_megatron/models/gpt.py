"""Build a Megatron-Core ``GPTModel`` (this process's TP/PP shard) from a Hugging Face config.

The Transformer Engine layer spec is used when TE is importable (GPU clusters, NGC image),
with the FP8 fields of ``TransformerConfig`` driven by ``precision.fp8``; otherwise the
local (pure megatron-core) spec, with every fusion that needs TE/apex/CUDA kernels off.
This is the only module that turns our recipe into megatron's ``TransformerConfig``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from prorl_megatron.config import PrecisionConfig
from prorl_megatron.models.architectures import ModelDims, torch_dtype


class PrecisionError(ValueError):
    """A precision setting this machine cannot honour (e.g. FP8 without Transformer Engine)."""


def transformer_engine_available() -> bool:
    """True when Transformer Engine can be imported (never on a CPU machine)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a half-installed TE raises more than ImportError (no CUDA libraries)
        return False
    return True


RECOMPUTE = {  # train.recompute -> megatron's own activation-recompute options
    "none": {},
    # the attention core (softmax(QK^T)V, quadratic in the sequence without a fused kernel) is
    # recomputed in the backward pass; everything else is kept
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    # only each layer's input is kept; the whole layer runs again in the backward pass
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def transformer_config(dims: ModelDims, precision: PrecisionConfig, tensor: int = 1, pipeline: int = 1,
                       sequence_parallel: bool = False, perform_initialization: bool = True,
                       use_te: bool | None = None, recompute: str = "none") -> Any:
    """The ``TransformerConfig`` for ``dims`` at the given parallel sizes and precision.

    ``recompute``: ``train.recompute`` (none | selective | full), see :data:`RECOMPUTE`.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    use_te = transformer_engine_available() if use_te is None else use_te
    if precision.fp8 is not None and not use_te:
        raise PrecisionError(
            f"precision.fp8={precision.fp8} needs Transformer Engine, which is not importable here "
            "(CPU machines cannot install it; the NGC image has it). Set precision.fp8=null."
        )
    if dims.num_layers % pipeline:
        raise ValueError(f"num_hidden_layers {dims.num_layers} is not divisible by parallel.pipeline {pipeline}")
    if dims.num_kv_heads % tensor:
        raise ValueError(f"num_key_value_heads {dims.num_kv_heads} is not divisible by parallel.tensor {tensor}")
    if sequence_parallel and not use_te:
        raise ValueError("parallel.sequence_parallel needs Transformer Engine (or apex) norms")
    dtype = torch_dtype(precision.params_dtype)
    fused = use_te  # fused kernels come with TE/apex; the local spec runs plain torch ops
    kwargs: dict[str, Any] = dict(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_heads,
        num_query_groups=dims.num_kv_heads,
        kv_channels=dims.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=dims.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=dims.qkv_bias,
        qk_layernorm=dims.qk_norm,
        hidden_dropout=0.0,  # RL: logprobs of the sampled tokens must be deterministic
        attention_dropout=0.0,
        init_method_std=dims.initializer_range,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        variable_seq_lengths=True,  # RL batches change length from step to step
        moe_token_dispatcher_type="alltoall",  # dense model; megatron rejects the default with the line above
        perform_initialization=perform_initialization,
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,  # needs apex/TE CUDA kernels
        masked_softmax_fusion=fused,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        persist_layer_norm=fused,
    )
    if recompute not in RECOMPUTE:
        raise ValueError(f"train.recompute must be one of {sorted(RECOMPUTE)}, got {recompute!r}")
    kwargs.update(RECOMPUTE[recompute])
    if precision.fp8 is not None:
        kwargs.update(fp8=precision.fp8, fp8_recipe=precision.fp8_recipe)
    return TransformerConfig(**kwargs)


def layer_spec(dims: ModelDims, use_te: bool | None = None) -> Any:
    """The TE layer spec when Transformer Engine is importable, else the local spec."""
    from megatron.core.models.gpt import gpt_layer_specs

    use_te = transformer_engine_available() if use_te is None else use_te
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=dims.qk_norm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=dims.qk_norm, normalization="RMSNorm")


def build_gpt_model(dims: ModelDims, precision: PrecisionConfig, *, perform_initialization: bool = True,
                    sequence_parallel: bool = False, recompute: str = "none") -> Any:
    """This process's shard of the model, at the TP/PP sizes of megatron's ``parallel_state``.

    ``recompute``: activation recompute in the backward pass (``train.recompute``).

    Parameters live on the current CUDA device, or on the CPU without one.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    use_te = transformer_engine_available()
    config = transformer_config(
        dims, precision,
        tensor=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel, perform_initialization=perform_initialization, use_te=use_te,
        recompute=recompute,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(dims, use_te),
        vocab_size=dims.padded_vocab_size,
        max_sequence_length=dims.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=dims.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=dims.rope_theta,
        parallel_output=True,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
