"""megatron's DistributedOptimizer (``train.distributed_optimizer``) on CPU/gloo, bf16 parameters.

    torchrun --nproc_per_node 2 tests/train/dist_optimizer_worker.py HF_DIR OUT_DIR dp2
    python tests/train/dist_optimizer_worker.py HF_DIR OUT_DIR dp1       # after dp2
    torchrun --nproc_per_node 2 tests/train/dist_optimizer_worker.py HF_DIR OUT_DIR dp1to2  # after dp1

``dp2``: sharding and parity with the non-distributed optimizer, the non-finite skip, a DP2
checkpoint round trip, the reference reset, a checkpoint right after the reset. It leaves two
checkpoints (``ckpt/step_00000003`` with moments, ``ckpt/step_00000004`` just reset) and, in
``expect_*.pt``, the full (gathered) optimizer state each holds and the weights after the update
that follows it. ``dp1`` loads both at DP1 and saves one of its own (``ckpt1``); ``dp1to2``
loads that at DP2. Every comparison is exact (``torch.equal``): see :func:`update`.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from prorl_megatron.checkpoint.hf_io import HFReader
from prorl_megatron.checkpoint.train_state import load_checkpoint, save_checkpoint
from prorl_megatron.checkpoint.transfer import load_hf_weights
from prorl_megatron.config import PrecisionConfig, TrainConfig
from prorl_megatron.models.architectures import model_dims, read_hf_config
from prorl_megatron.models.forward import MicroBatch, run_microbatches
from prorl_megatron.models.policy import (
    build_optimizer, build_policy, build_reference, copy_weights, finalize_grads, optimizer_state_is_empty,
    optimizer_step, reset_optimizer_state, zero_grads,
)
from prorl_megatron.parallel import init_parallel
from tests.procs import report_rank

SHARED = (8, 1, 60, 2, 33, 7, 19)  # the same tokens on every rank: the global batch is the same at any DP


def check(ok: bool, message: str) -> None:
    if not ok:
        sys.exit(f"FAIL rank {dist.get_rank()}: {message}")


def build(hf_dir, dims, precision, train):
    policy, ddp = build_policy(dims, precision, train)
    load_hf_weights(policy, HFReader(hf_dir).get, dims)
    reference, _ = build_reference(dims, precision)
    copy_weights(policy, reference)
    return policy, ddp, reference, build_optimizer(ddp, train, precision)


def own_tokens() -> tuple[int, ...]:
    """Different data on each rank (the DP reduction matters)."""
    r = dist.get_rank()
    return tuple((7 * r + 13 * i + 3) % 200 for i in range(9))


def backward(ddp, optimizer, dims, tokens, poison=None) -> None:
    zero_grads(ddp, optimizer)
    run_microbatches(ddp, [MicroBatch(torch.tensor([tokens]))], vocab_size=dims.vocab_size,
                     loss_fn=lambda lp, b: (-lp.mean(), {}))
    if poison is not None:  # before the DP reduction: a non-finite gradient in this rank's data
        param, index = poison
        param.main_grad.view(-1)[index] = float("nan")
    finalize_grads(ddp)


def update(ddp, optimizer, dims, tokens) -> None:
    """One applied update. Everything compared in this worker is exact: Adam is elementwise, the
    DP reduction of two ranks is one addition either way (all-reduce or reduce-scatter), and the
    clipping is off (``clip_grad=0``: the global norm is a sum in another order when sharded)."""
    backward(ddp, optimizer, dims, tokens)
    stepped, norm = optimizer_step(optimizer)
    check(stepped and norm > 0, f"a finite update was not applied (norm {norm})")


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def names(ddp) -> dict:
    return {p: n for n, p in ddp.named_parameters()}


def dist_opt(optimizer):
    (opt,) = optimizer.chained_optimizers
    check(type(opt).__name__ == "DistributedOptimizer", f"optimizer is {type(opt).__name__}")
    return opt


def shards(optimizer, ddp) -> dict[str, tuple[int, int, dict[str, torch.Tensor]]]:
    """This rank's shard: {param name: (start, end, {"param": fp32 main, "exp_avg", ...})}."""
    opt, by_param = dist_opt(optimizer), names(ddp)
    out = {}
    for param in opt.model_param_gbuf_map:
        r = opt._get_model_param_range_map(param)["param"]
        out[by_param[param]] = (r.start, r.end, opt._get_main_param_and_optimizer_states(param))
    return out


