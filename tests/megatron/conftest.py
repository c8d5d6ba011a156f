import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import procs
from tests.megatron.tiny_models import VARIANTS, make_tiny_hf

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "megatron" / "worker.py"


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random HF checkpoints: every variant, plus a sharded one with an index file."""
    base = tmp_path_factory.mktemp("hf")
    models = {v: make_tiny_hf(v, base / v, seed=i) for i, v in enumerate(VARIANTS)}
    models["sharded"] = make_tiny_hf("qwen2_tied", base / "sharded", seed=11, max_shard_size="100KB")
    models["llama_mid"] = make_tiny_hf("llama", base / "llama_mid", seed=12, vocab_size=1000, hidden_size=256,
                                       intermediate_size=512)
    (models["sharded"] / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    return models


def env() -> dict[str, str]:
    return procs.child_env()


def torchrun(nproc: int, *args: str, timeout: int = 600) -> str:
    """Run the worker under torchrun; fail the test with its output unless every rank says OK."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), *args]
    out = procs.run(cmd, timeout=timeout, env=env())
    text = out.stdout + out.stderr
    assert out.returncode == 0 and procs.reported(text, "OK") == set(range(nproc)), text[-6000:]
    return text


def convert(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return procs.run([sys.executable, str(ROOT / "tools" / "convert_hf.py"), *args], env=env(), timeout=timeout)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
