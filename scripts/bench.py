"""The benchmark suite: each figure beside its target, PASS / FAIL, and a JSON file.

    python scripts/bench.py [--quick] [--only SECTION ...] [--json bench.json]

Sections (modules of ``benchmarks/``): train, evaluation, compression, scale, inference, data and
gpu (CUDA figures; reports nothing without a CUDA device); ``tables10m`` (tables of 10M rows,
~7.5 minutes) runs only when ``--only`` names it.
Targets are ratios against a reference measured in the same process (the machine is shared and
noisy); absolute times, throughputs and memory are in each figure's details. The exit code is 1
when a figure misses its target or a section stops with an error; the other sections still run,
and the JSON file is written after each section (a section's error is in its ``errors``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Figure  # noqa: E402

SECTIONS = ["train", "evaluation", "compression", "scale", "inference", "data", "gpu"]
OPT_IN = ["tables10m"]  # run only when named in --only (tables of 10M rows: ~7.5 minutes)


def _format(figure: Figure) -> str:
    target = "" if figure.target is None else f"{figure.op} {figure.target:g}{figure.unit}"
    verdict = {True: "PASS", False: "FAIL", None: "-"}[figure.passed]
    return (
        f"{figure.section:12} {figure.name:52} {figure.value:10.3f}{figure.unit:<3} "
        f"{target:>12}  {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, fewer repetitions")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS + OPT_IN, default=SECTIONS, metavar="SECTION"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)

    import torch

    figures: list[Figure] = []
    errors: dict[str, str] = {}

    def write_json() -> None:
        if not args.json:
            return
        report = {
            "quick": args.quick,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "figures": [f.to_json() for f in figures],
            "errors": errors,
        }
        args.json.write_text(json.dumps(report, indent=2))

    print(f"{'section':12} {'figure':52} {'value':>13} {'target':>12}  result", flush=True)
    for name in args.only:
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            for figure in module.run(args.quick):
                figures.append(figure)
                print(_format(figure), flush=True)
        except Exception as err:  # a broken section costs its own figures, not the others'
            traceback.print_exc()
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"# {name}: ERROR after {time.perf_counter() - start:.0f} s", flush=True)
        else:
            print(f"# {name}: {time.perf_counter() - start:.0f} s", flush=True)
        write_json()  # after each section: what was measured survives a later failure
    for figure in figures:
        for key, value in figure.details.items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            print(f"  {figure.section}/{figure.name}: {key} = {value}")
    failed = [f for f in figures if f.passed is False]
    print(f"{len(figures)} figures, {len(failed)} below target")
    for name, error in errors.items():
        print(f"section {name} stopped with {error}: its figures are missing")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
