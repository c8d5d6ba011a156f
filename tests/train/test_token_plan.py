"""The token-budget training plan: micro-batches under the budget (packing multiples included), DP
ranks balanced by compute, and the same loss and gradients as the row-count plan (real processes, DP2)."""

import json
import math
import random
import sys
from types import SimpleNamespace

import pytest

from bench.batching import REGIMES, mini_batch_figures, qwen_1p5b_cost, step_lengths
from bench.gpu_check import QWEN2_1P5B
from prorl_megatron.models.architectures import model_dims
from prorl_megatron.models.forward import packed_tokens, packing_multiples, padded_lengths
from prorl_megatron.plan import cost_model
from prorl_megatron.rollout.batch import (
    CostModel, balance_over_ranks, micro_batch_cost, micro_batch_tokens, rank_micro_batches, token_micro_batches,
    training_plan,
)
from tests import procs
from tests.megatron.conftest import env
from tests.megatron.tiny_models import make_tiny_hf


def test_micro_batches_stay_under_the_budget_and_cover_every_row_once():
    lengths = [5, 40, 7, 33, 12, 90, 8, 41, 6, 200]
    groups = token_micro_batches(list(range(len(lengths))), lengths, max_tokens=100)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or micro_batch_tokens([lengths[r] for r in g]) <= 100
    assert [9] in groups  # longer than the budget: alone
    # neighbours in length share a micro-batch: [41, 40] pad 1 token, not [90, 5]
    assert any(set(g) == {7, 1} for g in groups)
    packed = token_micro_batches(list(range(len(lengths))), lengths, max_tokens=100, packed=True)
    assert all(len(g) == 1 or sum(lengths[r] for r in g) <= 100 for g in packed)
    assert len(packed) < len(groups)  # packing wastes nothing on padding, so fewer micro-batches


def test_the_budget_counts_packing_multiples():
    """Three 100-token rows fit 320 tokens packed, but not once each is padded to 128 (SP/FP8)."""
    assert token_micro_batches([0, 1, 2], [100] * 3, 320, packed=True) == [[0, 1, 2]]
    padded = CostModel(sequence_multiple=128)
    assert token_micro_batches([0, 1, 2], [100] * 3, 320, packed=True, cost=padded) == [[0, 1], [2]]
    # the row's tail: 2 x 100 = 200 rounds up to 256 under a 128 row multiple
    assert token_micro_batches([0, 1], [100] * 2, 255, packed=True, cost=CostModel(row_multiple=128)) == [[0], [1]]
    assert micro_batch_tokens([100, 100], True, CostModel(row_multiple=128)) == 256


def test_small_batches_still_give_every_rank_work():
    for packed in (False, True):
        ranks = rank_micro_batches([0, 1, 2, 3], [10, 10, 10, 10], 3, max_tokens=1000, packed=packed)
        assert all(ranks) and sorted(r for micro in ranks for mb in micro for r in mb) == [0, 1, 2, 3]


def test_ranks_are_balanced_by_tokens_deterministically():
    costs = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 5, 5]
    ranks = balance_over_ranks(costs, 3)
    assert sorted(i for r in ranks for i in r) == list(range(len(costs)))
    loads = [sum(costs[i] for i in r) for r in ranks]
    assert max(loads) - min(loads) <= 5
    assert ranks == balance_over_ranks(costs, 3)


def test_exchanges_mend_what_longest_first_misses():
    # longest first: [3, 2, 2] and [3, 2] (7 and 5); swapping a 3 for a 2 gives 6 and 6
    costs = [3, 3, 2, 2, 2]
    ranks = balance_over_ranks(costs, 2)
    assert sorted(i for r in ranks for i in r) == [0, 1, 2, 3, 4]
    assert [sum(costs[i] for i in r) for r in ranks] == [6, 6]


@pytest.mark.parametrize("regime", ["r1-8k", "near-uniform"])
def test_padded_rows_keep_little_padding_and_balance_compute(regime):
    """Right-padded rows (no TE) at DP 32: micro-batches of neighbours in length win (padding
    efficiency >= 0.99); moving and swapping them (R1-like: longest first alone leaves 1.04)
    and splitting them (near-uniform: ~5 near-identical micro-batches per rank, 1.03 unsplit)
    balance the ranks to within 2% in FLOPs."""
    lengths, groups = step_lengths(regime, 0)
    cost = qwen_1p5b_cost()
    for start in range(0, len(groups), 64):
        rows = [r for g in groups[start: start + 64] for r in g]
        ranks = rank_micro_batches(rows, lengths, 32, 18432, packed=False, cost=cost)
        figures = mini_batch_figures(ranks, lengths, False, cost)
        assert figures["real"] / figures["held"] >= 0.99 and figures["flop_imbalance"] <= 1.02, figures