def gathered(optimizer, ddp) -> dict[str, dict[str, torch.Tensor]]:
    """The full optimizer state (every rank's shard put together), by param name; step excluded."""
    mine = shards(optimizer, ddp)
    full = {}
    for param, name in names(ddp).items():
        keys = ("param", "exp_avg", "exp_avg_sq") if not optimizer_state_is_empty(optimizer) else ("param",)
        full[name] = {k: torch.zeros(param.numel(), dtype=torch.float32) for k in keys}
        if name in mine:
            start, end, tensors = mine[name]
            for k in keys:
                full[name][k][start:end] = tensors[k]
    for state in full.values():  # each element is owned by exactly one rank: the sum adds zeros
        for t in state.values():
            dist.all_reduce(t)
    return full


def adam_steps(optimizer) -> set[float]:
    return {float(v["step"]) for o in optimizer.chained_optimizers for v in o.optimizer.state.values()}


def same_state(a: dict, b: dict, what: str) -> None:
    check(a.keys() == b.keys(), f"{what}: parameters differ")
    for name in a:
        check(a[name].keys() == b[name].keys(), f"{what}: {name}: {sorted(a[name])} vs {sorted(b[name])}")
        for k in a[name]:
            check(torch.equal(a[name][k], b[name][k]), f"{what}: {name} {k} differs by up to "
                                                       f"{float((a[name][k] - b[name][k]).abs().max()):.3g}")


def check_sharded(optimizer, ddp) -> None:
    """Each rank holds main weights (and, after a step, moments) for its slice only; the slices
    partition the parameters."""
    total = sum(p.numel() for p in ddp.parameters())
    local = sum(p.numel() for g in dist_opt(optimizer).optimizer.param_groups for p in g["params"])
    covered = torch.tensor([local])
    dist.all_reduce(covered)
    check(int(covered) == total, f"the shards hold {int(covered)} elements of {total}")
    check(local <= total // dist.get_world_size() + 64, f"this rank holds {local} of {total} elements: not sharded")
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in dist_opt(optimizer).optimizer.state.values())
    check(moments in (0, 2 * local), f"Adam moments of {moments} elements for a shard of {local}")


def nondist_mains(optimizer, ddp) -> dict[str, torch.Tensor]:
    (opt,) = optimizer.chained_optimizers
    by_param = names(ddp)
    return {by_param[p]: m for g16, g32 in zip(opt.float16_groups, opt.fp32_from_float16_groups)
            for p, m in zip(g16, g32)}


def save(root, step, policy, reference, optimizer, hf_dir, empty):
    return save_checkpoint(root, step, policy, reference, optimizer, hf_dir, {"step": step}, empty, keep_last=5)


