"""One process (world of 1): the finite-gradient guard, the optimizer reset and a checkpoint round trip.

    python tests/train/optimizer_worker.py HF_DIR OUT_DIR
"""

from __future__ import annotations

import sys

import torch

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


def check(ok: bool, message: str) -> None:
    if not ok:
        sys.exit(f"FAIL: {message}")


def build(hf_dir, dims, precision, train):
    policy, ddp = build_policy(dims, precision)
    load_hf_weights(policy, HFReader(hf_dir).get, dims)
    reference, _ = build_reference(dims, precision)
    copy_weights(policy, reference)
    return policy, ddp, reference, build_optimizer(ddp, train, precision)


def backward(ddp, optimizer, dims, poison: bool = False):
    zero_grads(ddp, optimizer)
    ids = torch.tensor([[3, 17, 42, 5, 9, 11]])
    run_microbatches(ddp, [MicroBatch(ids)], vocab_size=dims.vocab_size, loss_fn=lambda lp, b: (-lp.mean(), {}))
    finalize_grads(ddp)
    if poison:
        next(p for p in ddp.parameters()).main_grad.fill_(float("nan"))


def flat(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def main() -> None:
    hf_dir, out_dir, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    init_parallel(1, 1, seed=0)
    dims = model_dims(read_hf_config(hf_dir))
    precision, train = PrecisionConfig(params_dtype=dtype), TrainConfig(lr=1e-3)
    policy, ddp, reference, optimizer = build(hf_dir, dims, precision, train)

    before = flat(policy)
    backward(ddp, optimizer, dims, poison=True)
    stepped, norm = optimizer_step(optimizer)
    check(not stepped and norm != norm or norm == float("inf"), f"NaN gradients were stepped (norm {norm})")
    check(torch.equal(before, flat(policy)), "a skipped update changed the weights")
    check(optimizer_state_is_empty(optimizer), "a skipped update created optimizer state")

    for _ in range(2):
        backward(ddp, optimizer, dims)
        stepped, norm = optimizer_step(optimizer)
        check(stepped and norm > 0, f"a finite update was not applied (norm {norm})")
    check(not torch.equal(before, flat(policy)), "the update did not change the weights")
    check(not optimizer_state_is_empty(optimizer), "Adam has no state after two steps")

    # a checkpoint round trip restores weights, reference and every Adam moment exactly
    save_checkpoint(f"{out_dir}/ckpt", 2, policy, reference, optimizer, hf_dir, {"note": "x"}, False, keep_last=2)
    policy2, ddp2, reference2, optimizer2 = build(hf_dir, dims, precision, train)
    meta = load_checkpoint(f"{out_dir}/ckpt/step_00000002", policy2, reference2, optimizer2)
    check(meta["step"] == 2 and meta["loop"] == {"note": "x"}, f"meta {meta}")
    check(torch.equal(flat(policy), flat(policy2)) and torch.equal(flat(reference), flat(reference2)), "weights")
    states = [o.optimizer.state for o in optimizer.chained_optimizers]
    states2 = [o.optimizer.state for o in optimizer2.chained_optimizers]
    for s1, s2 in zip(states, states2):
        check(len(s1) == len(s2) > 0, "optimizer state entries differ")
        for v1, v2 in zip(s1.values(), s2.values()):
            for key in ("exp_avg", "exp_avg_sq"):
                check(torch.equal(v1[key], v2[key]), f"{key} not restored exactly")
            check(float(v1["step"]) == float(v2["step"]), "Adam step count not restored")
    # ... and both continue identically
    for opt, d in ((optimizer, ddp), (optimizer2, ddp2)):
        backward(d, opt, dims)
        optimizer_step(opt)
    check(torch.equal(flat(policy), flat(policy2)), "a resumed optimizer steps differently")

    # the reset: reference <- policy, Adam forgets its moments (the next step is a first step again)
    copy_weights(policy, reference)
    check(torch.equal(flat(policy), flat(reference)), "reset did not copy the policy")
    reset_optimizer_state(optimizer)
    check(optimizer_state_is_empty(optimizer), "reset left optimizer state")
    backward(ddp, optimizer, dims)
    stepped, _ = optimizer_step(optimizer)
    first_steps = [float(v["step"]) for o in optimizer.chained_optimizers for v in o.optimizer.state.values()]
    check(stepped and set(first_steps) == {1.0}, f"after a reset Adam's step counts are {set(first_steps)}")
    print("OK", dtype)


if __name__ == "__main__":
    main()
