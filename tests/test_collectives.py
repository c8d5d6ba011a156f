"""Collectives on tensors stay on the layout's device (issue 12): the rule, checked on the source
and in a real two-process gloo world; and the backend the default group starts with.

The rule (prorl_megatron/collect.py): the tensor of every torch.distributed tensor collective
in the package is provably on ``collective_device()`` — built with
``device=collective_device()`` (or ``*_like`` of such a tensor) — or the call sits in a
reviewed function below, whose tensors come from the model (parameters, activations), which
lives on the same device; even there a tensor built without ``device=`` (or moved with
``.cpu()``) is refused. Object collectives and barriers pick their own device and are fine
under both backends.
"""

from __future__ import annotations

import ast
import datetime
import math
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "prorl_megatron"

# collective -> the positions and keywords of its tensor (or tensor-list) arguments
TENSOR_ARGS = {
    "all_reduce": ((0, "tensor"),),
    "broadcast": ((0, "tensor"),),
    "reduce": ((0, "tensor"),),
    "send": ((0, "tensor"),),
    "recv": ((0, "tensor"),),
    "isend": ((0, "tensor"),),
    "irecv": ((0, "tensor"),),
    "all_gather": ((0, "tensor_list"), (1, "tensor")),
    "all_gather_into_tensor": ((0, "output_tensor"), (1, "input_tensor")),
    "all_gather_coalesced": ((0, "output_tensor_lists"), (1, "input_tensor_list")),
    "all_reduce_coalesced": ((0, "tensors"),),
    "reduce_scatter": ((0, "output"), (1, "input_list")),
    "reduce_scatter_tensor": ((0, "output"), (1, "input")),
    "all_to_all": ((0, "output_tensor_list"), (1, "input_tensor_list")),
    "all_to_all_single": ((0, "output"), (1, "input")),
    "gather": ((0, "tensor"), (1, "gather_list")),
    "scatter": ((0, "tensor"), (1, "scatter_list")),
    "batch_isend_irecv": ((0, "p2p_op_list"),),
}
# names no other library in the package uses: a call of them on any receiver counts
DISTINCTIVE = {name for name in TENSOR_ARGS if "_" in name or name in ("isend", "irecv")}

# (file, function) -> why its collectives' tensors are on the layout's device
REVIEWED = {
    ("models/logprobs.py", "_vocab_parallel_entropy"):
        "reduces over the TP group tensors computed from the logits, on the model's device",
    ("rollout/weight_sync.py", "check_sync"):
        "builds its statistics on next(model.parameters()).device, the model's (= the layout's) device",
    ("checkpoint/transfer.py", "export_hf_weights"):
        "broadcasts flattened parameters (or buffers built on the parameters' device) over the PP group",
    ("checkpoint/transfer.py", "_gather_tp"):
        "all-gathers flattened parameter shards (and empty_like buffers of them) over the TP group",
}

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "linspace", "eye", "from_numpy"}
LIKE = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like"}


def _dist_aliases(tree: ast.AST) -> tuple[set[str], dict[str, str]]:
    """Names bound to the torch.distributed module, and bare names imported from it."""
    modules, bare = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch.distributed" and alias.asname:
                    modules.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                if node.module == "torch" and alias.name == "distributed":
                    modules.add(alias.asname or alias.name)
                elif node.module and node.module.startswith("torch.distributed"):
                    bare[alias.asname or alias.name] = alias.name
    return modules, bare


