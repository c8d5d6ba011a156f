"""A thin adapter over ``vllm.LLM``, colocated with training in the same torch.distributed world.

Every process of the job holds its part of one engine (``distributed_executor_backend=
"external_launcher"``): engine TP x DP = world size, so the engine's TP may differ from
training's. Sampled logprobs are those of the *sampling* distribution (``logprobs_mode=
"processed_logprobs"``: after temperature and top-p), which is what the trainer's logprobs
at the same temperature are compared with. On GPU the engine sleeps between rollouts (weights
and KV cache released for training); sleep mode does not exist on CPU, which is logged.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional, Sequence

import torch

from prorl_megatron.checkpoint.hf_mapping import rules as mapping_rules
from prorl_megatron.config import PrecisionConfig, RolloutConfig
from prorl_megatron.models.architectures import model_dims, read_hf_config
from prorl_megatron.seeds import request_seed

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One sampled response."""

    response_ids: list[int]
    logprobs: list[float]  # per response token, under the sampling distribution
    finish_reason: str  # "stop" (EOS or a stop sequence) | "length" (max tokens: truncated)
    text: Optional[str] = None  # None when the engine has no tokenizer

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class Request:
    """One request of a stream (:meth:`RolloutEngine.submit`): ``n`` samples of ``prompt_ids``,
    sample ``j`` seeded ``seed + j`` (vLLM's parallel sampling), at most ``max_tokens`` each;
    ``key``: the caller's name for it, returned with its samples."""

    key: Hashable
    prompt_ids: tuple[int, ...]
    n: int
    seed: int
    max_tokens: int


