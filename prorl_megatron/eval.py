"""Pass@k per domain on held-out prompts, with vLLM: the "reasoning boundary" monitor.

For every prompt, ``n`` samples are drawn and verified; pass@k is the unbiased estimator
(Chen et al., 2021) averaged over prompts, per domain and overall. The trainer calls
:func:`evaluate` every ``eval.every_n_steps`` steps; standalone, it evaluates a Megatron
checkpoint (``prorl_meta.json``: a converted model or a training checkpoint) or a Hugging
Face directory::

    torchrun --nproc_per_node 2 -m prorl_megatron.eval --recipe recipes/tiny_cpu.yaml \\
        --checkpoint runs/tiny-cpu/checkpoints/step_00000060 [--out results.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from prorl_megatron.algo.sampling import pass_at_k
from prorl_megatron.data.chat import EncodedPrompt
from prorl_megatron.rewards.pool import RewardPool
from prorl_megatron.rollout.stream import score_rollouts
from prorl_megatron.seeds import eval_base_seed

log = logging.getLogger(__name__)


def pass_at_k_table(domains: list[str], rewards: list[list[float]], ks: list[int]) -> dict[str, float]:
    """``{"pass@k": ..., "<domain>/pass@k": ..., "reward": ...}`` from per-prompt rewards."""
    by_domain: dict[str, list[list[float]]] = defaultdict(list)
    for domain, r in zip(domains, rewards):
        by_domain[domain].append(r)
    out: dict[str, float] = {}
    for name, groups in [("", [r for rs in by_domain.values() for r in rs]),
                         *((f"{d}/", g) for d, g in sorted(by_domain.items()))]:
        if not groups:
            continue
        for k in ks:
            out[f"{name}pass@{k}"] = sum(pass_at_k(len(r), sum(x > 0.5 for x in r), k) for r in groups) / len(groups)
        out[f"{name}reward"] = sum(sum(r) / len(r) for r in groups) / len(groups)
    return out


def evaluate(engine: Any, pool: RewardPool, prompts: list[EncodedPrompt], recipe: Any,
             per_prompt: bool = False) -> dict[str, Any]:
    """Pass@k of the engine's current weights on ``prompts`` (collective over the world).

    ``recipe.eval`` gives n, ks, the temperature and top-p; responses get
    ``rollout.max_response_tokens``; sampling is seeded from ``recipe.seed`` by
    :func:`~prorl_megatron.seeds.eval_base_seed` (the same seeds at every evaluation,
    in training and standalone alike, none shared with training rollouts). With
    ``per_prompt``, the table also holds ``"per_prompt"``: ``{"id", "domain", "n", "correct"}``
    per prompt, in order (what confidence intervals over prompts are computed from).
    """
    cfg = recipe.eval
    rollouts = engine.generate_global([p.ids for p in prompts],
                                      seed=eval_base_seed(recipe.seed, len(prompts), cfg.n_samples),
                                      n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                      max_tokens=recipe.rollout.max_response_tokens)
    rewards = score_rollouts(pool, prompts, rollouts)
    table = pass_at_k_table([p.row.domain for p in prompts], rewards, cfg.ks)
    lengths = [len(r.response_ids) for samples in rollouts for r in samples]
    table["response_length"] = sum(lengths) / max(len(lengths), 1)
    if per_prompt:
        table["per_prompt"] = [{"id": p.row.id, "domain": p.row.domain, "n": len(r), "correct": sum(x > 0.5 for x in r)}
                               for p, r in zip(prompts, rewards)]
    return table


def main(argv: list[str] | None = None) -> int:
    from prorl_megatron import run_log
    from prorl_megatron.checkpoint.dist_ckpt import read_meta
    from prorl_megatron.config import ConfigError, add_recipe_arguments, recipe_from_args
    from prorl_megatron.data.dataset import load_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="Megatron checkpoint or HF directory")
    parser.add_argument("--files", nargs="*", help="prompt files (default: the recipe's data.val_files)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--per-prompt", action="store_true",
                        help="with --out: also each prompt's sample and correct counts")
    parser.add_argument("--stage", help="a staged recipe's stage to evaluate in (its name or index); default: the "
                                        "stage the training checkpoint was written in, as the trainer's validation")
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    loop = None
    if (checkpoint / "prorl_meta.json").is_file():
        loop = read_meta(checkpoint).get("loop")
    elif not (checkpoint / "config.json").is_file():
        raise SystemExit(f"{checkpoint}: neither a Megatron checkpoint (prorl_meta.json) nor a HF directory")
    try:
        recipe = evaluation_recipe(recipe_from_args(args), tuple(args.overrides), loop, args.stage)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    files = args.files or recipe.data.val_files
    if not files:
        parser.error("no prompts: pass --files or set data.val_files")
    rows = load_rows(files, recipe.data.on_bad_row).rows
    # library notices and every rank's log go to {logging.dir}/eval.log (see run_log)
    with run_log.routed(recipe.logging.dir, name="eval.log"):
        table = evaluate_checkpoint(checkpoint, rows, recipe, per_prompt=args.per_prompt)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in table.items() if k != "per_prompt"}, indent=2, sort_keys=True))
        if args.out:
            Path(args.out).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


def evaluation_recipe(recipe: Any, overrides: tuple[str, ...], loop: Any, stage: str | None) -> Any:
    """The recipe to evaluate a checkpoint with: for a staged recipe, the stage ``stage`` names
    (a name or an index), else the stage the training checkpoint's loop state ``loop`` is in
    (stage 0 for a converted model), the command line's ``overrides`` on top."""
    from prorl_megatron.config import ConfigError
    from prorl_megatron.stages import recipe_in_stage, saved_stage

    if stage is None:
        index, name = saved_stage(loop, recipe)
        said = "the checkpoint was written in"
    else:
        names = [s.name for s in recipe.stages]
        index = int(stage) if stage.isdigit() else names.index(stage) if stage in names else -1
        if not 0 <= index < max(len(names), 1):
            raise ConfigError(f"--stage {stage}: no such stage; this recipe's stages are {names}")
        name, said = (names[index] if names else ""), "--stage asks for"
    staged = recipe_in_stage(recipe, overrides, index, name, said)
    if index:
        log.info("evaluating in stage %d %r", index, name)
    return staged