def test_every_rank_sees_the_same_mini_batches_and_together_all_rows():
    lengths = [3 + (i * 37) % 60 for i in range(24)]
    groups = [list(range(g * 6, g * 6 + 6)) for g in range(4)]
    plans = [training_plan(groups, 2, 3, r, 4, lengths, max_tokens=80) for r in range(3)]
    for m in range(2):
        assert all(p[m].rows == plans[0][m].rows for p in plans)
        assert sorted(r for p in plans for mb in p[m].micro for r in mb) == sorted(plans[0][m].rows)
    with pytest.raises(ValueError, match="length"):
        training_plan(groups, 2, 3, 0, 4, None, max_tokens=80)


def test_cost_model_from_the_shape_of_the_1p5b_model():
    dims = model_dims(SimpleNamespace(**QWEN2_1P5B))
    cost = cost_model(dims)
    per_layer = 1536 * 128 * (12 + 2 * 2) + 12 * 128 * 1536 + 3 * 1536 * 8960  # qkv, projection, gate/up/down
    assert cost.linear == 2 * (28 * per_layer + 151936 * 1536)  # 2 FLOPs per weight and token, + output layer
    assert cost.quadratic == 2 * 28 * 12 * 128  # causal QK^T and AV: L^2 / 2 each, 2 FLOPs per multiply-add
    assert round(cost.linear / cost.quadratic) == 35890  # attention adds L / 36k to a token's cost
    assert cost.sequence_cost(16384) == 16384 + 7479  # in token equivalents: 16384^2 / 35890 = 7479.4
    config = SimpleNamespace(tensor_model_parallel_size=2, sequence_parallel=True, fp8="e4m3", fp8_recipe="delayed")
    assert (cost_model(dims, config).sequence_multiple, cost_model(dims, config).row_multiple) == (2, 32)


def test_ranks_are_balanced_in_compute_not_tokens():
    """One 16k row, two 8k rows and sixteen 1k rows over 2 ranks: equal tokens (24k each) leave
    the rank with the 16k row ~10% more compute under the 1.5B model; the cost model evens it."""
    lengths = [16000, 8000, 8000] + [1000] * 16
    cost = cost_model(model_dims(SimpleNamespace(**QWEN2_1P5B)))

    def loads(plan_cost):
        ranks = rank_micro_batches(list(range(19)), lengths, 2, 18432, packed=True, cost=plan_cost)
        return ([sum(lengths[r] for mb in micro for r in mb) for micro in ranks],
                [sum(micro_batch_cost([lengths[r] for r in mb], True, cost) for mb in micro) for micro in ranks])

    tokens, flops = loads(CostModel())
    assert tokens == [24000, 24000] and max(flops) / min(flops) > 1.08
    tokens, flops = loads(cost)
    assert max(flops) / min(flops) < 1.02 and max(tokens) - min(tokens) >= 4000


def random_lengths(rng: random.Random, n: int) -> list[int]:
    """``n`` row lengths from one of several regimes, near-uniform and all-equal among them."""
    cap = rng.choice([2048, 9216, 17408])
    regime = rng.choice(["lognormal", "near-uniform", "bimodal", "capped", "equal", "short"])
    if regime == "lognormal":
        median, sigma = rng.uniform(100, cap), rng.uniform(0.1, 1.5)
        values = [median * math.exp(sigma * rng.gauss(0, 1)) for _ in range(n)]
    elif regime == "near-uniform":
        low = rng.uniform(1, cap)
        high = low * rng.uniform(1, 1.6)
        values = [rng.uniform(low, high) for _ in range(n)]
    elif regime == "bimodal":
        short, long = rng.uniform(50, cap / 4), rng.uniform(cap / 2, cap)
        values = [rng.gauss(short, short / 5) if rng.random() < 0.5 else rng.gauss(long, long / 20) for _ in range(n)]
    elif regime == "capped":
        values = [cap if rng.random() < 0.4 else rng.uniform(1, cap) for _ in range(n)]
    elif regime == "equal":
        values = [rng.randint(1, cap)] * n
    else:
        values = [rng.randint(1, 50) for _ in range(n)]
    return [max(1, min(cap, int(v))) for v in values]


