"""Peak memory of a checkpoint conversion relative to the model's size.

    python bench/convert.py [--hidden 1024 --layers 8 --vocab 32000 --dtype bfloat16 --tp 1]

Makes a random Qwen2-shaped HF checkpoint, then runs ``tools/convert_hf.py hf-to-mcore`` and
``mcore-to-hf`` as subprocesses while sampling the memory of each process tree (proportional
set size from /proc/PID/smaps_rollup, anonymous + shared memory, so memory-mapped safetensors
pages — page cache — are left out and pages shared with forked helpers count once).
The baseline, measured in the same run, is the same two conversions of a tiny model: it holds
the interpreters, libraries and megatron's checkpoint-writer helper processes. Reported:
(peak - baseline peak) / checkpoint bytes, i.e. how many copies of the model the conversion
holds at its peak (1.0 = one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _memory(pid: int) -> tuple[int, int]:
    """(anonymous + shared-memory, all) proportional set size of one process, in bytes.

    Proportional: pages that forked helpers share with their parent count once. The first
    figure leaves out file-backed pages (memory-mapped safetensors are page cache, not copies).
    """
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0), fields.get("Pss", 0)


def peak_memory(cmd: list[str]) -> tuple[int, int, float]:
    """Run ``cmd``; return the peak anonymous and total PSS of its process tree and its wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_anon = peak_all = 0
    while proc.poll() is None:
        try:
            sizes = [_memory(p.pid) for p in [root, *root.children(recursive=True)]]
            peak_anon = max(peak_anon, sum(a for a, _ in sizes))
            peak_all = max(peak_all, sum(t for _, t in sizes))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    return peak_anon, peak_all, time.perf_counter() - start


def make_model(directory: Path, hidden: int, layers: int, vocab: int, dtype: str) -> int:
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=2,
        tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"], dtype=dtype,
    )
    model = transformers.Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(str(directory), max_shard_size="200MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    tool = [sys.executable, str(ROOT / "tools" / "convert_hf.py")]

    def conversions(tmp: Path) -> dict[str, tuple[int, int, float]]:
        return {
            "hf_to_mcore": peak_memory([*tool, "hf-to-mcore", "--hf", str(tmp / "hf"), "--out", str(tmp / "mc"),
                                        "--tp", str(args.tp)]),
            "mcore_to_hf": peak_memory([*tool, "mcore-to-hf", "--ckpt", str(tmp / "mc"), "--out", str(tmp / "back")]),
        }

    with tempfile.TemporaryDirectory() as small, tempfile.TemporaryDirectory() as big:
        small, big = Path(small), Path(big)
        small_bytes = make_model(small / "hf", 256, 2, 1024, args.dtype)
        model_bytes = make_model(big / "hf", args.hidden, args.layers, args.vocab, args.dtype)
        baseline, runs = conversions(small), conversions(big)
    result = {"model_bytes": model_bytes, "baseline_model_bytes": small_bytes, "tp": args.tp}
    for name, (anon, total, seconds) in runs.items():
        base_anon, base_total, _ = baseline[name]
        result[name] = {
            "peak_x_model": round((anon - base_anon) / (model_bytes - small_bytes), 3),
            "peak_x_model_incl_file_pages": round((total - base_total) / (model_bytes - small_bytes), 3),
            "baseline_peak_bytes": base_anon,
            "seconds": round(seconds, 1),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
