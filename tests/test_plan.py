"""The memory plan: calibrated against measured CPU peaks, its command line, and refusals.

Calibration: ``tests/plan_worker.py`` runs one training update (and the no-grad logprob pass)
in a subprocess at world size 1 and measures the torch allocator's peak from its allocation
events; the plan's figure for the same settings (local attention spec: no TE on CPU) must be
within 25%. The 100M-parameter cases take about a minute each on two cores (marked slow).
"""

from __future__ import annotations

import json
import sys

import pytest

from prorl_megatron.config import ConfigError, load_recipe
from prorl_megatron.models.architectures import model_dims
from prorl_megatron.plan import GIB, H100_80GB, KNOBS, check_fits, estimate, local_processes, main, plan_table
from tests import procs
from tests.megatron.conftest import ROOT, env

TINY = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
M100 = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,  # 98M parameters
            num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
# DeepSeek-R1-Distill-Qwen-1.5B's config.json (the fields model_dims reads)
QWEN2_1P5B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                  rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=131072,
                  rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False)

CASES = {  # name: (shape, dtype, recompute, rows, seq, logprob chunk, also the logprob pass)
    "tiny-bf16-none": (TINY, "bfloat16", "none", 2, 384, 256, True),
    "tiny-bf16-full": (TINY, "bfloat16", "full", 2, 384, 256, True),
    "tiny-bf16-selective": (TINY, "bfloat16", "selective", 2, 384, 256, True),
    "100m-fp32-none": (M100, "float32", "none", 1, 1024, 512, False),
    "100m-fp32-full": (M100, "float32", "full", 1, 1024, 512, False),
}


def measure(shape, dtype, recompute, rows, seq, chunk, logprobs) -> dict:
    spec = dict(shape=shape, dtype=dtype, recompute=recompute, rows=rows, seq=seq, chunk=chunk, logprobs=logprobs)
    out = procs.run([sys.executable, "-m", "tests.plan_worker", json.dumps(spec)], timeout=600,
                    env={**env(), "OMP_NUM_THREADS": "2"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout + out.stderr)[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("case", [pytest.param(name, marks=[pytest.mark.slow] if name.startswith("100m") else [])
                                  for name in CASES])
def test_plan_matches_measured_cpu_peak(case):
    result = measure(*CASES[case])
    for phase, measured in result["measured"].items():
        planned = result["planned"][phase]
        print(f"{case} {phase}: measured {measured / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB, "
              f"ratio {planned / measured:.3f}")
        assert 0.75 <= planned / measured <= 1.25, (case, phase, planned, measured, result["rows"])


def test_activations_dominate_the_calibration_without_recompute():
    """The calibration cases are large enough that activations, not weights, are measured."""
    import transformers

    for shape, rows, seq in ((TINY, 2, 384), (M100, 1, 1024)):
        dims = model_dims(transformers.Qwen2Config(**shape, architectures=["Qwen2ForCausalLM"]))
        recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.yaml", [
            "parallel.tensor=1", "rollout.max_prompt_tokens=1", f"rollout.max_response_tokens={seq - 1}",
            f"train.micro_batch_size={rows}", "train.mini_batch_prompts=16", "rollout.n=8"])
        plan = estimate(recipe, dims, 1, te=False, on_gpu=False)
        kept = next(r.bytes["update"] for r in plan.rows if r.what.startswith("activations kept"))
        assert kept > 0.35 * plan.own_bytes["update"]