def test_random_plans_keep_every_invariant_and_the_imbalance_bounds():
    """Random lengths (near-uniform and equal among them), DP sizes, budgets, cost models and
    packing multiples: every row once, ranks agree, the budget kept once padded (forward's
    ``packed_tokens``), every rank busy. Packed, rows are balanced by their costs ``c_1 >= c_2
    >= ...``: the slowest rank is within Graham's bound, ``max(c_1, mean + (1 - 1/dp) c_{dp+1})``,
    and with 16 rows or more per rank within 3% of a lower bound on any plan's slowest rank
    (the mean, and ``(k + 1) c_{k dp + 1}``: some rank holds k + 1 of the ``k dp + 1`` costliest);
    4,000 such random cases, run while writing this test, came to 2.1% at worst."""
    rng = random.Random(23)
    layouts = [(1, False, None), (2, True, None), (1, False, "e4m3"), (4, True, "e4m3")]
    for case in range(120):
        dp = rng.choice([1, 2, 3, 4, 7, 8, 16, 32])
        rows = dp * rng.choice([1, 2, 4, 16, 32]) + rng.randint(0, dp)
        lengths = random_lengths(rng, rows)
        tp, sp, fp8 = rng.choice(layouts)
        config = SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=sp, fp8=fp8, fp8_recipe="delayed")
        cost = CostModel(1.0, rng.choice([0.0, 1 / 35890, 1 / 3000]), *packing_multiples(config))
        budget = int(max(lengths) * rng.choice([0.9, 1.0, 2.0, 4.0]))
        groups = [list(range(i, min(i + 8, rows))) for i in range(0, rows, 8)]
        for packed in (True, False):
            ranks = rank_micro_batches(list(range(rows)), lengths, dp, budget, packed, cost)
            where = f"case {case}: dp {dp}, {rows} rows, packed {packed}"
            for k in {0, rng.randrange(dp), dp - 1}:  # what each rank plans for itself is its part of the whole
                assert training_plan(groups, len(groups), dp, k, 1, lengths, budget, packed, cost)[0].micro == ranks[k]
            assert sorted(r for micro in ranks for mb in micro for r in mb) == list(range(rows)), where
            assert all(ranks), where  # at least dp rows: no rank idle
            for mb in (mb for micro in ranks for mb in micro if len(mb) > 1):
                rows_of = [lengths[r] for r in mb]
                assert (packed_tokens(rows_of, config) if packed else len(mb) * max(rows_of)) <= budget, where
            if not packed:
                continue
            costs = {r: cost.sequence_cost(n) for r, n in enumerate(padded_lengths(lengths, cost.sequence_multiple))}
            loads = [sum(costs[r] for mb in micro for r in mb) for micro in ranks]
            if cost.row_multiple == 1:  # packed cost is additive: a rank's micro-batches cost what its rows do
                assert loads == [sum(micro_batch_cost([lengths[r] for r in mb], True, cost) for mb in micro)
                                 for micro in ranks], where
            c = sorted(costs.values(), reverse=True) + [0]
            assert dp * max(loads) <= max(dp * c[0], sum(c) + (dp - 1) * c[min(dp, rows)]), where
            if rows >= 16 * dp:
                lower = max([sum(c) / dp] + [(k + 1) * c[k * dp] for k in range(rows // dp + 1) if k * dp < rows])
                assert max(loads) <= 1.03 * lower, (where, max(loads) / lower)


def test_plan_targets_on_four_length_regimes():
    """bench/batching.py plan, packed as the recipe trains, on the four regimes (R1-like 8k,
    16k with a heavy cap, bimodal, near-uniform) at DP 8 and 32: every mini-batch's slowest rank
    within 2% of the mean in FLOPs (issue 23; balanced by tokens, issue 13's plan left up to 1.058)."""
    out = procs.run([sys.executable, "bench/batching.py", "plan", "--json", "--modes", "packed", "--dp", "8", "32",
                     "--steps", "3", "--repeats", "1"], env=env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    table = json.loads(out.stdout.strip().splitlines()[-1])["table"]
    assert {(row["regime"], row["dp"]) for row in table} == {(r, dp) for r in REGIMES for dp in (8, 32)}
    for row in table:
        assert row["efficiency"] == 1.0 and row["flop_imbalance_max"] <= 1.02, row


def test_token_plan_trains_on_the_same_loss_and_gradients(tmp_path):
    hf_dir = make_tiny_hf("qwen2_tied", tmp_path / "hf", num_layers=2)
    out = procs.run(procs.torchrun_command(2, "tests/train/token_plan_worker.py", hf_dir), env=env(), timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, (out.stdout + out.stderr)[-6000:]
    print(out.stdout)