def dp2(hf_dir, out, dims, precision, train) -> None:
    policy, ddp, reference, optimizer = build(hf_dir, dims, precision, train)
    check_sharded(optimizer, ddp)
    n_policy, n_ddp, _, n_optimizer = build(hf_dir, dims, precision, replace(train, distributed_optimizer=False))

    # (a) the same updates as the non-distributed optimizer, holding only a shard
    for _ in range(2):
        for o, d in ((optimizer, ddp), (n_optimizer, n_ddp)):
            update(d, o, dims, own_tokens())
    check_sharded(optimizer, ddp)
    check(adam_steps(optimizer) == {2.0}, f"steps {adam_steps(optimizer)}")
    check(torch.equal(flat(policy), flat(n_policy)), "the distributed optimizer's weights differ from the plain one's")
    full = nondist_mains(n_optimizer, n_ddp)
    for name, (start, end, tensors) in shards(optimizer, ddp).items():
        check(torch.equal(tensors["param"], full[name].view(-1)[start:end]), f"{name}: fp32 main shard differs")

    # (d) a NaN in rank 1's data, in an element of rank 0's shard: both ranks skip, nothing changes
    owner0 = [None]
    if dist.get_rank() == 0:
        name, (start, _, _) = next(iter(shards(optimizer, ddp).items()))
        owner0 = [(name, start)]
    dist.broadcast_object_list(owner0, src=0)
    by_name = dict(ddp.named_parameters())
    poison = (by_name[owner0[0][0]], owner0[0][1]) if dist.get_rank() == 1 else None
    before, state_before = flat(policy), gathered(optimizer, ddp)
    backward(ddp, optimizer, dims, own_tokens(), poison=poison)
    stepped, norm = optimizer_step(optimizer)
    check(not stepped and not torch.isfinite(torch.tensor(norm)), f"a NaN gradient was stepped (norm {norm})")
    check(torch.equal(before, flat(policy)), "a skipped update changed the weights")
    same_state(state_before, gathered(optimizer, ddp), "after a skipped update")
    check(adam_steps(optimizer) == {2.0}, f"a skipped update counted a step: {adam_steps(optimizer)}")
    for o, d in ((optimizer, ddp), (n_optimizer, n_ddp)):  # ... and leaves nothing behind
        update(d, o, dims, own_tokens())
    check(torch.equal(flat(policy), flat(n_policy)), "after a skipped update the optimizers diverge")

    # (b) checkpoint at DP2; resumed, it continues exactly as the run that never stopped
    state3 = gathered(optimizer, ddp)
    save(f"{out}/ckpt", 3, policy, reference, optimizer, hf_dir, empty=False)
    update(ddp, optimizer, dims, SHARED)
    if dist.get_rank() == 0:
        torch.save({"state": state3, "steps": adam_steps(optimizer) - {1.0}, "after": flat(policy)},
                   f"{out}/expect_3.pt")
    policy2, ddp2, reference2, optimizer2 = build(hf_dir, dims, precision, train)
    meta = load_checkpoint(f"{out}/ckpt/step_00000003", policy2, reference2, optimizer2)
    check(meta["loop"] == {"step": 3}, f"meta {meta}")
    same_state(state3, gathered(optimizer2, ddp2), "resumed at DP2")
    check(adam_steps(optimizer2) == {3.0}, f"resumed steps {adam_steps(optimizer2)}")
    update(ddp2, optimizer2, dims, SHARED)
    check(torch.equal(flat(policy), flat(policy2)), "the run resumed at DP2 steps differently")

    # (c) + (e): the reference reset, and a checkpoint written right after it (no moments)
    copy_weights(policy, reference)
    reset_optimizer_state(optimizer)
    check(optimizer_state_is_empty(optimizer), "reset left optimizer state")
    state4 = gathered(optimizer, ddp)
    save(f"{out}/ckpt", 4, policy, reference, optimizer, hf_dir, empty=True)
    policy3, ddp3, reference3, optimizer3 = build(hf_dir, dims, precision, train)
    load_checkpoint(f"{out}/ckpt/step_00000004", policy3, reference3, optimizer3)
    check(optimizer_state_is_empty(optimizer3), "a resumed reset optimizer has state")
    same_state(state4, gathered(optimizer3, ddp3), "resumed right after a reset")
    check(torch.equal(flat(reference), flat(reference3)), "reference not restored")
    fresh_policy, fresh_ddp, _, fresh = build(hf_dir, dims, precision, train)  # from the same weights
    copy_weights(policy, fresh_policy)
    for (_, _, mine), (_, _, theirs) in zip(shards(optimizer, ddp).values(), shards(fresh, fresh_ddp).values()):
        with torch.no_grad():
            theirs["param"].copy_(mine["param"])
    for o, d in ((optimizer, ddp), (optimizer3, ddp3), (fresh, fresh_ddp)):
        update(d, o, dims, SHARED)
        check(adam_steps(o) == {1.0}, f"steps after a reset {adam_steps(o)}")
    state5 = gathered(optimizer, ddp)
    same_state(state5, gathered(fresh, fresh_ddp), "the update after a reset vs a fresh optimizer's first")
    same_state(state5, gathered(optimizer3, ddp3), "the update after resuming a reset vs the original")
    check(torch.equal(flat(policy), flat(fresh_policy)) and torch.equal(flat(policy), flat(policy3)),
          "weights after the update that follows a reset")
    if dist.get_rank() == 0:
        torch.save({"state": state4, "after": flat(policy)}, f"{out}/expect_4.pt")