def checkpoint_hf_dir(checkpoint: Path) -> Path:
    """The HF directory (config and tokenizer) of ``checkpoint``: a Megatron checkpoint's ``hf/``, or the
    checkpoint itself when it is a HF directory."""
    from prorl_megatron.checkpoint.dist_ckpt import hf_config_dir

    return hf_config_dir(checkpoint) if (checkpoint / "prorl_meta.json").is_file() else checkpoint


def load_checkpoint_engine(checkpoint: Path, recipe: Any) -> Any:
    """A :class:`~prorl_megatron.rollout.engine.RolloutEngine` built from ``recipe.rollout`` holding the weights
    of ``checkpoint`` (a Megatron checkpoint, synced from a Megatron model, or a HF directory; collective)."""
    from prorl_megatron.checkpoint.dist_ckpt import load_model
    from prorl_megatron.parallel import init_parallel
    from prorl_megatron.rollout.engine import RolloutEngine

    megatron_ckpt = (checkpoint / "prorl_meta.json").is_file()
    hf_dir = str(checkpoint_hf_dir(checkpoint))
    init_parallel(recipe.parallel.tensor, recipe.parallel.pipeline, seed=recipe.seed)
    engine = RolloutEngine(hf_dir, recipe.rollout, recipe.precision, recipe.seed, load_weights=not megatron_ckpt)
    if megatron_ckpt:
        from prorl_megatron.models.architectures import model_dims, read_hf_config
        from prorl_megatron.models.gpt import build_gpt_model
        from prorl_megatron.rollout.weight_sync import sync_weights

        dims = model_dims(read_hf_config(hf_dir))
        model = build_gpt_model(dims, recipe.precision, perform_initialization=False)
        load_model(model, checkpoint)
        sync_weights(model, dims, engine, recipe.precision.params_dtype, recipe.rollout.sync_bucket_mib << 20)
    return engine


def evaluate_checkpoint(checkpoint: Path, rows: list[Any], recipe: Any, per_prompt: bool = False) -> dict[str, Any]:
    """:func:`evaluate` on ``rows`` with the weights of ``checkpoint`` (Megatron or HF; collective)."""
    from transformers import AutoTokenizer

    from prorl_megatron.data.chat import encode
    from prorl_megatron.rewards.pool import pool_settings

    engine = load_checkpoint_engine(checkpoint, recipe)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_hf_dir(checkpoint)),
                                              trust_remote_code=recipe.model.trust_remote_code)
    prompts = [encode(r, tokenizer, recipe.data.apply_chat_template) for r in rows]
    with RewardPool(recipe.rewards.workers, pool_settings(recipe.rewards),
                    code=any(p.row.domain == "code" for p in prompts)) as pool:
        return evaluate(engine, pool, prompts, recipe, per_prompt=per_prompt)


if __name__ == "__main__":
    sys.exit(main())