def _is_dist(node: ast.AST, modules: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in modules
    return isinstance(node, ast.Attribute) and node.attr == "distributed" and \
        isinstance(node.value, ast.Name) and node.value.id == "torch"


def _collective(call: ast.Call, modules: set[str], bare: dict[str, str]) -> Optional[str]:
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr in TENSOR_ARGS:
        if _is_dist(func.value, modules) or func.attr in DISTINCTIVE:
            return func.attr
    if isinstance(func, ast.Name) and bare.get(func.id) in TENSOR_ARGS:
        return bare[func.id]
    return None


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


class _Scope:
    """Assignments to plain names inside one function (or module)."""

    def __init__(self, node: ast.AST) -> None:
        self.values: dict[str, list[Optional[ast.AST]]] = {}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                self.values.setdefault(arg.arg, []).append(None)  # unknown provenance
        for sub in ast.walk(node):
            if isinstance(sub, ast.Assign):
                for target in sub.targets:
                    self._bind(target, sub.value)
            elif isinstance(sub, ast.AnnAssign) and sub.value is not None:
                self._bind(sub.target, sub.value)
            elif isinstance(sub, (ast.For, ast.AsyncFor, ast.comprehension)):
                self._bind(sub.target, None)
            elif isinstance(sub, ast.withitem) and sub.optional_vars is not None:
                self._bind(sub.optional_vars, None)
            elif isinstance(sub, ast.NamedExpr):
                self._bind(sub.target, sub.value)

    def _bind(self, target: ast.AST, value: Optional[ast.AST]) -> None:
        if isinstance(target, ast.Name):
            self.values.setdefault(target.id, []).append(value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._bind(t, None)

    def on_rule_device(self, expr: Optional[ast.AST], seen: frozenset = frozenset()) -> bool:
        """Provably built on collective_device()."""
        if expr is None:
            return False
        if isinstance(expr, ast.Constant) and expr.value is None:
            return True  # e.g. gather_list on a non-destination rank
        if isinstance(expr, ast.Name):
            values = self.values.get(expr.id)
            return bool(values) and expr.id not in seen and \
                all(self.on_rule_device(v, seen | {expr.id}) for v in values)
        if isinstance(expr, ast.IfExp):
            return self.on_rule_device(expr.body, seen) and self.on_rule_device(expr.orelse, seen)
        if isinstance(expr, (ast.List, ast.Tuple)):
            return all(self.on_rule_device(e, seen) for e in expr.elts)
        if isinstance(expr, ast.ListComp):
            return self.on_rule_device(expr.elt, seen)
        if isinstance(expr, ast.Call):
            device = next((k.value for k in expr.keywords if k.arg == "device"), None)
            if device is not None:
                return self._device_is_rule(device, seen)
            if _call_name(expr) in LIKE and expr.args:
                return self.on_rule_device(expr.args[0], seen)
        return False

    def _device_is_rule(self, expr: ast.AST, seen: frozenset) -> bool:
        if isinstance(expr, ast.Call):
            return _call_name(expr) == "collective_device"
        if isinstance(expr, ast.Name):
            values = self.values.get(expr.id)
            return bool(values) and expr.id not in seen and \
                all(v is not None and self._device_is_rule(v, seen | {expr.id}) for v in values)
        return False

    def cpu_evidence(self, expr: Optional[ast.AST], seen: frozenset = frozenset()) -> Optional[ast.AST]:
        """A construction that puts the tensor on the CPU whatever the layout (a factory without
        ``device=``, ``.cpu()``), if one feeds ``expr``."""
        if expr is None:
            return None
        if isinstance(expr, ast.Name):
            if expr.id in seen:
                return None
            for v in self.values.get(expr.id, ()):
                found = self.cpu_evidence(v, seen | {expr.id})
                if found is not None:
                    return found
            return None
        if isinstance(expr, ast.IfExp):
            return self.cpu_evidence(expr.body, seen) or self.cpu_evidence(expr.orelse, seen)
        if isinstance(expr, (ast.List, ast.Tuple)):
            return next((f for f in (self.cpu_evidence(e, seen) for e in expr.elts) if f is not None), None)
        if isinstance(expr, ast.ListComp):
            return self.cpu_evidence(expr.elt, seen)
        if isinstance(expr, ast.Call):
            name = _call_name(expr)
            has_device = any(k.arg == "device" for k in expr.keywords)
            if name == "cpu" or (name in FACTORIES and not has_device):
                return expr
            if name in LIKE and expr.args and not has_device:
                return self.cpu_evidence(expr.args[0], seen)
        return None


def _tensor_args(call: ast.Call, name: str) -> Iterator[ast.AST]:
    keywords = {k.arg: k.value for k in call.keywords}
    for position, keyword in TENSOR_ARGS[name]:
        if position < len(call.args):
            yield call.args[position]
        elif keyword in keywords:
            yield keywords[keyword]


def check_source(source: str, relpath: str, reviewed: dict = REVIEWED) -> tuple[list[str], list[tuple]]:
    """(violations as ``file:line: ...``, the collective sites found as (file, function, line, name))."""
    tree = ast.parse(source, filename=relpath)
    modules, bare = _dist_aliases(tree)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    problems, sites = [], []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = _collective(call, modules, bare)
        if name is None:
            continue
        scope_node = parents.get(call)
        while scope_node is not None and not isinstance(scope_node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scope_node = parents.get(scope_node)
        function = scope_node.name if scope_node is not None else "<module>"
        scope = _Scope(scope_node if scope_node is not None else tree)
        sites.append((relpath, function, call.lineno, name))
        where = f"{relpath}:{call.lineno}: {ast.unparse(call.func)}(...) in {function}()"
        for arg in _tensor_args(call, name):
            text = ast.unparse(arg)
            if scope.on_rule_device(arg):
                continue
            cpu = scope.cpu_evidence(arg)
            if cpu is not None:
                problems.append(f"{where}: `{text}` comes from `{ast.unparse(cpu)}` (line {cpu.lineno}), a CPU "
                                "tensor whatever the layout; NCCL rejects it. Build it with "
                                "device=collective_device() (prorl_megatron/collect.py)")
            elif (relpath, function) not in reviewed:
                problems.append(f"{where}: `{text}` is not provably on the layout's device. Build it with "
                                "device=collective_device() (prorl_megatron/collect.py), or review the site and "
                                "add it to REVIEWED in tests/test_collectives.py with the reason")
    return problems, sites


def check_package() -> tuple[list[str], list[tuple]]:
    problems, sites = [], []
    for path in sorted(PKG.rglob("*.py")):
        p, s = check_source(path.read_text(), str(path.relative_to(PKG)))
        problems += p
        sites += s
    return problems, sites


# --------------------------------------------------------------------------------------
# (a) the rule, on the package's source
# --------------------------------------------------------------------------------------


def test_every_tensor_collective_in_the_package_is_on_the_layouts_device():
    problems, sites = check_package()
    assert problems == [], "\n".join(problems)
    found = {(f, fn) for f, fn, _, _ in sites}
    stale = sorted(set(REVIEWED) - found)
    assert stale == [], f"REVIEWED lists functions without a tensor collective any more: {stale}"
    # the check sees the sites it is about (it is not vacuous)
    assert ("metrics.py", "means") in found and ("collect.py", "any_rank") in found, sorted(found)


def test_the_rule_catches_cpu_bookkeeping_tensors_and_names_the_line():
    bad = '''
import torch
import torch.distributed as dist

def means(values):
    flag = torch.tensor([1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    torch.distributed.all_reduce(torch.zeros(2))
    dist.all_gather([torch.empty(1) for _ in range(2)], flag)
'''
    problems, sites = check_source(bad, "x.py")
    assert [s[2] for s in sites] == [7, 8, 9]
    assert len(problems) == 4 and all("CPU tensor" in p for p in problems), problems
    assert problems[0].startswith("x.py:7: dist.all_reduce(...) in means(): `flag` comes from `torch.tensor([1.0])`")

    unknown = "import torch.distributed as dist\ndef f(t):\n    dist.broadcast(t, src=0)\n"
    problems, _ = check_source(unknown, "y.py")
    assert len(problems) == 1 and problems[0].startswith("y.py:3:") and "not provably" in problems[0]
    # reviewed: accepted, unless the tensor is visibly built on the CPU
    assert check_source(unknown, "y.py", {("y.py", "f"): "model tensor"})[0] == []
    cpu_in_reviewed = "import torch\nfrom torch.distributed import all_reduce\ndef f(x):\n" \
                      "    s = x.sum().cpu()\n    all_reduce(s)\n"
    problems, _ = check_source(cpu_in_reviewed, "z.py", {("z.py", "f"): "model tensor"})
    assert len(problems) == 1 and "`x.sum().cpu()` (line 4)" in problems[0]


def test_the_rule_accepts_the_helper_and_its_derivatives():
    good = '''
import torch
import torch.distributed as dist
from prorl_megatron.collect import collective_device

def f(rows, n):
    device = collective_device()
    a = torch.tensor(rows or [[0.0, 0.0]], dtype=torch.float64, device=collective_device())
    dist.all_reduce(a)
    b = torch.zeros(3, device=device)
    dist.all_gather([torch.empty_like(b) for _ in range(n)], b)
    dist.reduce_scatter_tensor(output=torch.empty(1, device=device), input=b)
'''
    problems, sites = check_source(good, "ok.py")
    assert problems == [] and len(sites) == 3


# --------------------------------------------------------------------------------------
# (b) the helpers, in a real world of two gloo processes
# --------------------------------------------------------------------------------------


def _world_worker(rank: int, world: int, init_file: str) -> None:
    import torch
    import torch.distributed as dist

    from prorl_megatron.collect import any_rank, collective_device
    from prorl_megatron.metrics import TokenSums
    from prorl_megatron.parallel import process_group_backend

    dist.init_process_group(process_group_backend(use_cuda=False), init_method=f"file://{init_file}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        assert collective_device() == torch.device("cpu")
        # megatron makes its groups with new_group(backend=None): they inherit the default's backends
        assert dist.get_backend_config(dist.new_group([0, 1])) == dist.get_backend_config()
        sums = TokenSums()
        if rank == 0:
            sums.add("loss", 3.0, 2.0)
            sums.add("kl", 1.0, 4.0)
            sums.add_max("ratio", 1.5)
        else:
            sums.add("loss", 5.0, 6.0)
            sums.add_max("ratio", 2.5)
        out = sums.means(["loss", "kl", "nothing"], ["ratio", "unseen"])
        assert out == {"loss": 1.0, "kl": 0.25, "nothing": 0.0, "ratio": 2.5, "unseen": -math.inf}, out
        assert TokenSums().means([]) == {}
        assert any_rank(rank == 1) is True and any_rank(False) is False
    finally:
        dist.destroy_process_group()


def test_token_sums_and_flags_reduce_over_a_real_gloo_world(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_world_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True, start_method="spawn")


# --------------------------------------------------------------------------------------
# (c) the default group's backend
# --------------------------------------------------------------------------------------


def test_gpu_runs_start_the_group_with_a_cpu_and_a_cuda_backend():
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from prorl_megatron.collect import collective_device_type
    from prorl_megatron.parallel import process_group_backend

    gpu, cpu = process_group_backend(use_cuda=True), process_group_backend(use_cuda=False)
    assert gpu == "cpu:gloo,cuda:nccl" and cpu == "gloo"
    assert BackendConfig(Backend(gpu)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    # where collectives go under each group torch can start
    assert collective_device_type(str(BackendConfig(Backend(gpu))), cuda_available=True) == "cuda"
    assert collective_device_type(str(BackendConfig(Backend("nccl"))), cuda_available=True) == "cuda"
    assert collective_device_type(str(BackendConfig(Backend(cpu))), cuda_available=True) == "cpu"
    assert collective_device_type(str(BackendConfig(Backend(cpu))), cuda_available=False) == "cpu"
    assert collective_device_type(None, cuda_available=True) == "cuda"


@pytest.mark.gpu
def test_on_a_gpu_the_rule_device_is_the_current_cuda_device(tmp_path):
    import torch
    import torch.distributed as dist

    from prorl_megatron.collect import any_rank, collective_device
    from prorl_megatron.metrics import TokenSums
    from prorl_megatron.parallel import process_group_backend

    dist.init_process_group(process_group_backend(use_cuda=True), init_method=f"file://{tmp_path / 'store'}",
                            rank=0, world_size=1)
    try:
        assert collective_device() == torch.device("cuda", torch.cuda.current_device())
        sums = TokenSums()
        sums.add("loss", 3.0, 2.0)
        assert sums.means(["loss"]) == {"loss": 1.5}
        assert any_rank(True) is True
        dist.barrier()  # the CPU (gloo) backend: object collectives and barriers
        holder = [None]
        dist.all_gather_object(holder, {"ok": 1})
        assert holder == [{"ok": 1}]
    finally:
        dist.destroy_process_group()
