"""Pareto plot of compressed size against test quality, per compression method.

    python scripts/plot_pareto.py outputs/multirun/<sweep> [more dirs or globs] \
        [--metric ndcg@10] [--size compression.artifact_bytes] [--group-by KEY ...] \
        [--out pareto]

Writes ``<out>.png`` and ``<out>.pdf`` and prints the front as a Markdown table, followed by the
runs that gave no point (failed, or without the size / metric).
"""

from __future__ import annotations

import argparse
import sys

from recsys_compress.errors import RecsysCompressError
from recsys_compress.reporting.pareto import (
    aggregate_points,
    front_markdown,
    observations,
    pareto_front,
    plot_pareto,
)
from recsys_compress.reporting.tables import collect_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Size / quality Pareto plot from results.json.")
    parser.add_argument("paths", nargs="+", help="run or sweep directories, or globs")
    parser.add_argument("--metric", default="ndcg@10", help="test metric (higher is better)")
    parser.add_argument(
        "--size", default="compression.artifact_bytes", help="dotted results.json path of the size"
    )
    parser.add_argument(
        "--group-by",
        nargs="+",
        default=None,
        help="config keys that define a configuration (default: the whole config but the seed)",
    )
    parser.add_argument("--part", choices=["val", "test"], default="test")
    parser.add_argument("--out", default="pareto", help="output prefix (.png and .pdf added)")
    args = parser.parse_args(argv)
    try:
        records = collect_results(args.paths)
    except RecsysCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    found, problems = observations(records, args.metric, args.size, args.group_by, args.part)
    if not found:
        print("error: no run gave a point:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    points = aggregate_points(found)
    front = pareto_front([(p.size, p.value) for p in points])
    paths = plot_pareto(points, front, args.metric, args.size, args.out, args.part)
    print(front_markdown(points, front, args.metric, args.size))
    if problems:
        print("\nRuns without a point:")
        print("\n".join(f"- {line}" for line in problems))
    measured = sum(p.n for p in points)
    print(f"\n{len(points)} configurations from {measured} measurements; wrote")
    print("\n".join(f"  {path}" for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
