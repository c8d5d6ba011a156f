"""Plain-loop reference implementations, written from the specs, to test the vectorised code."""

from __future__ import annotations

import math


def groups_of(group_ids: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        out.setdefault(g, []).append(i)
    return out


def grpo(rewards: list[float], group_ids: list[int], eps: float, scale_by_std: bool) -> list[float]:
    out = [0.0] * len(rewards)
    for members in groups_of(group_ids).values():
        if len(members) == 1:
            continue
        vals = [rewards[i] for i in members]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in members:
            out[i] = (rewards[i] - mean) / (std + eps) if scale_by_std else rewards[i] - mean
    return out


def rloo(rewards: list[float], group_ids: list[int]) -> list[float]:
    out = list(rewards)
    for members in groups_of(group_ids).values():
        if len(members) == 1:
            continue
        for i in members:
            others = [rewards[j] for j in members if j != i]
            out[i] = rewards[i] - sum(others) / len(others)
    return out


def reinforce_pp(rewards, group_ids, mask, eps):
    n, t = len(mask), len(mask[0])
    centered = [0.0] * n
    for members in groups_of(group_ids).values():
        mean = sum(rewards[i] for i in members) / len(members) if len(members) > 1 else 0.0
        for i in members:
            centered[i] = rewards[i] - mean
    valid = [(i, j) for i in range(n) for j in range(t) if mask[i][j]]
    out = [[0.0] * t for _ in range(n)]
    if not valid:
        return out
    xs = [centered[i] for i, _ in valid]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    for i, j in valid:
        out[i][j] = (centered[i] - mean) / math.sqrt(var + eps)
    return out


def kl(logp: float, ref: float, estimator: str) -> float:
    if estimator == "k1":
        return logp - ref
    if estimator == "abs":
        return abs(logp - ref)
    if estimator == "k2":
        return 0.5 * (logp - ref) ** 2
    d = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(d) - d - 1.0, -10.0), 10.0)


def aggregate(values, mask, mode):
    n, t = len(values), len(values[0]) if values else 0
    if mode in ("token-mean", "token-sum"):
        s = sum(values[i][j] * mask[i][j] for i in range(n) for j in range(t))
        c = sum(mask[i][j] for i in range(n) for j in range(t))
        if mode == "token-sum":
            return s
        return s / c if c > 0 else 0.0
    per_seq = []
    for i in range(n):
        c = sum(mask[i])
        if c == 0:
            continue
        s = sum(values[i][j] * mask[i][j] for j in range(t))
        per_seq.append(s / c if mode == "seq-mean-token-mean" else s)
    if not per_seq:
        return 0.0
    result = sum(per_seq) / len(per_seq)
    return result / t if mode == "seq-mean-token-sum-norm" else result


def policy_token_loss(logp, old, adv, eps_low, eps_high, dual_clip_c):
    ratio = math.exp(min(max(logp - old, -20.0), 20.0))
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - eps_low), 1 + eps_high))
    if dual_clip_c is not None and adv < 0:
        loss = min(loss, -adv * dual_clip_c)
    return loss


def binomial_pass_at_k(n: int, c: int, k: int) -> float:
    from fractions import Fraction

    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))
