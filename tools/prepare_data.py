#!/usr/bin/env python
"""Convert the public sources of the ProRL mixture into the project's prompt schema.

    python tools/prepare_data.py convert SOURCE --input FILE [FILE ...] --out OUT.jsonl|OUT.parquet
    python tools/prepare_data.py reasoning-gym --datasets NAME:COUNT[,NAME:COUNT ...] --seed N --out OUT
    python tools/prepare_data.py addition --count N --seed N --out OUT   (the embedded demo's task)

SOURCE is one of: deepscaler, eurus2-code, apps, taco, scp116k, reasoning-gym, ifeval (see
prorl_megatron/data/sources.py for each source's record format). Input files are local jsonl or
parquet. A record that cannot be converted stops the run with its file, row and field, unless
--on-bad-row skip (then it is counted and reported). The output is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prorl_megatron.data import sources  # noqa: E402
from prorl_megatron.data.dataset import DataError, read_records  # noqa: E402
from prorl_megatron.data.schema import BadRow, PromptRow  # noqa: E402


def write_rows(rows: list[PromptRow], out: Path) -> None:
    """Write rows as jsonl or parquet (by suffix), atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        records = [r.to_json() for r in rows]
        if out.suffix == ".parquet":
            import datasets

            datasets.Dataset.from_list(records).to_parquet(tmp)
        elif out.suffix in (".jsonl", ".json"):
            with open(tmp, "w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            raise DataError(f"{out}: output must end in .jsonl or .parquet")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert(source: str, inputs: list[str], on_bad_row: str) -> tuple[list[PromptRow], list[str]]:
    converter = sources.CONVERTERS[source]
    rows, skipped = [], []
    for name in inputs:
        for number, record in enumerate(read_records(Path(name)), start=1):
            try:
                rows.append(converter(record, len(rows)))
            except BadRow as e:
                if on_bad_row == "error":
                    raise DataError(f"{name}: row {number}: {e}") from None
                skipped.append(f"{name}: row {number}: {e}")
    return rows, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert source records")
    c.add_argument("source", choices=sorted(sources.CONVERTERS))
    c.add_argument("--input", nargs="+", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    g = sub.add_parser("reasoning-gym", help="generate logic puzzles with reasoning-gym")
    g.add_argument("--datasets", required=True, help="NAME:COUNT[,NAME:COUNT ...]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True)
    a = sub.add_parser("addition", help="the embedded demo's addition prompts")
    a.add_argument("--count", type=int, required=True)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--digits", type=int, default=3)
    a.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    skipped: list[str] = []
    try:
        if args.command == "convert":
            rows, skipped = convert(args.source, args.input, args.on_bad_row)
        elif args.command == "reasoning-gym":
            specs = {}
            for item in args.datasets.split(","):
                name, _, count = item.partition(":")
                if not count.isdigit():
                    raise DataError(f"--datasets: {item!r} must look like NAME:COUNT")
                specs[name] = int(count)
            rows = [sources.from_reasoning_gym(r, i)
                    for i, r in enumerate(sources.generate_reasoning_gym(specs, args.seed))]
        else:
            rows = sources.addition_rows(args.count, args.seed, args.digits)
        write_rows(rows, Path(args.out))
    except (DataError, BadRow, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(f"wrote {len(rows)} rows to {args.out}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
