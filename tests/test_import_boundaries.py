"""The architecture's import rules, checked on the source and in a clean interpreter."""

import ast
import sys
from pathlib import Path

from tests import procs


ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "prorl_megatron"
ENGINES = ("megatron", "vllm", "transformer_engine", "apex", "torch.distributed", "transformers", "datasets")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_algo_sources_import_no_engine_or_distributed_module():
    offenders = {}
    for path in sorted((PKG / "algo").rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if m.startswith(ENGINES) or m.startswith("prorl_megatron.")
                     and not m.startswith("prorl_megatron.algo"))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def modules_importing(prefix: str) -> set[str]:
    found = set()
    for path in PKG.rglob("*.py"):
        names = imported_modules(path)
        if any(n == prefix or n.startswith(prefix + ".") for n in names):
            found.add(str(path.relative_to(PKG)))
    return found


def test_megatron_and_vllm_stay_behind_their_seams():
    megatron_allowed = ("models/", "checkpoint/", "parallel.py", "cpu_patches.py")
    assert {m for m in modules_importing("megatron") if not m.startswith(megatron_allowed)} == set()
    assert {m for m in modules_importing("vllm") if not m.startswith("rollout/")} == set()


def test_algo_imports_with_torch_alone():
    """In a fresh interpreter that refuses every heavy module, `import prorl_megatron.algo` works."""
    code = f"""
import importlib.abc, sys
# torch imports torch.distributed itself; the source check above covers our own imports of it
BLOCKED = tuple(m for m in {ENGINES!r} if m != "torch.distributed") + ("yaml",)
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(BLOCKED):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import prorl_megatron.algo as algo
assert callable(algo.policy_loss) and callable(algo.grpo_advantages)
loaded = sorted(m for m in sys.modules if m.startswith(("megatron", "vllm", "transformer_engine", "yaml")))
assert not loaded, loaded
print("ok")
"""
    out = procs.run([sys.executable, "-c", code], timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
