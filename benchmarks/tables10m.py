"""Tables of 10M rows (opt-in: ``python scripts/bench.py --only tables10m``, ~7.5 minutes): the
scale section's steps (:mod:`benchmarks.scale`) on MF-64 with 10M users x 1M items x 50M
interactions (a 2.56 GB user table, 2.86 GB of model), each in its own process, target 24 GB of
peak RSS each. The two training steps run 2,000 optimizer steps of the first epoch, not all
~49,000 of it (~6 minutes each at ~7 ms a step on 2 cores); their details give the time to the
first step (the epoch's shuffle of 200M rows and its 160M negative draws) and the median time of
an optimizer step. Quick: the scale section's quick size, 200 steps.
"""

from __future__ import annotations

from benchmarks.common import Figure
from benchmarks.scale import QUICK, run_steps

SECTION = "tables10m"
FULL = {
    "num_users": 10_000_000,
    "num_items": 1_000_000,
    "interactions_per_user": 5,
    "train_steps": 2_000,
}


def run(quick: bool) -> list[Figure]:
    return run_steps(SECTION, {**QUICK, "train_steps": 200} if quick else FULL)
