"""Fast exact sorts of integer keys for the data pipeline.

numpy's ``np.sort`` of int64 is vectorised and several times faster than ``np.argsort`` or
``np.lexsort``. Packing the keys and the row index into one int64 (when the product of their
ranges fits) turns a stable multi-key argsort into a single ``np.sort``, with exactly the order
``np.lexsort`` gives (ties by row index); otherwise these functions fall back to ``np.lexsort``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import numpy as np

_INT64_LIMIT = 2**63


def lexsort_ints(keys: Sequence[np.ndarray], bounds: Sequence[int]) -> np.ndarray:
    """Row order by ``keys[0]``, then ``keys[1]``, ..., then row index (note: primary key FIRST,
    unlike ``np.lexsort``). Each key holds integers in ``[0, bound)``."""
    n = len(keys[0])
    index_bits = max(n - 1, 1).bit_length()
    span = 1 << index_bits
    for bound in bounds:
        span *= max(int(bound), 1)
    if span >= _INT64_LIMIT:
        return np.lexsort([np.asarray(k) for k in reversed(keys)])
    packed = np.zeros(n, dtype=np.int64)
    for key, bound in zip(keys, bounds, strict=True):
        packed *= max(int(bound), 1)
        packed += key
    packed <<= index_bits
    packed |= np.arange(n, dtype=np.int64)
    packed.sort(kind=_kind(keys[0]))  # distinct values: every algorithm gives this order
    packed &= (1 << index_bits) - 1
    return packed


def sort_ints(values: np.ndarray, primary: np.ndarray) -> np.ndarray:
    """``np.sort(values)`` for integers ordered first by ``primary`` (``user * n + item`` with
    ``primary = user``), with the algorithm that is fastest for ``primary``'s order."""
    return np.sort(values, kind=_kind(primary))


def _kind(primary: np.ndarray) -> str:
    """The sort for keys led by ``primary``: :func:`grouped_kind` when ``primary`` is in order
    (rows grouped by user, as files and our interactions are; a ~1 ms check at 1M), else
    numpy's quicksort. Sorted values do not depend on the algorithm."""
    primary = np.asarray(primary)
    return grouped_kind() if bool((primary[1:] >= primary[:-1]).all()) else "quicksort"


