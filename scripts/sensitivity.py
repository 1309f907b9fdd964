"""Per-layer compression sensitivity of a trained run, without retraining.

    python scripts/sensitivity.py outputs/<run> [--methods prune svd qat] \
        [--strengths prune=0,0.5,0.9 svd=0.5,0.25 qat=8,4] [--metric ndcg@10] \
        [--include GLOB ...] [--exclude GLOB ...] [--out PREFIX]

Compresses one nn.Embedding / nn.Linear at a time, measures the validation metric (full ranking)
and restores the layer. Writes ``PREFIX.png`` / ``.pdf`` (drop per layer, a panel per method),
``PREFIX.md`` (the drop tables, also printed) and ``PREFIX.json`` (every probe); PREFIX defaults
to ``<run>/sensitivity``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recsys_compress.compression.targets import TargetSpec
from recsys_compress.errors import ConfigError, RecsysCompressError
from recsys_compress.reporting.sensitivity import (
    DEFAULT_STRENGTHS,
    METHODS,
    analyze_run,
    to_markdown,
    write_outputs,
)


def parse_strengths(methods: list[str], entries: list[str]) -> dict[str, list[float]]:
    """``["prune=0.5,0.9", "qat=8"]`` over the defaults of ``methods``."""
    strengths = {m: list(DEFAULT_STRENGTHS[m]) for m in methods}
    for entry in entries:
        method, sep, values = entry.partition("=")
        if not sep or method not in methods:
            raise ConfigError(
                f"--strengths {entry!r}: write METHOD=V1,V2 with METHOD one of --methods "
                f"({', '.join(methods)}), e.g. prune=0.5,0.9."
            )
        try:
            strengths[method] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise ConfigError(f"--strengths {entry!r}: the values must be numbers.") from None
    return strengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Per-layer compression sensitivity of a run.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--strengths",
        nargs="+",
        default=[],
        metavar="METHOD=V1,V2",
        help="prune: sparsities; svd: parameter ratios kept; qat: bits (8, 4). "
        f"Defaults: {', '.join(f'{m}={list(s)}' for m, s in DEFAULT_STRENGTHS.items())}",
    )
    parser.add_argument("--metric", default="ndcg@10")
    parser.add_argument("--include", nargs="+", default=["*"], help="module name globs")
    parser.add_argument("--exclude", nargs="+", default=["*bias*"], help="module name globs")
    parser.add_argument("--out", default=None, help="output prefix (default: <run>/sensitivity)")
    args = parser.parse_args(argv)
    try:
        strengths = parse_strengths(args.methods, args.strengths)
        targets = TargetSpec(include=args.include, exclude=args.exclude)
        result = analyze_run(args.run_dir, strengths, args.metric, targets)
    except RecsysCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.out or args.run_dir / "sensitivity")
    print(to_markdown(result))
    print("\nwrote\n" + "\n".join(f"  {path}" for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