@dataclass
class _Running:
    request: Request
    vllm_id: str
    tokens: list[list[int]] = field(default_factory=list)  # per sample, so far (partial outputs only)
    logprobs: list[list[float]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    reasons: list[Optional[str]] = field(default_factory=list)  # per sample, once it is done


def _rollout(token_ids: Sequence[int], logprobs: Sequence, finish_reason: Optional[str], text: Optional[str]) -> Rollout:
    """A vLLM completion as a :class:`Rollout`: each sampled token's logprob under the sampling
    distribution (``logprobs=0`` asks for the sampled token's alone)."""
    return Rollout(list(token_ids), [entry[token].logprob for token, entry in zip(token_ids, logprobs)],
                   finish_reason or "length", text or None)


class _RotaryReloadNotice(logging.Filter):
    """Drop vLLM's "RotaryEmbedding: Failed to load weights" warning (one per layer, every sync).

    vLLM 0.32's in-place reload counts the rotary cos/sin cache as loadable, though no
    checkpoint has it; the cache is restored as it was. Any other layer's warning still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


class WeightLoadError(RuntimeError):
    """A weight stream did not hold exactly the engine's tensors; the message names them."""


def _engine_ident() -> str:
    """A name for this engine's shared memory, unique on the machine and the same on every rank
    (collective when torch.distributed is initialised): rank 0's pid and a random token."""
    ident = [f"{os.getpid()}.{secrets.token_hex(4)}"]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(ident, src=0)
    return ident[0]


class RolloutEngine:
    """vLLM engine built from the recipe; every rank of the world constructs it together."""

    def __init__(self, hf_dir: str, rollout: RolloutConfig, precision: PrecisionConfig, seed: int,
                 world_size: Optional[int] = None, tokenizer: bool = True, load_weights: bool = True) -> None:
        """``load_weights=False``: start from random ("dummy") weights, for a caller that syncs
        the policy's weights before generating (the trainer); ``hf_dir`` then needs only
        ``config.json`` and the tokenizer files."""
        # the tensors every weight update must bring (a tied lm_head is not a separate tensor),
        # from the config alone: with load_weights=False the directory holds no weights
        config = read_hf_config(hf_dir)
        self.expected_names = {name for rule in mapping_rules(model_dims(config)) for name in rule.hf}
        self.tied_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        on_gpu = torch.cuda.is_available()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # per-step INFO lines drown the trainer's
        if not on_gpu:  # in-process engine; the KV cache size must be explicit on CPU
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(rollout.cpu_kvcache_gib))))
            from prorl_megatron import cpu_patches

            cpu_patches.apply_vllm(_engine_ident())
        from vllm import LLM

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadNotice())
        world = world_size or (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        tp = rollout.engine_tensor_parallel
        if world % tp:
            raise ValueError(f"rollout.engine_tensor_parallel {tp} does not divide the world size {world}")
        self.sleep_mode = on_gpu and rollout.sleep_between_rollouts
        if rollout.sleep_between_rollouts and not on_gpu:
            log.info("vLLM sleep mode is not supported on CPU: the engine stays resident between rollouts")
        self.data_parallel = world // tp
        self.rollout = rollout
        self.llm = LLM(
            model=hf_dir,
            tokenizer=hf_dir if tokenizer else None,
            skip_tokenizer_init=not tokenizer,
            dtype=precision.params_dtype,
            tensor_parallel_size=tp,
            data_parallel_size=self.data_parallel,
            distributed_executor_backend="external_launcher",
            seed=seed,
            max_model_len=rollout.max_prompt_tokens + rollout.max_response_tokens,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            enable_sleep_mode=self.sleep_mode,
            enforce_eager=not on_gpu,
            logprobs_mode="processed_logprobs",
            load_format="auto" if load_weights else "dummy",
        )
        self.dp_rank = self.llm.llm_engine.vllm_config.parallel_config.data_parallel_rank
        self.has_tokenizer = tokenizer
        self.running: dict[str, _Running] = {}  # this replica's streamed requests, by vLLM id
        self.asleep: set[str] = set()  # what sleep released and no wake_up brought back yet
        self.weights_lost = False  # level-2 sleep discarded the weights; load_weights restores them

    def generate(self, prompts: Sequence[Sequence[int]], n: Optional[int] = None,
                 temperature: Optional[float] = None, max_tokens: Optional[int] = None,
                 seed: Optional[int] = None, stop_token_ids: Sequence[int] = (),
                 top_p: Optional[float] = None, first_index: int = 0) -> list[list[Rollout]]:
        """``n`` samples for each prompt (token ids); recipe values unless overridden.

        ``seed`` makes the sampling reproducible: sample ``j`` of ``prompts[i]`` is seeded
        ``request_seed(seed, first_index + i, n) + j`` (:mod:`~prorl_megatron.seeds`):
        every (prompt, sample) of a round has its own noise stream. ``first_index``: the index
        of ``prompts[0]`` in the whole round, when this is a share of it.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = self.rollout
        samples_per_prompt = n or cfg.n

        def params(i: int) -> SamplingParams:
            return SamplingParams(
                n=samples_per_prompt, temperature=cfg.temperature if temperature is None else temperature,
                top_p=cfg.top_p if top_p is None else top_p, max_tokens=max_tokens or cfg.max_response_tokens,
                logprobs=0, stop=list(cfg.stop) or None, stop_token_ids=list(stop_token_ids) or None,
                seed=None if seed is None else request_seed(seed, first_index + i, samples_per_prompt),
            )

        self._check_ready()
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(requests, [params(i) for i in range(len(requests))], use_tqdm=False)
        result = []
        for out in outputs:
            samples = []
            for c in out.outputs:
                logprobs = [entry[token].logprob for token, entry in zip(c.token_ids, c.logprobs)]
                samples.append(Rollout(list(c.token_ids), logprobs, c.finish_reason or "length", c.text or None))
            result.append(samples)
        return result

    # ---- streaming: this replica's requests, added and aborted at any time -------------------

    def submit(self, requests: Sequence[Request], partial: bool = False) -> None:
        """Add ``requests`` to this replica's engine (as :meth:`generate` does, in order, so that
        submitting a list and stepping until it is done samples exactly what :meth:`generate`
        does). ``partial``: keep each sample's tokens as they come, so that :meth:`abort` can
        return what was generated (vLLM's DELTA outputs; otherwise only final outputs)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        cfg = self.rollout
        self._check_ready()
        for request in requests:
            params = SamplingParams(n=request.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_tokens=request.max_tokens, logprobs=0, stop=list(cfg.stop) or None,
                                    seed=request.seed)
            params.output_kind = RequestOutputKind.DELTA if partial else RequestOutputKind.FINAL_ONLY
            vllm_id = str(next(self.llm.request_counter))
            self.llm.llm_engine.add_request(vllm_id, TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params)
            running = _Running(request, vllm_id)
            if partial:
                running.tokens, running.logprobs = [[] for _ in range(request.n)], [[] for _ in range(request.n)]
                running.texts, running.reasons = ["" for _ in range(request.n)], [None] * request.n
            self.running[vllm_id] = running

    @property
    def busy(self) -> bool:
        """Whether this replica has streamed requests that have not finished."""
        return bool(self.running)

    def advance(self) -> list[tuple[Hashable, list[Rollout]]]:
        """One engine step of this replica; the requests it finished: (key, samples in order)."""
        if not self.running:
            return []
        done = []
        for out in self.llm.llm_engine.step():
            running = self.running.get(out.request_id)
            if running is None:
                continue
            if running.tokens:  # DELTA: this step's new tokens of each sample
                for c in out.outputs:
                    running.tokens[c.index].extend(c.token_ids)
                    running.logprobs[c.index].extend(c.logprobs or [])
                    running.texts[c.index] += c.text or ""
                    running.reasons[c.index] = c.finish_reason or running.reasons[c.index]
            if not out.finished:
                continue
            del self.running[out.request_id]
            if running.tokens:
                samples = [_rollout(running.tokens[j], running.logprobs[j], running.reasons[j], running.texts[j])
                           for j in range(running.request.n)]
            else:
                samples = [_rollout(c.token_ids, c.logprobs, c.finish_reason, c.text)
                           for c in sorted(out.outputs, key=lambda c: c.index)]
            done.append((running.request.key, samples))
        return done

    def abort(self, keys: Optional[Iterable[Hashable]] = None) -> dict[Hashable, list[tuple[list[int], list[float],
                                                                                         Optional[str]]]]:
        """Abort the streamed requests named by ``keys`` (all: None); return, for a ``partial``
        request, each sample as far as it got, by key: (token ids, their logprobs, the finish
        reason of a sample that was done, else None)."""
        wanted = None if keys is None else set(keys)
        chosen = [r for r in self.running.values() if wanted is None or r.request.key in wanted]
        if chosen:
            self.llm.llm_engine.abort_request([r.vllm_id for r in chosen])
        out = {}
        for r in chosen:
            del self.running[r.vllm_id]
            if r.tokens:
                out[r.request.key] = [(list(t), [e[tok].logprob for tok, e in zip(t, lp)], reason)
                                      for t, lp, reason in zip(r.tokens, r.logprobs, r.reasons)]
        return out

    def decode(self, token_ids: Sequence[int]) -> Optional[str]:
        """The text of ``token_ids`` as the engine detokenizes a response (None without a tokenizer)."""
        if not self.has_tokenizer:
            return None
        return self.llm.get_tokenizer().decode(list(token_ids), skip_special_tokens=True)

    def generate_global(self, prompts: Sequence[Sequence[int]], seed: int, **kwargs) -> list[list[Rollout]]:
        """:meth:`generate` for a list of prompts that every rank holds: each engine
        data-parallel replica samples its contiguous share, and all results are gathered on
        every rank. Prompt ``i`` is seeded by its index in ``prompts`` whatever the layout, so
        the samples do not depend on the number of replicas."""
        from prorl_megatron.collect import gather_lists, shard_bounds

        start, end = shard_bounds(len(prompts), self.data_parallel, self.dp_rank)
        mine = self.generate(prompts[start:end], seed=seed, first_index=start, **kwargs) if end > start else []
        by_replica: dict[int, list[list[Rollout]]] = {}
        for replica, result in gather_lists([self.dp_rank, mine]):  # a replica's ranks agree
            by_replica.setdefault(replica, result)
        return [x for replica in range(self.data_parallel) for x in by_replica[replica]]

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of each token given its prefix (temperature 1), positions 1..len-1."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_ready()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                    use_tqdm=False)
        return [[entry[token].logprob for token, entry in zip(seq[1:], out.prompt_logprobs[1:])]
                for seq, out in zip(sequences, outputs)]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in place from HF-named full tensors (a stream).

        Raises :class:`WeightLoadError` if the stream missed one of the engine's tensors or
        brought one it does not have (the engine's weights are then not to be trusted).
        """
        seen: list[str] = []

        def recorded():
            for name, tensor in named_tensors:
                seen.append(name)
                yield name, tensor
                if self.tied_embeddings and name == "model.embed_tokens.weight":
                    # vLLM's in-place reload (0.32) restores each layer separately, which unties a
                    # tied lm_head and leaves it with the old weights unless it is loaded as well
                    yield "lm_head.weight", tensor

        if "weights" in self.asleep:
            raise RuntimeError("wake_up(['weights']) the vLLM engine before loading weights into it")
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=recorded(), is_checkpoint_format=True)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        got = set(seen)
        missing = sorted(self.expected_names - got - {"lm_head.weight"})
        unexpected = sorted(got - self.expected_names - {"lm_head.weight"})
        if missing or unexpected or len(seen) != len(got):
            twice = sorted({n for n in seen if seen.count(n) > 1})
            raise WeightLoadError(f"weight update does not match the engine's model: missing {missing}, "
                                  f"unexpected {unexpected}, sent twice {twice}")
        self.weights_lost = False

    def sleep(self) -> None:
        """Release the KV cache and discard the weights (level 2) for the training passes: only
        before an update, since generating again needs a weight sync first (:meth:`load_weights`)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep, self.weights_lost = {"weights", "kv_cache"}, True
        log.debug("engine sleep (level 2)%s", "" if self.sleep_mode else ": no sleep mode, stays resident")

    def wake_up(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Map back what :meth:`sleep` released (``tags``: the weights first for a sync, then the
        KV cache, keeps the peak lower); a no-op for what is awake."""
        wanted = [t for t in tags if t in self.asleep]
        if wanted:
            self.llm.wake_up(tags=wanted)
            self.asleep -= set(wanted)
        log.debug("engine wake up %s%s", "+".join(tags), "" if self.sleep_mode else ": no sleep mode, resident")

    def shutdown(self) -> None:
        """Free the engine in this process, for another one to be built in its place (collective:
        every rank of the engine calls it). vLLM's own in-process shutdown ends with
        ``cleanup_dist_env_and_memory()``, which destroys torch.distributed's default process
        group — the trainer's — so the same steps are taken here without that one: the
        executor's workers, the scheduler, then vLLM's own groups (TP/PP/DP and its world
        group: ``new_group`` copies, not the default group). The CPU shared memory needs nothing
        (its names were unlinked once mapped; the mappings go with the objects), and the next
        engine takes a fresh shared-memory identifier."""
        from vllm import envs
        from vllm.distributed import parallel_state

        if self.llm is None:
            return
        if self.asleep:  # on CUDA, vLLM's allocator would release the sleeping allocations twice
            self.llm.wake_up()
            self.asleep = set()
        engine = self.llm.llm_engine
        cleanup = getattr(engine, "_finalizer", None)  # vLLM's own, run while the compiled model is
        if cleanup is not None:  # reachable: it drops the torch.compile bytecode hooks that pin it
            cleanup()  # (weights, CUDA graphs) for the life of the process, after the runner lets go
        client = engine.engine_core  # InprocClient: the engine core lives in this process
        client._finalizer.detach()  # collected later, it would run vLLM's shutdown (see above)
        core = client.engine_core
        core.structured_output_manager.clear_backend()
        if core.model_executor:
            core.model_executor.shutdown()
        if core.scheduler:
            core.scheduler.shutdown()
        parallel_state.destroy_model_parallel()
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
            parallel_state._WORLD = None
        self.llm = None
        self.asleep, self.weights_lost = set(), True
        gc.unfreeze()  # vLLM froze its start-up objects; let the collector see them
        gc.collect()
        envs.disable_envs_cache()  # the next engine reads the environment afresh
        if torch.cuda.is_available():  # the rest of vLLM's cleanup_dist_env_and_memory
            from vllm.device_allocator.cumem import CuMemAllocator
            from vllm.triton_utils import HAS_TRITON

            if HAS_TRITON:
                from vllm.v1.sample.ops.topk_topp_triton import reset_buffer_cache

                reset_buffer_cache()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.accelerator.empty_host_cache()  # the pinned host copies sleep made
            left = CuMemAllocator.instance.get_current_usage() if CuMemAllocator.instance is not None else 0
            if left:  # the next engine's sleep mode asserts an empty allocator: say why here
                raise RuntimeError(f"the vLLM engine's sleep-mode allocator still holds {left} bytes after its "
                                   "shutdown: something keeps the old engine's tensors alive")
        log.debug("engine shut down")

    def _check_ready(self) -> None:
        if self.llm is None:
            raise RuntimeError("the vLLM engine was shut down")
        if self.asleep or self.weights_lost:
            raise RuntimeError("the vLLM engine is asleep or its weights were discarded by a level-2 sleep: "
                               "wake it and sync the policy's weights before generating")
