"""The CPU patches of megatron-core: every target still exists and still needs its patch."""

import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

from prorl_megatron import cpu_patches
from tests import procs

ROOT = Path(__file__).resolve().parents[1]
CUDA_REFERENCE = re.compile(r"torch\.cuda\.|[\"']cuda[\"']|\.cuda\(\)")


@pytest.mark.parametrize("patch", cpu_patches.PATCHES, ids=lambda p: f"{p.module}:{p.attribute or 'torch'}")
def test_patch_target_exists_and_still_needs_the_patch(patch):
    module = importlib.import_module(patch.module)
    assert patch.why, "every patch says why it is needed"
    if patch.attribute is None:
        source = inspect.getsource(module)
        assert CUDA_REFERENCE.search(source), f"{patch.module} no longer calls CUDA: drop its patch"
        assert re.search(r"^import torch$", source, re.M), f"{patch.module} no longer imports torch as 'torch'"
    else:
        target = module
        for part in patch.attribute.split("."):
            assert hasattr(target, part), f"{patch.module}.{patch.attribute} no longer exists"
            target = getattr(target, part)
        original = inspect.getsource(inspect.unwrap(target)) if callable(target) else ""
        assert CUDA_REFERENCE.search(original) or "_cuda" in patch.attribute, \
            f"{patch.module}.{patch.attribute} no longer touches CUDA: drop its patch"


def run_python(code: str) -> str:
    out = procs.run([sys.executable, "-c", code], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_patches_apply_once_and_redirect_cuda_to_cpu():
    out = run_python(
        "import torch\n"
        "from prorl_megatron import cpu_patches\n"
        "assert cpu_patches.apply() and cpu_patches.apply()\n"
        "from megatron.core.transformer.utils import get_default_causal_mask\n"
        "m = get_default_causal_mask(3)\n"
        "assert m.device.type == 'cpu' and m.tolist() == [[False, True, True], [False, False, True], [False, False, False]]\n"
        "from megatron.core.tensor_parallel import random as r\n"
        "s = r._get_cuda_rng_state(); r._set_cuda_rng_state(s); assert torch.equal(s, torch.get_rng_state())\n"
        "import megatron.core.utils as u\n"
        "assert u.torch.Tensor is torch.Tensor and u.torch.empty(2, device='cuda').device.type == 'cpu'\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"


def test_patches_are_not_applied_when_cuda_is_present():
    out = run_python(
        "import torch\n"
        "torch.cuda.is_available = lambda: True  # pretend to be a GPU machine\n"
        "from prorl_megatron import cpu_patches\n"
        "assert cpu_patches.apply() is False\n"
        "import megatron.core.utils as u, megatron.core.tensor_parallel.random as r\n"
        "assert u.torch is torch and r._get_cuda_rng_state.__module__ == 'megatron.core.tensor_parallel.random'\n"
        "print('untouched')\n"
    )
    assert out.strip() == "untouched"


def test_no_patch_outside_the_patch_module():
    """Only cpu_patches.py may rebind names inside megatron or torch modules."""
    offenders = []
    for path in (ROOT / "prorl_megatron").rglob("*.py"):
        if path.name == "cpu_patches.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute):
                    root = target
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(root, ast.Name) and root.id in ("torch", "megatron"):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr"
                    and getattr(node.args[0], "id", None) != "self"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


VLLM_NEEDS = {  # what each vLLM target still does that the patch undoes
    "_CPUSHMDistributed.make_group_name": "VLLM_DIST_IDENT",  # a name shared by every run on the machine
    "_CPUSHMDistributed._init_cpu_shm": "init_shm_manager",  # creates segments, never unlinks them itself
    "MessageQueue.wait_until_ready": "READY",  # the handshake after which the ring buffer is mapped everywhere
}


@pytest.mark.parametrize("patch", cpu_patches.VLLM_PATCHES, ids=lambda p: p.attribute)
def test_vllm_patch_target_exists_and_still_needs_the_patch(patch):
    module = importlib.import_module(patch.module)
    owner_name, name = patch.attribute.split(".")
    target = getattr(getattr(module, owner_name), name)
    source = inspect.getsource(target)
    assert VLLM_NEEDS[patch.attribute] in source, f"{patch.module}.{patch.attribute} changed: review its patch"
    assert "unlink" not in source, f"{patch.module}.{patch.attribute} unlinks its shared memory now: drop the patch"


def test_vllm_shm_names_are_per_engine():
    out = run_python(
        "from types import SimpleNamespace\n"
        "from prorl_megatron import cpu_patches\n"
        "cpu_patches.apply_vllm('123.ab')\n"
        "from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed as S\n"
        "c = SimpleNamespace(unique_name='tp:0', ranks=[0, 1])\n"
        "a = S.make_group_name(c)\n"
        "cpu_patches.apply_vllm('124.cd')\n"
        "b = S.make_group_name(c)\n"
        "assert a != b and '/' not in a + b and a.endswith('-cpushm'), (a, b)\n"
        "print('ok')\n"
    )
    assert out.strip().splitlines()[-1] == "ok"
