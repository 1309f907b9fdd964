"""Tables of mean ± std over seeds from many runs' results.json (or W&B runs).

    python scripts/make_table.py outputs/multirun/<sweep> [more dirs or globs] \
        --rows model.name --cols compression.methods --metrics ndcg@10 hr@10 \
        [--part test] [--reference ncf_paper | refs.yaml] [--out PREFIX | --latex F --csv F]
    python scripts/make_table.py --wandb ENTITY/PROJECT --group G --rows model.name ...

Prints Markdown; ``--out PREFIX`` also writes PREFIX.md, PREFIX.tex and PREFIX.csv. Failed runs
are listed under the table; the exit code is 0 while at least one run completed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recsys_compress.errors import RecsysCompressError
from recsys_compress.reporting.references import bundled_sources, load_reference
from recsys_compress.reporting.table_formats import (
    failure_lines,
    to_csv,
    to_latex,
    to_markdown,
)
from recsys_compress.reporting.tables import (
    build_table,
    collect_results,
    fetch_wandb_records,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Mean ± std tables from results.json files or W&B runs.",
        epilog="Keys are dotted config keys (model.name, compression.prune.sparsity), keys of "
        "results.json (compression.methods) or `pretrained`. Metrics are names in the --part "
        "section (ndcg@10), dotted results.json paths (compression.artifact_ratio) or "
        "share:<metric> (compressed over dense).",
    )
    parser.add_argument("paths", nargs="*", help="run or sweep directories, or globs")
    parser.add_argument(
        "--rows",
        "--group-by",
        dest="rows",
        nargs="+",
        default=["model.name"],
        metavar="KEY",
        help="keys whose values make the rows (default: model.name)",
    )
    parser.add_argument(
        "--cols",
        nargs="+",
        default=[],
        metavar="KEY",
        help="keys whose values make column groups (each holds every metric)",
    )
    parser.add_argument("--metrics", nargs="+", default=["ndcg@10", "hr@10", "recall@10"])
    parser.add_argument("--part", choices=["val", "test"], default="test")
    parser.add_argument("--digits", type=int, default=4, help="decimals printed (default 4)")
    parser.add_argument(
        "--higher-is-better",
        nargs="+",
        default=[],
        metavar="METRIC",
        help="rank these metrics high-first (default: all but sizes, ratios, times, errors)",
    )
    parser.add_argument(
        "--lower-is-better",
        nargs="+",
        default=[],
        metavar="METRIC",
        help="rank these metrics low-first (default: *bytes*, *ratio*, *seconds*, ...)",
    )
    parser.add_argument(
        "--reference",
        metavar="NAME|FILE",
        help=f"published numbers to join: {', '.join(sorted(bundled_sources()))} or a YAML file",
    )
    parser.add_argument("--latex", type=Path, metavar="FILE", help="also write LaTeX (booktabs)")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write CSV")
    parser.add_argument(
        "--out", metavar="PREFIX", help="also write PREFIX.md, PREFIX.tex and PREFIX.csv"
    )
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B")
    parser.add_argument("--group", help="with --wandb: only runs of this W&B group")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run or sweep directories, or --wandb ENTITY/PROJECT")
    if args.group and not args.wandb:
        parser.error("--group selects W&B runs: it needs --wandb ENTITY/PROJECT")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = collect_results(args.paths) if args.paths else []
        if args.wandb:
            records += fetch_wandb_records(args.wandb, args.group)
        reference = load_reference(args.reference) if args.reference else None
        table = build_table(
            records,
            args.rows,
            args.cols,
            args.metrics,
            args.part,
            digits=args.digits,
            higher=args.higher_is_better,
            lower=args.lower_is_better,
            reference=reference,
        )
    except RecsysCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not table.cells:
        for line in failure_lines(table):
            print(f"- {line}", file=sys.stderr)
        print(f"error: none of the {len(records)} runs completed (listed above).", file=sys.stderr)
        return 1
    for metric in table.missing_metrics:
        print(f"warning: no completed run has {metric!r} (--part {args.part}).", file=sys.stderr)
    print(to_markdown(table), end="")
    outputs = [(args.latex, to_latex), (args.csv, to_csv)]
    if args.out:
        renders = {".md": to_markdown, ".tex": to_latex, ".csv": to_csv}
        outputs += [(Path(args.out + suffix), render) for suffix, render in renders.items()]
    for path, render in outputs:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(table), encoding="utf-8")
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
