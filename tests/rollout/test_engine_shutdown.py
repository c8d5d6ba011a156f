"""RolloutEngine.shutdown(): the engine is freed in-process and another one, with a longer maximum
length (a stage change), is built and generates, while the trainer's default process group lives on.

The engine runs compiled here (``enforce_eager=False``, as on a GPU): torch.compile's bytecode
hooks pin vLLM's compiled model until vLLM's own clean-up drops them, which the eager CPU
default never exercises. Run as a script, this file is its worker (one process, gloo).
"""

from __future__ import annotations

import gc
import os
import sys
import weakref
from pathlib import Path

from tests import procs

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))


def _worker(directory: str) -> None:
    import torch._dynamo.convert_frame as convert_frame
    import torch.distributed as dist
    import vllm

    from prorl_megatron.config import PrecisionConfig, RolloutConfig
    from prorl_megatron.demo import tiny_base
    from prorl_megatron.rollout.engine import RolloutEngine

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
    dist.init_process_group("gloo")
    hf = Path(directory)
    tiny_base.build_tokenizer(hf)
    tiny_base.build_model(0).save_pretrained(hf)
    build = vllm.LLM

    def compiled(*args, **kwargs):  # what a GPU gets: torch.compile, not eager
        return build(*args, **{**kwargs, "enforce_eager": False})

    vllm.LLM = compiled
    precision = PrecisionConfig(params_dtype="float32")
    engine = RolloutEngine(str(hf), RolloutConfig(max_prompt_tokens=8, max_response_tokens=8), precision, 1)
    hooks = convert_frame._bytecode_hooks
    assert len(hooks) >= 1, "the engine did not compile its model"
    runner = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner
    inner = weakref.ref(next(m for m in runner.model.modules() if type(m).__name__ == "Qwen2Model"))
    del runner
    prompt = vllm.inputs.TokensPrompt(prompt_token_ids=[3, 4] * 4)
    engine.llm.generate([prompt], vllm.SamplingParams(max_tokens=2), use_tqdm=False)

    engine.shutdown()
    gc.collect()
    assert inner() is None, "the old engine's model (its weights) outlived the shutdown"
    assert len(hooks) == 0, f"{len(hooks)} bytecode hooks still pin a compiled model"
    assert dist.is_initialized(), "the trainer's default process group was destroyed"

    longer = RolloutEngine(str(hf), RolloutConfig(max_prompt_tokens=8, max_response_tokens=24), precision, 1)
    out = longer.llm.generate([prompt], vllm.SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert longer.llm.llm_engine.vllm_config.model_config.max_model_len == 32
    assert len(out[0].outputs[0].token_ids) == 20
    dist.barrier()
    print("OK")


def test_shutdown_frees_a_compiled_engine_for_a_longer_one(tmp_path):
    
    out = procs.run([sys.executable, __file__, str(tmp_path / "hf")], timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, (out.stdout + out.stderr)[-6000:]


if __name__ == "__main__":
    _worker(sys.argv[1])
