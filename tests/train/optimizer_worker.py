"""One process (world of 1): the finite-gradient guard, the optimizer reset and checkpoint round trips.

    python tests/train/optimizer_worker.py HF_DIR OUT_DIR DTYPE torch|group-step

``group-step``: megatron builds its optimizer from :class:`GroupStepAdam`, which keeps Adam's
step count in each param group as apex's and Transformer Engine's FusedAdam do (what megatron
picks on a GPU image; neither can be installed on a CPU machine).
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
    optimizer_step, reset_optimizer_state, still_calibrating, zero_grads,
)
from prorl_megatron.parallel import init_parallel


class GroupStepAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam's update in plain torch (apex/optimizers/fused_adam.py and its
    multi_tensor_adam kernel): the step count is ``group["step"]``, created on the first step;
    ``adam_w_mode`` decouples the weight decay."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True,
                 bias_correction=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction))
        self.adam_w_mode = adam_w_mode

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group["step"] + 1 if "step" in group else 1
            (b1, b2), t, decay = group["betas"], group["step"], group["weight_decay"]
            bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if group["bias_correction"] else (1.0, 1.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                g = p.grad.float() if self.adam_w_mode else p.grad.float() + decay * p.float()
                state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (state["exp_avg"] / bc1) / ((state["exp_avg_sq"] / bc2).sqrt() + group["eps"])
                if self.adam_w_mode:
                    update += decay * p.float()
                p.add_(update.to(p.dtype), alpha=-group["lr"])


def check(ok: bool, message: str) -> None:
    if not ok:
        sys.exit(f"FAIL: {message}")


def build(hf_dir, dims, precision, train):
    policy, ddp = build_policy(dims, precision)
    load_hf_weights(policy, HFReader(hf_dir).get, dims)
    reference, _ = build_reference(dims, precision)
    copy_weights(policy, reference)
    return policy, ddp, reference, build_optimizer(ddp, train, precision)


def backward(ddp, optimizer, dims, poison: bool = False, tokens=(3, 17, 42, 5, 9, 11)):
    zero_grads(ddp, optimizer)
    run_microbatches(ddp, [MicroBatch(torch.tensor([tokens]))], vocab_size=dims.vocab_size,
                     loss_fn=lambda lp, b: (-lp.mean(), {}))
    finalize_grads(ddp)
    if poison:
        next(p for p in ddp.parameters()).main_grad.fill_(float("nan"))


def apply_update(ddp, optimizer, dims, tokens=(3, 17, 42, 5, 9, 11)) -> float:
    """Backward and a step that is applied; fp16's skips while its loss scale calibrates are retried."""
    for _ in range(64):
        backward(ddp, optimizer, dims, tokens=tokens)
        stepped, norm = optimizer_step(optimizer)
        if stepped:
            check(norm > 0, f"an applied update has grad norm {norm}")
            return norm
        check(still_calibrating(optimizer), f"a finite update was skipped (norm {norm})")
    raise SystemExit("FAIL: the fp16 loss scale never settled")


