"""Aggregate runs into a Markdown table of mean ± std over seeds.

    python scripts/make_table.py outputs/multirun/<sweep> [more dirs or globs] \
        --group-by model.name split.name --metrics ndcg@10 hr@10 recall@10 [--part test]
"""

from __future__ import annotations

import argparse
import sys

from recsys_compress.errors import RecsysCompressError
from recsys_compress.reporting.tables import aggregate, collect_results, to_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mean ± std tables from results.json files.")
    parser.add_argument("paths", nargs="+", help="run or sweep directories, or globs")
    parser.add_argument("--group-by", nargs="+", default=["model.name"], help="config keys")
    parser.add_argument("--metrics", nargs="+", default=["ndcg@10", "hr@10", "recall@10"])
    parser.add_argument("--part", choices=["val", "test"], default="test")
    args = parser.parse_args(argv)
    try:
        records = collect_results(args.paths)
    except RecsysCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = aggregate(records, args.group_by, args.metrics, args.part)
    print(to_markdown(rows, args.group_by, args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
