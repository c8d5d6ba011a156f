"""Megatron (TP/PP over gloo, real processes) against Hugging Face: weights, logprobs, gradients."""

import pytest

from tests.megatron.conftest import torchrun

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_parity_with_hf(hf_models, tp, pp):
    """Bit-exact HF round trip through the shards; logprobs and gradients equal HF's (float32)."""
    dirs = [str(hf_models[v]) for v in ("qwen2_tied", "qwen2_untied", "llama", "qwen3")]
    torchrun(tp * pp, "--tp", str(tp), "--pp", str(pp), "parity", *dirs)


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2pp1", "tp2pp2"])
def test_sync_buckets_bound_export_memory(hf_models, tp, pp):
    """Peak memory while exporting for weight sync follows the bucket size, not the model size."""
    torchrun(tp * pp, "--tp", str(tp), "--pp", str(pp), "bucket-memory", str(hf_models["llama_mid"]))
