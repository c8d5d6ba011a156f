"""Activation recompute (``train.recompute``): the same gradients, with the recompute really done.

Run as a script, this file is its worker (one process): ``python tests/megatron/test_recompute.py HF_DIR DTYPE``.
For each of ``none``, ``selective`` and ``full`` it builds the policy through
``prorl_megatron.models.policy.build_policy``, loads the same weights, and runs forward and
backward of a token-weighted logprob loss on two micro-batches of different lengths through
``run_microbatches``. The gradients must equal ``none``'s bit for bit, and the counted forward
calls must show the recompute: the core attention runs twice per micro-batch under
``selective``, the whole layer twice under ``full``, once each under ``none``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests import procs

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))


def _worker(hf_dir: str, dtype: str) -> None:
    from prorl_megatron.checkpoint.hf_io import HFReader
    from prorl_megatron.checkpoint.transfer import load_hf_weights
    from prorl_megatron.config import PrecisionConfig, TrainConfig
    from prorl_megatron.models.architectures import model_dims, read_hf_config
    from prorl_megatron.models.forward import MicroBatch, run_microbatches
    from prorl_megatron.models.policy import build_policy, finalize_grads
    from prorl_megatron.parallel import init_parallel

    init_parallel(1, 1, seed=0)
    dims = model_dims(read_hf_config(hf_dir))
    g = torch.Generator().manual_seed(0)
    batches = [MicroBatch(torch.randint(0, dims.vocab_size, (b, s), generator=g), {"w": torch.randn(b, s - 1, generator=g)})
               for b, s in ((3, 17), (2, 29))]

    def loss_fn(logprobs, mb):
        return (logprobs * mb.extras["w"]).sum() / logprobs.numel(), {}

    grads, calls = {}, {}
    for mode in ("none", "selective", "full"):
        gpt, ddp = build_policy(dims, PrecisionConfig(params_dtype=dtype), TrainConfig(recompute=mode))
        reader = HFReader(Path(hf_dir))
        load_hf_weights(gpt, reader.get, dims)
        reader.close()
        counts = {"layer": 0, "core_attention": 0}
        layer = gpt.decoder.layers[0]
        layer.register_forward_hook(lambda *a: counts.__setitem__("layer", counts["layer"] + 1))
        layer.self_attention.core_attention.register_forward_hook(
            lambda *a: counts.__setitem__("core_attention", counts["core_attention"] + 1))
        ddp.train()
        run_microbatches(ddp, batches, vocab_size=dims.vocab_size, loss_fn=loss_fn)
        finalize_grads(ddp)
        grads[mode] = [p.main_grad.clone() for p in gpt.parameters()]
        calls[mode] = dict(counts)
    print("forward calls per mode:", calls)
    assert calls["none"] == {"layer": 2, "core_attention": 2}, calls
    assert calls["selective"] == {"layer": 2, "core_attention": 4}, calls
    assert calls["full"] == {"layer": 4, "core_attention": 4}, calls
    for mode in ("selective", "full"):
        for a, b in zip(grads["none"], grads[mode]):
            assert torch.equal(a, b), f"{mode}: gradients differ by {float((a - b).abs().max())}"
    assert any(float(a.abs().max()) > 0 for a in grads["none"])
    print("OK")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recompute_gives_identical_gradients(tmp_path, dtype):
    from tests.megatron.conftest import env
    from tests.megatron.tiny_models import make_tiny_hf

    hf_dir = make_tiny_hf("qwen2_untied", tmp_path / "hf", num_layers=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
           str(hf_dir), dtype]
    out = procs.run(cmd, timeout=600, env=env())
    assert out.returncode == 0 and "OK" in out.stdout, (out.stdout + out.stderr)[-6000:]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