@functools.cache
def grouped_kind() -> str:
    """The faster of numpy's stable sort and quicksort on int64 keys grouped by user (random
    within a user), timed once per process on 2^16 such keys (a few ms). timsort merges the
    runs that grouping leaves: on this AMD EPYC (Zen 4), whose AVX-512 quicksort in numpy is
    slow, 21.6 against 59.8 ms for 1M keys (timing loops outside the repo); where numpy's
    quicksort is fast (Intel AVX-512) it may win instead. On shuffled keys quicksort stays (74
    against 65 ms here)."""
    rng = np.random.default_rng(0)
    keys = np.repeat(np.arange(1 << 11, dtype=np.int64), 32) << 20
    keys |= rng.integers(0, 1 << 20, len(keys))
    best = {}
    for kind in ("stable", "quicksort"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            np.sort(keys, kind=kind)
            times.append(time.perf_counter() - start)
        best[kind] = min(times)
    return min(best, key=best.__getitem__)


def stable_argsort(key: np.ndarray, bound: int) -> np.ndarray:
    """``np.argsort(key, kind="stable")`` for integers in ``[0, bound)``."""
    return lexsort_ints([key], [bound])


def sorted_unique(values: np.ndarray, primary: np.ndarray | None = None) -> np.ndarray:
    """``np.unique(values)`` for an integer array (np.unique is much slower on large arrays);
    ``primary``: as in :func:`sort_ints`."""
    values = np.sort(values) if primary is None else sort_ints(values, primary)
    if len(values) == 0:
        return values
    return values[np.r_[True, values[1:] != values[:-1]]]


def time_key(timestamps: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Timestamps as integer sort keys ``(key, bound)`` with NaN first, or None when they are
    not all whole numbers (then sort the floats)."""
    if len(timestamps) == 0 or np.isnan(timestamps).all():
        return np.zeros(len(timestamps), dtype=np.int64), 1
    low, high = float(np.nanmin(timestamps)), float(np.nanmax(timestamps))
    if not (np.isfinite(low) and np.isfinite(high)) or high - low >= 2**52:
        return None
    shifted = np.nan_to_num(timestamps - (low - 1), nan=0.0, copy=False)  # NaN -> 0, else >= 1
    key = shifted.astype(np.int64)
    if not np.array_equal(key, shifted):
        return None
    return key, int(high - low) + 2


def group_fraction_order(groups: np.ndarray, num_groups: int, fractions: np.ndarray) -> np.ndarray:
    """``np.lexsort((fractions, groups))`` for groups in ``[0, num_groups)`` and fractions in
    ``[0, 1)``: one packed sort on the fractions' leading bits, then the rows whose group and
    leading bits tie with a neighbour's put in exact order (by fraction, then row). Ties are
    rare (at 1M groups of 5 rows and 20 leading bits, ~10 pairs), so that costs little, where
    re-sorting everything on a wrong tie took 2.2 s at 1M users (a timing script outside the
    repo)."""
    groups = np.asarray(groups, dtype=np.int64)  # int32 would overflow in the key below
    n = len(fractions)
    bits = min(32, 63 - max(num_groups, 1).bit_length() - max(n - 1, 1).bit_length())
    if bits < 8:  # too few leading bits: most rows would tie
        by_fraction = np.argsort(fractions, kind="stable")
        return by_fraction[stable_argsort(groups[by_fraction], num_groups)]
    leading = (fractions * float(2**bits)).astype(np.int64)
    order = lexsort_ints([groups, leading], [num_groups, 2**bits])
    key = groups[order] * (1 << bits) + leading[order]
    same = key[1:] == key[:-1]  # position i + 1 ties with position i
    if same.any():
        tied = np.zeros(n, dtype=bool)
        tied[1:] |= same
        tied[:-1] |= same
        positions = np.flatnonzero(tied)
        starts = np.ones(n, dtype=bool)
        starts[1:] = ~same
        runs = np.cumsum(starts)[positions]
        rows = order[positions]
        order[positions] = rows[np.lexsort((rows, fractions[rows], runs))]
    return order


def csr(
    users: np.ndarray, items: np.ndarray, num_users: int, unique: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, items sorted by user, then item) of a set of (user, item) pairs of internal
    ids; ``unique``: each repeated pair once (else they are kept)."""
    num_items = int(items.max()) + 1 if len(items) else 1
    keys = sort_ints(users.astype(np.int64) * num_items + items, users)
    if unique and len(keys):
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]]
        users = keys // num_items
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.bincount(users, minlength=num_users))
    return indptr, keys % num_items


def rows_of_users(
    indptr: np.ndarray, items: np.ndarray, chunk_users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of the CSR rows of ``chunk_users``; row = position in the chunk."""
    lengths = indptr[chunk_users + 1] - indptr[chunk_users]
    rows = np.repeat(np.arange(len(chunk_users)), lengths)
    starts = np.repeat(indptr[chunk_users] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    cols = items[np.arange(lengths.sum()) + starts]
    return rows, cols


# Integer ids spanning at most this many values per id (MovieLens ids, contiguous ranges) go
# through a dense table indexed by ``id - min`` instead of a sort or a binary search: the
# pipeline's factorisation of raw ids, and a served model's raw-id lookup.
DENSE_ID_SPAN = 4


def dense_span(low: int, high: int, count: int) -> bool:
    """Whether ``count`` integer ids from ``low`` to ``high`` fit a dense table of
    ``high - low + 1`` entries (:data:`DENSE_ID_SPAN` per id, and 1,024 more)."""
    return high - low < DENSE_ID_SPAN * count + 1024
