"""The tiny tasks' base models: a tiny Qwen2, warmed up on a task until it is sometimes right.

RL cannot start from a random model (every reward is 0, every group is dropped), so this
builds the starting point itself, reproducibly, in about a minute on 2 CPU cores: a
character tokenizer (digits, ``+``, ``=``, end of sequence), a 2-layer Qwen2 (hidden 128,
4 heads of 32 — vLLM's CPU attention needs head_dim >= 32) and a short supervised warm-up on
a task's prompts -> the sum zero-padded to one digit more than the operands (``0719``: every
digit has a fixed place, which a 2-layer model learns far faster; math-verify scores it equal
to ``719``) + end, stopped as soon as greedy exact-match accuracy on held-out prompts reaches
``--target``. The tasks (:data:`TASKS`): ``addition``, the demo's ``abc+def=``, and ``add4``,
the ablation study's ``abcd+efgh=`` (docs/results.md). Their RL prompts are made by
``tools/prepare_data.py addition`` from the same generator (``data/tiny/``).
The result is a normal Hugging Face directory.

    python -m prorl_megatron.demo.tiny_base --out runs/tiny-base/hf
    python -m prorl_megatron.demo.tiny_base --task add4 --target 0.05 --out runs/add4-base/hf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from prorl_megatron.data.sources import addition_rows

PAD, EOS = "<pad>", "<eos>"
SYMBOLS = list("0123456789+=")
VOCAB_SIZE = 64  # 14 tokens used; the rest are spare ids (vLLM pads to 64: each TP2 shard holds real rows)
WARM_UP_LR_STEPS = 100  # linear learning-rate warm-up
RECIPE_VERSION = 2  # bump when anything below changes what is built
# task -> digits per operand. With the default seed the warm-up trains on generator seed 1 and
# stops on seed 2; data/tiny/addition_{train,val}.jsonl are seeds 1 and 2, add4's are 201 and 202.
TASKS = {"addition": 3, "add4": 4}


def build_tokenizer(directory: Path):
    """A character-level fast tokenizer, saved in ``directory``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS] + SYMBOLS)}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), VOCAB_SIZE)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_model(seed: int):
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=1, pad_token_id=0,
        architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config)


def encode_examples(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt answer <eos>`` ids [N, S] and a loss mask on answer + eos tokens."""
    rows, masks = [], []
    for prompt, answer in pairs:
        p = tokenizer.encode(prompt, add_special_tokens=False)
        a = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
    return ids, mask


@torch.no_grad()
def greedy_accuracy(model, tokenizer, pairs: list[tuple[str, str]], max_new: int = 6) -> float:
    """Exact-match accuracy of greedy decoding (prompts of equal length are batched together)."""
    correct = 0
    by_length: dict[int, list[tuple[list[int], str]]] = {}
    for prompt, answer in pairs:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        by_length.setdefault(len(ids), []).append((ids, answer))
    for items in by_length.values():
        x = torch.tensor([ids for ids, _ in items])
        done = torch.zeros(len(items), dtype=torch.bool)
        out = [[] for _ in items]
        for _ in range(max_new):
            nxt = model(x).logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == tokenizer.eos_token_id:
                        done[i] = True
                    else:
                        out[i].append(t)
            x = torch.cat([x, nxt[:, None]], dim=1)
        correct += sum(tokenizer.decode(o) == a for o, (_, a) in zip(out, items))
    return correct / len(pairs)


def task_pairs(task: str, count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (prompt, zero-padded sum) pairs of ``task`` from generator seed ``seed``."""
    digits = TASKS[task]
    return [(r.prompt, r.ground_truth["answer"].zfill(digits + 1)) for r in addition_rows(count, seed, digits)]


def warm_up(out: Path, seed: int = 0, target: float = 0.15, max_steps: int = 3000, batch: int = 128,
            lr: float = 2e-3, eval_every: int = 50, task: str = "addition") -> dict:
    """Build tokenizer + model in ``out`` and train on ``task`` until greedy accuracy >= ``target``."""
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    model = build_model(seed)
    train = task_pairs(task, 50_000, seed + 1)
    held_out = task_pairs(task, 256, seed + 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARM_UP_LR_STEPS))
    start, step, accuracy = time.time(), 0, 0.0
    model.train()
    for step in range(1, max_steps + 1):
        chunk = [train[(step * batch + i) % len(train)] for i in range(batch)]
        ids, mask = encode_examples(tokenizer, chunk)
        logits = model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").view_as(mask[:, 1:])
        loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0:
            model.eval()
            accuracy = greedy_accuracy(model, tokenizer, held_out)
            model.train()
            print(f"warm-up step {step}: loss {loss.item():.3f}, greedy accuracy {accuracy:.3f}", flush=True)
            if accuracy >= target:
                break
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    info = {"recipe_version": RECIPE_VERSION, "task": task, "seed": seed, "target": target, "steps": step,
            "greedy_accuracy": accuracy, "seconds": round(time.time() - start, 1)}
    (out / "warm_up.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def is_built(out: Path, seed: int, target: float, task: str = "addition") -> bool:
    try:
        info = json.loads((out / "warm_up.json").read_text())
    except (OSError, ValueError):
        return False
    return (info.get("recipe_version") == RECIPE_VERSION and info.get("task", "addition") == task
            and info.get("seed") == seed
            and info.get("target") == target and (out / "model.safetensors").is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tiny-base/hf")
    parser.add_argument("--task", choices=sorted(TASKS), default="addition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.15, help="stop at this greedy accuracy")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.force and is_built(out, args.seed, args.target, args.task):
        print(f"tiny base model: {out} (already built)")
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    info = warm_up(out, seed=args.seed, target=args.target, task=args.task)
    print(f"tiny base model: {out} ({info['steps']} warm-up steps, {info['seconds']} s, "
          f"greedy accuracy {info['greedy_accuracy']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