# --------------------------------------------------------------------------------------
# The 1.5B recipe, the tiny recipe, refusals
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_1p5b(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2-1p5b")
    (directory / "config.json").write_text(json.dumps(QWEN2_1P5B))
    return directory


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.megatron.tiny_models import make_tiny_hf

    return make_tiny_hf("qwen2_tied", tmp_path_factory.mktemp("tiny") / "hf")


def test_cli_prints_the_table_for_the_1p5b_recipe(qwen_1p5b):
    out = procs.run([sys.executable, "-m", "prorl_megatron.plan", "--recipe", "recipes/prorl_1p5b.yaml",
                     "--world-size", "32", "--hf-config", str(qwen_1p5b),
                     "train.max_tokens_per_micro_batch=18432", "train.distributed_optimizer=true"], timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for needle in ("Memory plan for prorl-1p5b", "TP 1 x PP 1 x DP 32", "policy weights (1.78B params, bfloat16)",
                   "gradients: DDP buffer (fp32)", "/ DP 32 (distributed)", "reference weights",
                   "vLLM awake: weights + KV cache (0.5 x device)", "vLLM asleep (level 2)",
                   "activations kept", "logprob", "Transformer Engine", "fits: peak"):
        assert needle in text, (needle, text)


def test_cli_prints_the_table_for_the_tiny_recipe_on_cpu(tiny_hf, capsys):
    assert main(["--recipe", "recipes/tiny_cpu.yaml", "--hf-config", str(tiny_hf), "--cpu", "--world-size", "2"]) == 0
    text = capsys.readouterr().out
    for needle in ("per process (CPU)", "TP 2 x PP 1 x DP 1", "of host RAM", "vLLM on CPU (no sleep)",
                   "local spec", "no TE", "fits: peak"):
        assert needle in text, (needle, text)
    assert "vLLM awake" not in text and "CUDA context" not in text


def test_a_recipe_that_cannot_fit_is_refused_with_the_knobs(qwen_1p5b, capsys):
    overrides = ["train.max_tokens_per_micro_batch=73728", "train.distributed_optimizer=false",
                 "train.recompute=none"]
    assert main(["--recipe", "recipes/prorl_1p5b.yaml", "--world-size", "32", "--hf-config", str(qwen_1p5b),
                 *overrides]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT: peak training (update)" in captured.out
    assert "train.max_tokens_per_micro_batch" in captured.err and "train.recompute=full" in captured.err

    recipe = load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml", overrides)
    dims = model_dims(_config(qwen_1p5b))
    with pytest.raises(ConfigError) as err:
        check_fits(recipe, dims, 32, H100_80GB, te=True, on_gpu=True)
    message = str(err.value)
    assert "does not fit" in message and "activations kept" in message and KNOBS in message


def test_check_fits_returns_the_plan_and_the_knobs_make_it_fit(qwen_1p5b):
    dims = model_dims(_config(qwen_1p5b))
    base = ["train.distributed_optimizer=false", "train.recompute=none", "train.max_tokens_per_micro_batch=36864"]
    too_big = estimate(load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml", base), dims, 32, H100_80GB)
    assert too_big.fits is False and too_big.peak_phase == "update"
    for knob in ("train.recompute=full", "train.max_tokens_per_micro_batch=17408"):  # 17408: the 16k stage's row
        recipe = load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml", [*base, knob])
        plan = check_fits(recipe, dims, 32, H100_80GB, te=True, on_gpu=True)
        assert plan.fits and plan.peak_bytes < too_big.peak_bytes
    # the distributed optimizer divides fp32 main weights + Adam moments (12 B/param) over DP
    shard = estimate(load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml", [*base, "train.distributed_optimizer=true"]),
                     dims, 32, H100_80GB)
    saved = too_big.totals["rollout"] - shard.totals["rollout"]
    params = 1_777_088_000  # DeepSeek-R1-Distill-Qwen-1.5B, untied
    assert abs(saved - 12 * params * (1 - 1 / 32)) < 0.01 * GIB
    # rollout: vLLM takes gpu_memory_utilization of the device on top of the trainer's resident state
    lower = estimate(load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml",
                                 [*base, "rollout.gpu_memory_utilization=0.3"]), dims, 32, H100_80GB)
    assert abs((too_big.totals["rollout"] - lower.totals["rollout"]) - 0.2 * H100_80GB) < 2
    assert "no device size" in plan_table(recipe, dims, 32, None)


def test_local_attention_is_quadratic_and_te_is_linear(qwen_1p5b):
    dims = model_dims(_config(qwen_1p5b))

    def kept(te, response, recompute="none"):
        recipe = load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml", [
            f"rollout.max_response_tokens={response}", f"train.max_tokens_per_micro_batch={1024 + response}",
            f"train.recompute={recompute}"])
        plan = estimate(recipe, dims, 32, H100_80GB, te=te)
        return next(r.bytes["update"] for r in plan.rows if r.what.startswith("activations kept"))

    assert abs(kept(True, 16384) / kept(True, 8192) - 17408 / 9216) < 0.02  # in proportion to the tokens: O(S)
    assert kept(False, 16384) / kept(False, 8192) > 3  # [B, heads, S, S] scores: O(S^2)
    assert kept(False, 16384, "selective") < 0.25 * kept(False, 16384)


def test_local_processes_reads_the_launchers():
    assert local_processes({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_processes({"SLURM_TASKS_PER_NODE": "8(x4)"}) == 8
    assert local_processes({"SLURM_TASKS_PER_NODE": "2,1"}) == 2
    assert local_processes({}) == 1


def _config(directory):
    from prorl_megatron.models.architectures import read_hf_config

    return read_hf_config(str(directory))


def test_pipeline_stages_hold_the_micro_batches_1f1b_keeps_in_flight(qwen_1p5b):
    """PP2: the first stage holds half the layers for min(pp, micro-batches) = 2 micro-batches at
    once (Megatron-LM's theoretical_memory_usage): its kept activations are PP1's layers' (the
    tail aside), not half of them; with one micro-batch per mini-batch, one is in flight."""
    dims = model_dims(_config(qwen_1p5b))

    def kept(*overrides):
        recipe = load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml", ["train.max_tokens_per_micro_batch=null",
                                                                     "train.micro_batch_size=4", *overrides])
        plan = estimate(recipe, dims, 32 * recipe.parallel.pipeline, te=True)
        return next(r.bytes["update"] for r in plan.rows if r.what.startswith("activations kept"))

    from prorl_megatron.plan import shapes, tail_saved

    pp1 = kept()
    tail = tail_saved(shapes(load_recipe(ROOT / "recipes" / "prorl_1p5b.yaml", [
        "train.max_tokens_per_micro_batch=null", "train.micro_batch_size=4"]), dims), True)
    assert kept("parallel.pipeline=2") == pp1 - tail  # 2 in flight x 14 layers = 28 layers
    assert kept("parallel.pipeline=4") == pp1 - tail  # 4 x 7
    one = kept("parallel.pipeline=2", "train.mini_batch_prompts=8")  # 8 x 16 rows / DP 32: one micro-batch
    assert one == (pp1 - tail) // 2 + tail  # the last stage's: its 14 layers and the tail