def flat(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def main_params(optimizer) -> list[torch.Tensor]:
    """What the inner optimizer updates: the fp32 main weights (bf16/fp16) or the parameters."""
    return [p for o in optimizer.chained_optimizers for g in o.optimizer.param_groups for p in g["params"]]


def adam_steps(optimizer) -> set[float]:
    inner = [o.optimizer for o in optimizer.chained_optimizers]
    return ({float(v["step"]) for o in inner for v in o.state.values() if "step" in v}
            | {float(g["step"]) for o in inner for g in o.param_groups if "step" in g})


def same_as_fresh_after_reset(hf_dir, dims, precision, train, policy, ddp, optimizer) -> None:
    """After a reset, the next update equals a freshly built optimizer's first update from the same
    weights (fp32 main weights included) and gradients."""
    policy2, ddp2, _, fresh = build(hf_dir, dims, precision, train)
    copy_weights(policy, policy2)
    with torch.no_grad():
        for mine, theirs in zip(main_params(optimizer), main_params(fresh)):
            theirs.copy_(mine)
    for opt, d in ((optimizer, ddp), (fresh, ddp2)):
        apply_update(d, opt, dims, tokens=(8, 1, 60, 2, 33))
    check(adam_steps(optimizer) == adam_steps(fresh) == {1.0}, f"steps after a reset {adam_steps(optimizer)}")
    for mine, theirs in zip(main_params(optimizer), main_params(fresh)):
        check(torch.equal(mine, theirs), "the update after a reset differs from a fresh optimizer's first "
                                         f"(by up to {float((mine - theirs).abs().max()):.3g})")


def main() -> None:
    hf_dir, out_dir, dtype, adam = sys.argv[1:5]
    init_parallel(1, 1, seed=0)
    if adam == "group-step":
        import megatron.core.optimizer as megatron_optimizer

        megatron_optimizer.Adam, megatron_optimizer.USING_PYTORCH_OPTIMIZER = GroupStepAdam, False
    dims = model_dims(read_hf_config(hf_dir))
    precision, train = PrecisionConfig(params_dtype=dtype), TrainConfig(lr=1e-3)
    policy, ddp, reference, optimizer = build(hf_dir, dims, precision, train)
    check(type(optimizer.chained_optimizers[0].optimizer).__name__ == ("GroupStepAdam" if adam == "group-step"
                                                                       else "AdamW"), "optimizer class")

    before = flat(policy)
    backward(ddp, optimizer, dims, poison=True)
    stepped, norm = optimizer_step(optimizer)
    check(not stepped and norm != norm or norm == float("inf"), f"NaN gradients were stepped (norm {norm})")
    check(torch.equal(before, flat(policy)), "a skipped update changed the weights")
    check(optimizer_state_is_empty(optimizer), "a skipped update created optimizer state")

    mains = [p.detach().clone() for p in main_params(optimizer)]
    scaler = getattr(optimizer.chained_optimizers[0], "grad_scaler", None)
    apply_update(ddp, optimizer, dims)
    if dtype == "float16":  # the loss scaler saw this update once, and the grads were unscaled once:
        check(scaler._growth_tracker == 1, f"the loss scaler counted {scaler._growth_tracker} updates for one")
    # Adam's first step moves every weight with a gradient by about lr (|m / sqrt(v)| = 1)
    moved = torch.cat([(p.detach() - m).abs().flatten() for p, m in zip(main_params(optimizer), mains)])
    check(float(moved.median()) > 0.5 * train.lr, f"the first update moved weights by {float(moved.median()):.3g}"
                                                   f", not ~lr {train.lr}")
    apply_update(ddp, optimizer, dims)
    check(not torch.equal(before, flat(policy)), "the update did not change the weights")
    check(not optimizer_state_is_empty(optimizer), "Adam has no state after two steps")

    # a checkpoint round trip restores weights, reference, main weights and every Adam moment exactly
    save_checkpoint(f"{out_dir}/ckpt", 2, policy, reference, optimizer, hf_dir, {"note": "x"}, False, keep_last=3)
    policy2, ddp2, reference2, optimizer2 = build(hf_dir, dims, precision, train)
    meta = load_checkpoint(f"{out_dir}/ckpt/step_00000002", policy2, reference2, optimizer2)
    check(meta["step"] == 2 and meta["loop"] == {"note": "x"}, f"meta {meta}")
    check(torch.equal(flat(policy), flat(policy2)) and torch.equal(flat(reference), flat(reference2)), "weights")
    check(all(torch.equal(a, b) for a, b in zip(main_params(optimizer), main_params(optimizer2))), "main weights")
    states = [o.optimizer.state for o in optimizer.chained_optimizers]
    states2 = [o.optimizer.state for o in optimizer2.chained_optimizers]
    for s1, s2 in zip(states, states2):
        check(len(s1) == len(s2) > 0, "optimizer state entries differ")
        for v1, v2 in zip(s1.values(), s2.values()):
            for key in ("exp_avg", "exp_avg_sq"):
                check(torch.equal(v1[key], v2[key]), f"{key} not restored exactly")
    check(adam_steps(optimizer) == adam_steps(optimizer2) == {2.0}, "Adam step count not restored")
    # ... and both continue identically
    for opt, d in ((optimizer, ddp), (optimizer2, ddp2)):
        apply_update(d, opt, dims)
    check(torch.equal(flat(policy), flat(policy2)), "a resumed optimizer steps differently")

    # the reset: reference <- policy, the optimizer is a fresh one again (moments and step counts)
    copy_weights(policy, reference)
    check(torch.equal(flat(policy), flat(reference)), "reset did not copy the policy")
    reset_optimizer_state(optimizer)
    check(optimizer_state_is_empty(optimizer) and not adam_steps(optimizer), "reset left optimizer state")

    # a checkpoint written right after the reset (no moments) keeps the fp32 main weights
    save_checkpoint(f"{out_dir}/ckpt", 4, policy, reference, optimizer, hf_dir, {}, True, keep_last=3)
    policy3, ddp3, reference3, optimizer3 = build(hf_dir, dims, precision, train)
    load_checkpoint(f"{out_dir}/ckpt/step_00000004", policy3, reference3, optimizer3)
    check(optimizer_state_is_empty(optimizer3), "a resumed reset optimizer has state")
    for mine, theirs in zip(main_params(optimizer), main_params(optimizer3)):
        check(torch.equal(mine, theirs), "resuming after a reset lost the main weights (by up to "
                                         f"{float((mine - theirs).abs().max()):.3g})")
    for opt, d in ((optimizer, ddp), (optimizer3, ddp3)):
        apply_update(d, opt, dims)
    check(torch.equal(flat(policy), flat(policy3)), "a run resumed right after a reset steps differently")

    reset_optimizer_state(optimizer)
    same_as_fresh_after_reset(hf_dir, dims, precision, train, policy, ddp, optimizer)
    print("OK", dtype, adam)


if __name__ == "__main__":
    main()
