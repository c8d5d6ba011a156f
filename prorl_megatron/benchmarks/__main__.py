"""Score checkpoints on ProRL's benchmarks with the paper's protocol and print the paper's table.

    torchrun --nproc_per_node N -m prorl_megatron.benchmarks run --recipe R \\
        --checkpoint BASE --checkpoint TRAINED [--label L ...] --bench-dir BENCH --out OUT \\
        [--bench NAME=FILE ...] [--benchmarks a,b,...] [--on-bad-row skip] [key=value ...]
    python -m prorl_megatron.benchmarks table OUT/base OUT/trained [--base LABEL] --out OUT
    python -m prorl_megatron.benchmarks list

``run`` scores each benchmark file found in ``BENCH`` (named ``<benchmark>.<jsonl|json|parquet|csv>``,
a Reasoning Gym spec ``reasoning_gym.yaml``; ``list`` names them and their sources) on each checkpoint
(Megatron or HF) with the recipe's ``eval.benchmark`` protocol, resumably, then writes the table and
plots of these checkpoints to ``OUT`` (the first checkpoint is the base) and prints the table. ``table``
redraws them from any checkpoints' results. ``key=value`` words anywhere are recipe overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _pairs(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--bench {item!r}: expected NAME=FILE")
        out[name] = Path(path)
    return out


def run(args: argparse.Namespace) -> int:
    from prorl_megatron import benchmarks, run_log
    from prorl_megatron.benchmarks import protocol, report
    from prorl_megatron.config import recipe_from_args
    from prorl_megatron.data.dataset import DataError

    recipe = recipe_from_args(args)
    if args.bench_dir is None and not args.bench:
        raise SystemExit("no benchmarks: pass --bench-dir DIR or --bench NAME=FILE")
    try:
        only = [n.strip() for n in args.benchmarks.split(",") if n.strip()] if args.benchmarks else None
        files = benchmarks.find_files(Path(args.bench_dir) if args.bench_dir else None, _pairs(args.bench), only)
        checkpoints = protocol.checkpoints_from(args.checkpoint, args.label)
    except (DataError, protocol.ProtocolError) as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    try:
        # library notices and every rank's log go to {logging.dir}/benchmarks.log (see run_log)
        with run_log.routed(recipe.logging.dir, name="benchmarks.log"):
            written = protocol.run(recipe, checkpoints, files, out, args.on_bad_row)
    except protocol.ProtocolError as e:  # every rank has it: one says it
        if run_log.launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if written:  # rank 0
        results = report.load_results(written)
        paths = report.write_report(results, out)
        print(paths[0].read_text())
        print("written: " + ", ".join(str(p) for p in [*written, *paths]))
    sys.stdout.flush()
    return 0


def table(args: argparse.Namespace) -> int:
    from prorl_megatron.benchmarks import report

    results = report.load_results(args.results)
    paths = report.write_report(results, Path(args.out), args.base)
    print(paths[0].read_text())
    print("written: " + ", ".join(map(str, paths)))
    return 0


def list_benchmarks(args: argparse.Namespace) -> int:
    from prorl_megatron.benchmarks import BENCHMARKS

    for b in BENCHMARKS:
        print(f"{b.name:<15} {b.domain:<12} {b.title:<14} {b.source}")
    return 0


def parsers() -> dict[str, argparse.ArgumentParser]:
    from prorl_megatron.config import add_recipe_arguments

    prog = "python -m prorl_megatron.benchmarks"
    r = argparse.ArgumentParser(prog=f"{prog} run", description="Score checkpoints on the benchmarks, then write "
                                "the table and plots.")
    add_recipe_arguments(r)
    r.add_argument("--checkpoint", action="append", required=True,
                   help="a Megatron checkpoint or HF directory (repeat: the first is the base)")
    r.add_argument("--label", action="append", help="the results' name for each --checkpoint, in order")
    r.add_argument("--bench-dir", help="directory of benchmark files named <benchmark>.<type>")
    r.add_argument("--bench", action="append", default=[], metavar="NAME=FILE", help="a benchmark's file (repeat)")
    r.add_argument("--benchmarks", help="only these benchmarks, comma-separated")
    r.add_argument("--out", required=True, help="results directory (a rerun resumes there)")
    r.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                   help="a record a loader cannot use: stop (default) or skip it, counted and reported")
    r.set_defaults(fn=run)
    t = argparse.ArgumentParser(prog=f"{prog} table", description="The table and plots from saved results.")
    t.add_argument("results", nargs="+", help="results.json files or checkpoint result directories (OUT/<label>)")
    t.add_argument("--base", help="the label to compare the others with (default: the first)")
    t.add_argument("--out", required=True, help="where table.md, table.csv and the plots go")
    t.set_defaults(fn=table)
    ls = argparse.ArgumentParser(prog=f"{prog} list", description="The benchmarks, their domains and sources.")
    ls.set_defaults(fn=list_benchmarks)
    return {"run": r, "table": t, "list": ls}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = parsers()
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    args = commands[argv[0]].parse_intermixed_args(argv[1:])  # overrides may come anywhere
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