def dp1(hf_dir, out, dims, precision, train) -> None:
    """A world of one loads the DP2 checkpoints, continues as DP2 did, and saves one for dp1to2."""
    expect = torch.load(f"{out}/expect_3.pt")
    policy, ddp, reference, optimizer = build(hf_dir, dims, precision, train)
    load_checkpoint(f"{out}/ckpt/step_00000003", policy, reference, optimizer)
    same_state(expect["state"], gathered(optimizer, ddp), "DP2 checkpoint loaded at DP1")
    check(adam_steps(optimizer) == {3.0}, f"steps {adam_steps(optimizer)}")
    update(ddp, optimizer, dims, SHARED)
    check(torch.equal(expect["after"], flat(policy)), "resumed at DP1, the update differs from DP2's")
    state = gathered(optimizer, ddp)
    save(f"{out}/ckpt1", 4, policy, reference, optimizer, hf_dir, empty=False)
    update(ddp, optimizer, dims, SHARED)
    torch.save({"state": state, "after": flat(policy)}, f"{out}/expect_dp1.pt")

    expect = torch.load(f"{out}/expect_4.pt")  # just reset, at DP2
    policy, ddp, reference, optimizer = build(hf_dir, dims, precision, train)
    load_checkpoint(f"{out}/ckpt/step_00000004", policy, reference, optimizer)
    check(optimizer_state_is_empty(optimizer), "a resumed reset optimizer has state")
    same_state(expect["state"], gathered(optimizer, ddp), "reset DP2 checkpoint loaded at DP1")
    update(ddp, optimizer, dims, SHARED)
    check(torch.equal(expect["after"], flat(policy)), "resumed at DP1 after a reset, the update differs")


def dp1to2(hf_dir, out, dims, precision, train) -> None:
    expect = torch.load(f"{out}/expect_dp1.pt")
    policy, ddp, reference, optimizer = build(hf_dir, dims, precision, train)
    check_sharded(optimizer, ddp)
    load_checkpoint(f"{out}/ckpt1/step_00000004", policy, reference, optimizer)
    check_sharded(optimizer, ddp)
    same_state(expect["state"], gathered(optimizer, ddp), "DP1 checkpoint loaded at DP2")
    update(ddp, optimizer, dims, SHARED)
    check(torch.equal(expect["after"], flat(policy)), "resumed at DP2 from DP1, the update differs")


def main() -> None:
    hf_dir, out, mode = sys.argv[1:4]
    init_parallel(1, 1, seed=0)
    dims = model_dims(read_hf_config(hf_dir))
    precision = PrecisionConfig(params_dtype="bfloat16")
    train = TrainConfig(lr=1e-3, clip_grad=0.0, distributed_optimizer=True)
    {"dp2": dp2, "dp1": dp1, "dp1to2": dp1to2}[mode](hf_dir, out, dims, precision, train)
    report_rank(f"OK {mode}", dist.get_rank())  # one write: the ranks share the parent's stdout


if __name__ == "__main__":
    main()
