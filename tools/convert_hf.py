#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron-Core (dist checkpoint) formats.

    python tools/convert_hf.py hf-to-mcore --hf DIR --out DIR [--tp N --pp M] [--dtype bfloat16]
    python tools/convert_hf.py mcore-to-hf --ckpt DIR --out DIR [--hf-config DIR] [--dtype bfloat16]

hf-to-mcore reads config.json + safetensors (one file or shards with their index) and saves a
megatron dist checkpoint, written by TP x PP local processes; the checkpoint loads at any
TP/PP. mcore-to-hf writes safetensors shards plus config and tokenizer files (from the
checkpoint's hf/ folder, or --hf-config). Outputs are built in a temporary directory and
renamed at the end; an existing output is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prorl_megatron.checkpoint.convert import HFToMcore, hf_to_mcore, mcore_to_hf  # noqa: E402
from prorl_megatron.checkpoint.hf_io import CheckpointError  # noqa: E402
from prorl_megatron.checkpoint.hf_mapping import MappingError  # noqa: E402
from prorl_megatron.models.architectures import UnsupportedModelError  # noqa: E402

DTYPES = ["float32", "bfloat16", "float16"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF -> megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF checkpoint directory")
    a.add_argument("--out", required=True, help="output directory (must not exist)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write with")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write with")
    a.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the checkpoint's)")
    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF")
    b.add_argument("--ckpt", required=True, help="megatron dist checkpoint directory")
    b.add_argument("--out", required=True, help="output directory (must not exist)")
    b.add_argument("--hf-config", help="HF directory with config.json/tokenizer (default: CKPT/hf)")
    b.add_argument("--dtype", choices=DTYPES, help="dtype of the written tensors (default: the model's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            out = hf_to_mcore(HFToMcore(args.hf, args.out, args.tp, args.pp, args.dtype))
        else:
            out = mcore_to_hf(args.ckpt, args.out, args.hf_config, args.dtype)
    except (CheckpointError, MappingError, UnsupportedModelError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
