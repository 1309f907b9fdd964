"""Interaction-data sources: MovieLens readers and download, plus a generic CSV/TSV/Parquet reader.

Every reader returns a :class:`pandas.DataFrame` with exactly the columns ``user``, ``item``,
``rating``, ``timestamp`` in the file's row order:

* ``user`` / ``item``: the file's raw ids, ``int64`` when every id is a canonical integer
  (``"7"``, not ``"007"``), otherwise strings;
* ``rating``: ``float32`` (NaN when the file has no ratings);
* ``timestamp``: ``float64`` unix seconds (NaN when the file has no timestamps).

Problems with a file raise :class:`~recsys_compress.errors.DataError` whose message names the
file (and the config key, where one is involved) and says how to fix it.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import logging
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from platformdirs import user_cache_dir

from recsys_compress.errors import DataError
from recsys_compress.io import atomic_write

log = logging.getLogger(__name__)

COLUMNS = ("user", "item", "rating", "timestamp")
CACHE_ENV = "RECSYS_COMPRESS_CACHE"

PathLike = str | os.PathLike[str]

_INT_RE = r"^-?(0|[1-9][0-9]*)$"  # canonical integers only: "007" stays a string id
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip"}


def default_cache_dir() -> Path:
    """The data cache: ``$RECSYS_COMPRESS_CACHE`` if set and non-empty, else the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(user_cache_dir("recsys-compress"))


# --------------------------------------------------------------------------------------------
# Fixed-format MovieLens / RecBole readers
# --------------------------------------------------------------------------------------------


def _corrupt(path: Path, detail: str, expected: str) -> DataError:
    return DataError(
        f"{path}: {detail}. The file looks corrupt or truncated (expected {expected}). "
        f"Delete it so that it is downloaded again, or pass data.path=<a good copy>."
    )


def _read_fixed(
    path: PathLike,
    expected: str,
    *,
    sep: str,
    header: int | None,
    usecols: list[int] | list[str] | None,
    dtype: dict[Any, Any],
    ncols: int,
) -> pd.DataFrame:
    """Read a fixed-layout ratings file with the C engine; any parse problem -> DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found (expected {expected}). Put the file there, pass "
            f"data.path=<the file>, or leave data.path unset to download it into the cache."
        )
    try:
        raw = pd.read_csv(
            path, sep=sep, header=header, usecols=usecols, dtype=dtype, engine="c", na_filter=True
        )
    except pd.errors.EmptyDataError as e:
        raise _corrupt(path, "the file is empty", expected) from e
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OverflowError) as e:
        raise _corrupt(path, f"cannot parse it ({str(e).strip()})", expected) from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e}). Check its permissions.") from e
    if raw.shape[1] != ncols:
        raise _corrupt(path, f"it has {raw.shape[1]} columns, not {ncols}", expected)
    if len(raw) == 0:
        raise _corrupt(path, "it has no rows", expected)
    # A short (truncated) line leaves NaN in the last fields (integer columns fail to parse).
    missing = np.zeros(len(raw), dtype=bool)
    for column in raw.columns:
        if raw[column].dtype.kind not in "iu":
            missing |= raw[column].isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        line = row + 1 + (0 if header is None else header + 1)
        raise _corrupt(path, f"line {line} has missing fields", expected)
    return raw


def _frame(user: pd.Series, item: pd.Series, rating: Any, timestamp: Any, n: int) -> pd.DataFrame:
    """The standard frame (ids as given, rating float32, timestamp float64, RangeIndex)."""
    return pd.DataFrame(
        {
            "user": user.reset_index(drop=True),
            "item": item.reset_index(drop=True),
            "rating": np.full(n, np.nan, dtype=np.float32)
            if rating is None
            else np.asarray(rating, dtype=np.float32),
            "timestamp": np.full(n, np.nan, dtype=np.float64)
            if timestamp is None
            else np.asarray(timestamp, dtype=np.float64),
        }
    )


_ML_DTYPES = ("int64", "int64", "float32", "float64")


def _standard_columns(raw: pd.DataFrame) -> pd.DataFrame:
    """A fixed-format read (4 columns already in ``_ML_DTYPES``) renamed to the standard frame,
    without copying the data."""
    raw.columns = list(COLUMNS)
    return raw


def read_ml100k(path: PathLike) -> pd.DataFrame:
    """Read ML-100K ``u.data`` (tab-separated ``user item rating timestamp``, no header)."""
    raw = _read_fixed(
        path,
        "ML-100K u.data: 4 tab-separated integer columns user, item, rating, timestamp",
        sep="\t",
        header=None,
        usecols=None,
        dtype=dict(enumerate(_ML_DTYPES)),
        ncols=4,
    )
    return _standard_columns(raw)


_ML1M_EXPECTED = "ML-1M ratings.dat: lines UserID::MovieID::Rating::Timestamp"


def _ml1m_bad_line(path: Path) -> tuple[int, str] | None:
    """The first non-blank line that is not ``int::int::number::number`` (1-based), or None.
    A slow line-by-line check, run only when the fast read failed or counted wrong."""

    def well_formed(fields: list[str]) -> bool:
        try:
            int(fields[0]), int(fields[1]), float(fields[2]), float(fields[3])
        except ValueError:
            return False
        return True

    with suppress(OSError), open(path, encoding="utf-8", errors="replace", newline="") as f:
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            fields = text.split("::")
            if text and not (len(fields) == 4 and well_formed(fields)):
                return number, text
    return None


def _count_byte(path: Path, byte: bytes) -> int:
    """How many times ``byte`` occurs in the (non-empty) file at ``path``: numpy over a memory
    map of the page cache, ~4 ms for ML-1M's 24 MB against ~17 ms to read the file into a
    ``bytes`` and ``count`` it."""
    with open(path, "rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return int(np.count_nonzero(np.frombuffer(view, np.uint8) == byte[0]))
        except (OSError, ValueError):  # no mmap here (a pipe, a file that reports size 0)
            f.seek(0)
            return f.read().count(byte)


def read_ml1m(path: PathLike) -> pd.DataFrame:
    """Read ML-1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``, no header).

    The C engine has no multi-character separator: it splits on ':' and keeps every other
    field (pandas' python engine, the one that takes ``sep="::"``, is about 30 times slower).
    Counting the ':' in the file (6 a row) catches what that reading would let through, e.g.
    an extra field; a malformed line is then found and named by a line-by-line check.
    """
    path = Path(path)
    cols = [0, 2, 4, 6]
    try:
        raw = _read_fixed(
            path,
            _ML1M_EXPECTED,
            sep=":",
            header=None,
            usecols=cols,
            dtype=dict(zip(cols, _ML_DTYPES, strict=True)),
            ncols=4,
        )
        well_formed = _count_byte(path, b":") == 6 * len(raw)
    except DataError as e:
        bad = _ml1m_bad_line(path)
        if bad is None:
            raise
        raise _corrupt(path, f"line {bad[0]} reads {bad[1][:80]!r}", _ML1M_EXPECTED) from e
    if not well_formed:
        bad = _ml1m_bad_line(path)
        where = f"line {bad[0]} reads {bad[1][:80]!r}" if bad else "it has stray ':'"
        raise _corrupt(path, where, _ML1M_EXPECTED)
    return _standard_columns(raw)


_ML20M_HEADER = ["userId", "movieId", "rating", "timestamp"]


def read_ml20m(path: PathLike) -> pd.DataFrame:
    """Read ML-20M / ML-25M ``ratings.csv`` (header ``userId,movieId,rating,timestamp``)."""
    expected = "MovieLens ratings.csv with header userId,movieId,rating,timestamp"
    raw = _read_fixed(
        path,
        expected,
        sep=",",
        header=0,
        usecols=None,
        dtype=dict(zip(_ML20M_HEADER, _ML_DTYPES, strict=True)),
        ncols=4,
    )
    if list(raw.columns) != _ML20M_HEADER:
        raise _corrupt(Path(path), f"its header is {','.join(map(str, raw.columns))}", expected)
    return _standard_columns(raw)


_RECBOLE_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]


def read_recbole_inter(path: PathLike) -> pd.DataFrame:
    """Read a RecBole ``.inter`` file with header ``user_id:token item_id:token rating:float
    timestamp:float`` (tab-separated); integer-looking tokens become int64 ids."""
    expected = "RecBole .inter: tab-separated, header " + " ".join(_RECBOLE_HEADER)
    raw = _read_fixed(
        path,
        expected,
        sep="\t",
        header=0,
        usecols=None,
        dtype=dict(zip(_RECBOLE_HEADER, ("str", "str", "float32", "float64"), strict=True)),
        ncols=4,
    )
    if list(raw.columns) != _RECBOLE_HEADER:
        raise _corrupt(Path(path), f"its header is {' '.join(map(str, raw.columns))}", expected)
    user = _ids_from_strings(raw["user_id:token"])
    item = _ids_from_strings(raw["item_id:token"])
    return _frame(user, item, raw["rating:float"], raw["timestamp:float"], len(raw))


# --------------------------------------------------------------------------------------------
# Generic CSV / TSV / Parquet reader
# --------------------------------------------------------------------------------------------


def _ids_from_strings(s: pd.Series) -> pd.Series:
    """int64 if every value is a canonical integer that fits, else the strings unchanged."""
    arr = pa.array(s, from_pandas=True)
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    if len(arr) and pc.all(pc.match_substring_regex(arr, _INT_RE)).as_py():
        with suppress(pa.ArrowInvalid):  # out of int64 range: keep as strings
            return pd.Series(pc.cast(arr, pa.int64()).to_numpy(), index=s.index)
    return s.astype(str)


def _normalize_ids(s: pd.Series, path: Path, col: str, key: str, where: Callable[[int], str]):
    """Ids -> int64 (integer ids) or strings; missing ids -> DataError."""
    missing = s.isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{path}: column {col!r} ({key}) is empty at {where(row)}"
            f"{f' and {int(missing.sum()) - 1} more rows' if missing.sum() > 1 else ''}. "
            f"Every interaction needs a user and an item: fix or drop those rows."
        )
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype(str)
    if pd.api.types.is_integer_dtype(s.dtype):
        return s.astype(np.int64)
    if pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64)
        if np.all(v == np.round(v)) and np.all(np.abs(v) < 2**53):
            return pd.Series(v.astype(np.int64), index=s.index)
        return s.astype(str)
    return _ids_from_strings(s)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _numeric(
    s: pd.Series, path: Path, col: str, key: str, where: Callable[[int], str], what: str
) -> np.ndarray:
    """A ratings column -> float64; missing or non-numeric values -> DataError."""
    if pd.api.types.is_bool_dtype(s.dtype):
        s = s.astype(np.float64)
    if pd.api.types.is_numeric_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(v)
        if bad.any():
            row = _first_bad(bad)
            raise DataError(
                f"{path}: column {col!r} ({key}) has no {what} at {where(row)}. Fill it in, or "
                f"set {key}=null if the file has no {what}s."
            )
        return v
    v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(v)
    if bad.any():
        row = _first_bad(bad)
        raise DataError(
            f"{path}: column {col!r} ({key}) has a value that is not a number: "
            f"{s.iloc[row]!r} at {where(row)}. Fix the file, or set {key} to the right column "
            f"(or null if the file has no {what}s)."
        )
    return v


def _timestamps(s: pd.Series, path: Path, col: str, key: str, where: Callable[[int], str]):
    """Timestamps -> float64 unix seconds: numbers are taken as seconds, ISO-8601 strings (naive
    = UTC) and datetime columns are converted; anything else -> DataError."""
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        dt = s if getattr(s.dtype, "tz", None) is not None else s.dt.tz_localize("UTC")
        missing = dt.isna().to_numpy()
        if missing.any():
            raise DataError(
                f"{path}: column {col!r} ({key}) has no timestamp at "
                f"{where(_first_bad(missing))}. Fill it in, or set {key}=null."
            )
        return ((dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(np.float64)
    if pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
        return _numeric(s, path, col, key, where, "timestamp")
    present = s.notna().to_numpy()
    if not present.all():
        raise DataError(
            f"{path}: column {col!r} ({key}) has no timestamp at "
            f"{where(_first_bad(~present))}. Fill it in, or set {key}=null."
        )
    num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    num_bad = np.isnan(num)
    if not num_bad.any():
        return num
    dt = pd.to_datetime(s, errors="coerce", utc=True, format="ISO8601")
    dt_bad = dt.isna().to_numpy()
    if not dt_bad.any():
        return ((dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(np.float64)
    bad = num_bad if num_bad.sum() <= dt_bad.sum() else dt_bad
    row = _first_bad(bad)
    raise DataError(
        f"{path}: column {col!r} ({key}) has a value that is neither a unix time in seconds nor "
        f"an ISO-8601 date: {s.iloc[row]!r} at {where(row)}. Fix the file, or set {key} to the "
        f"right column (or null if the file has no timestamps)."
    )


def _sniff_sep(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            sample = f.read(64 * 1024)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e}). Check the path (data.path).") from e
    if not sample.strip():
        raise DataError(f"{path}: the file is empty. Point data.path at the interaction file.")
    try:
        return csv.Sniffer().sniff(sample, delimiters="\t,;| ").delimiter
    except csv.Error as e:
        raise DataError(
            f"{path}: cannot tell which separator the file uses. Set data.sep (e.g. data.sep=',' "
            f"or data.sep='\\t') or data.format (csv, tsv or parquet)."
        ) from e


def _resolve_format(path: Path, fmt: str, sep: str | None) -> tuple[str, str | None]:
    """-> ("parquet", None) or ("text", separator)."""
    fmt = fmt.lower()
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if fmt == "auto":
        if suffix in (".parquet", ".pq"):
            fmt = "parquet"
        elif suffix in (".tsv", ".tab"):
            fmt = "tsv"
        elif suffix == ".csv":
            fmt = "csv"
        else:
            fmt = "text"
    if fmt == "parquet":
        return "parquet", None
    if fmt not in ("csv", "tsv", "text"):
        raise DataError(f"{path}: unknown data.format={fmt!r}. Use auto, csv, tsv or parquet.")
    if sep is None:
        sep = {"csv": ",", "tsv": "\t"}.get(fmt) or _sniff_sep(path)
    if len(sep) != 1:
        raise DataError(
            f"{path}: data.sep={sep!r} is not a single character; only single-character "
            f"separators are supported (convert the file, e.g. to CSV)."
        )
    return "text", sep


def _match_column(name: str, columns: list[str]) -> str | None:
    """Exact match, else a unique RecBole-style ``name:type`` column."""
    if name in columns:
        return name
    typed = [c for c in columns if isinstance(c, str) and c.split(":", 1)[0] == name]
    return typed[0] if len(typed) == 1 else None


def read_interaction_file(
    path: PathLike,
    *,
    fmt: str = "auto",
    sep: str | None = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rating_col: str | None = "rating",
    timestamp_col: str | None = "timestamp",
) -> pd.DataFrame:
    """Read a CSV / TSV / Parquet interaction file with a header row into the standard frame.

    ``fmt="auto"`` decides by suffix (.parquet/.pq, .tsv/.tab, .csv, optionally compressed) and
    otherwise sniffs the separator. ``rating_col`` / ``timestamp_col`` may be None (NaN column).
    Timestamps may be unix seconds or ISO-8601 strings. Missing columns, missing ids and
    non-numeric ratings / timestamps raise DataError naming the file, the column and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found. Set data.path to an existing interaction file.")
    kind, sep = _resolve_format(path, fmt, sep)

    # 1. the header
    try:
        if kind == "parquet":
            columns = list(pq.read_schema(path).names)
        else:
            columns = list(pd.read_csv(path, sep=sep, nrows=0, engine="c").columns)
    except pd.errors.EmptyDataError as e:
        raise DataError(
            f"{path}: the file is empty. Point data.path at the interaction file."
        ) from e
    except (ValueError, pd.errors.ParserError, pa.ArrowException, UnicodeDecodeError, OSError) as e:
        raise DataError(
            f"{path}: cannot read it as {'Parquet' if kind == 'parquet' else 'a delimited text'} "
            f"file ({str(e).strip()}). Check data.path and data.format."
        ) from e

    wanted = {"data.user_col": user_col, "data.item_col": item_col}
    if rating_col is not None:
        wanted["data.rating_col"] = rating_col
    if timestamp_col is not None:
        wanted["data.timestamp_col"] = timestamp_col
    resolved: dict[str, str] = {}
    missing = []
    for key, name in wanted.items():
        found = _match_column(name, columns)
        if found is None:
            missing.append(f"{key}={name!r}")
        else:
            resolved[key] = found
    if missing:
        optional = (
            " (data.rating_col / data.timestamp_col may also be null: no such column)"
            if any(not m.startswith(("data.user_col", "data.item_col")) for m in missing)
            else ""
        )
        sep_hint = (
            f" If that list looks like one mangled name, the separator is wrong: set data.sep "
            f"(used {sep!r})."
            if kind == "text" and len(columns) == 1
            else ""
        )
        raise DataError(
            f"{path}: no column for {', '.join(missing)}. The file has columns "
            f"{[str(c) for c in columns]}. Set {', '.join(m.split('=')[0] for m in missing)} to "
            f"one of them{optional}.{sep_hint}"
        )

    # 2. the data
    cols = list(dict.fromkeys(resolved.values()))
    try:
        if kind == "parquet":
            raw = pd.read_parquet(path, columns=cols)
        else:
            raw = pd.read_csv(
                path,
                sep=sep,
                usecols=cols,
                dtype={resolved["data.user_col"]: str, resolved["data.item_col"]: str},
                keep_default_na=False,
                na_values=[""],
                engine="c",
            )
    except (ValueError, pd.errors.ParserError, pa.ArrowException, UnicodeDecodeError, OSError) as e:
        raise DataError(
            f"{path}: cannot parse it ({str(e).strip()}). The file looks corrupt or truncated: "
            f"fix or replace it."
        ) from e
    if len(raw) == 0:
        raise DataError(f"{path}: the file has a header but no rows. Point data.path at the data.")

    if kind == "parquet":

        def where(i: int) -> str:
            return f"row {i + 1}"
    else:

        def where(i: int) -> str:
            return f"data row {i + 1} (line {i + 2} of the file)"

    user = _normalize_ids(raw[resolved["data.user_col"]], path, user_col, "data.user_col", where)
    item = _normalize_ids(raw[resolved["data.item_col"]], path, item_col, "data.item_col", where)
    rating = ts = None
    if rating_col is not None:
        col = raw[resolved["data.rating_col"]]
        rating = _numeric(col, path, rating_col, "data.rating_col", where, "rating")
    if timestamp_col is not None:
        col = raw[resolved["data.timestamp_col"]]
        ts = _timestamps(col, path, timestamp_col, "data.timestamp_col", where)
    return _frame(user, item, rating, ts, len(raw))


# --------------------------------------------------------------------------------------------
# Atomic file helpers and download
# --------------------------------------------------------------------------------------------


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Extract one member of a zip (CRC-checked) to ``dest`` atomically."""
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, atomic_write(dest) as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError as e:
        raise DataError(
            f"{archive}: has no member {member!r}; it is not the expected archive. Delete it so "
            f"that it is downloaded again."
        ) from e
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, OSError) and not archive.is_file():
            raise DataError(f"{archive}: file not found; cannot extract {member!r}.") from e
        raise DataError(
            f"{archive}: cannot extract {member!r} ({e}); the archive looks corrupt or truncated. "
            f"Delete it so that it is downloaded again."
        ) from e
    return dest


def _md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _probe(url: str, timeout: float) -> None:
    """Fail fast when the host (or the proxy that urllib would use) does not accept connections."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        proxy_parts = urllib.parse.urlsplit(proxy if "//" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname, proxy_parts.port or 80
    else:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((host, port), timeout=timeout):
        pass


def download(
    url: str,
    dest: Path,
    *,
    md5: str | None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``: streamed to a temp file next to it, MD5-checked, then moved
    into place with ``os.replace``. A failed or bad download never lands at ``dest`` and leaves
    no temp file. An unreachable host fails within about ``connect_timeout`` seconds."""
    dest = Path(dest)
    host = urllib.parse.urlsplit(url).hostname or url

    def network_error(e: BaseException) -> DataError:
        reason = getattr(e, "reason", None) or e
        return DataError(
            f"Cannot download {url} ({reason}): {host} is unreachable or the transfer failed. "
            f"Download the file by hand (on a machine with internet access) and put it at "
            f"{dest}, then run again."
        )

    try:
        with atomic_write(dest) as out:
            digest = hashlib.md5()
            try:
                _probe(url, connect_timeout)
                response = urllib.request.urlopen(url, timeout=max(read_timeout, connect_timeout))
            except (OSError, ValueError, http.client.HTTPException) as e:
                raise network_error(e) from e
            with response:
                while True:
                    try:
                        chunk = response.read(1 << 20)
                    except (OSError, http.client.HTTPException) as e:
                        raise network_error(e) from e
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
            if md5 is not None and digest.hexdigest() != md5.lower():
                raise DataError(
                    f"Downloaded {url} but its MD5 is {digest.hexdigest()}, not {md5}: the "
                    f"download is corrupt or the file changed upstream. Nothing was saved at "
                    f"{dest}; try again, or put a verified copy there by hand."
                )
    except OSError as e:  # the temp file: cannot create, write (disk full) or move it into place
        raise DataError(f"Cannot write {dest} ({e}). Check the disk space and permissions.") from e
    return dest


# --------------------------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MovieLensSpec:
    """One GroupLens MovieLens release: where to get it and what the ratings table must hold."""

    name: str
    url: str
    md5: str  # of the zip, as published by GroupLens
    member: str  # the ratings file inside the zip
    reader: Callable[[PathLike], pd.DataFrame]
    n_rows: int
    n_users: int
    n_items: int
    table_sha256: str | None = None  # table_checksum() of the ratings, where pinned

    @property
    def filename(self) -> str:
        """File name of the extracted ratings file (e.g. ``u.data``)."""
        return PurePosixPath(self.member).name


def table_checksum(df: pd.DataFrame) -> str:
    """SHA-256 of the ratings table, independent of row order.

    Hashes the little-endian int64 array of rows ``(user, item, round(2*rating), timestamp)``
    sorted by (user, item, timestamp, rating); NaN ratings/timestamps hash as int64 min. Needs
    integer user/item ids.
    """
    if not (
        pd.api.types.is_integer_dtype(df["user"].dtype)
        and pd.api.types.is_integer_dtype(df["item"].dtype)
    ):
        raise ValueError("table_checksum needs integer user and item ids")
    sentinel = np.iinfo(np.int64).min

    def to_int(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return np.where(np.isnan(v), sentinel, np.rint(np.nan_to_num(v))).astype(np.int64)

    user = df["user"].to_numpy(dtype=np.int64)
    item = df["item"].to_numpy(dtype=np.int64)
    rating = to_int(df["rating"].to_numpy(dtype=np.float64) * 2)
    ts = to_int(df["timestamp"].to_numpy(dtype=np.float64))
    order = np.lexsort((rating, ts, item, user))
    table = np.stack([user, item, rating, ts], axis=1)[order]
    return hashlib.sha256(np.ascontiguousarray(table, dtype="<i8").tobytes()).hexdigest()


# table_checksum() of ML-100K, computed from ml-100k.inter in the recbole-1.2.1 wheel. That file is
# GroupLens's u.data plus a header row: without the header its SHA-256 is 06416e59...dca490, the
# value other projects pin for u.data, so the GroupLens route gives the same checksum.
ML100K_TABLE_SHA256 = "2e410ef216ca4e1a4e6ac05148fac2ca2972f450c1523d5225dd913d2a1fa58c"

_GL = "https://files.grouplens.org/datasets/movielens"
MOVIELENS: dict[str, MovieLensSpec] = {
    "ml100k": MovieLensSpec(
        "ml100k",
        f"{_GL}/ml-100k.zip",
        "0e33842e24a9c977be4e0107933c0723",
        "ml-100k/u.data",
        read_ml100k,
        100_000,
        943,
        1_682,
        ML100K_TABLE_SHA256,
    ),
    "ml1m": MovieLensSpec(
        "ml1m",
        f"{_GL}/ml-1m.zip",
        "c4d9eecfca2ab87c1945afe126590906",
        "ml-1m/ratings.dat",
        read_ml1m,
        1_000_209,
        6_040,
        3_706,
    ),
    "ml20m": MovieLensSpec(
        "ml20m",
        f"{_GL}/ml-20m.zip",
        "cd245b17a1ae2cc31bb14903e1204af3",
        "ml-20m/ratings.csv",
        read_ml20m,
        20_000_263,
        138_493,
        26_744,
    ),
    "ml25m": MovieLensSpec(
        "ml25m",
        f"{_GL}/ml-25m.zip",
        "6b51fb2759a8657d3bfcbfc42b592ada",
        "ml-25m/ratings.csv",
        read_ml20m,
        25_000_095,
        162_541,
        59_047,
    ),
}

# Offline route for ML-100K: RecBole's wheel on PyPI ships the same ratings as ml-100k.inter.
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL_GLOB = "recbole-1.2.1-*.whl"
RECBOLE_INTER_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ML100K_INTER_NAME = "ml-100k.inter"
PIP_TIMEOUT_S = 300


def _count_distinct(ids: pd.Series) -> int:
    """``ids.nunique()``; small-range integer ids (MovieLens) are counted with a bincount."""
    values = ids.to_numpy()
    if values.dtype.kind == "i" and len(values):
        low, high = int(values.min()), int(values.max())
        if high - low < 4 * len(values) + 1024:
            return int(np.count_nonzero(np.bincount(values - low)))
    return int(ids.nunique())


def _verify(df: pd.DataFrame, path: Path, spec: MovieLensSpec, *, user_given: bool) -> None:
    """Counts (and the pinned table checksum) must match the spec, else DataError."""
    fix = (
        "Check data.path: it must point to the original file."
        if user_given
        else "Delete it so that it is downloaded again."
    )
    got = (len(df), _count_distinct(df["user"]), _count_distinct(df["item"]))
    want = (spec.n_rows, spec.n_users, spec.n_items)
    if got != want:
        raise DataError(
            f"{path}: has {got[0]:,} ratings, {got[1]:,} users and {got[2]:,} items, but "
            f"{spec.name} has {want[0]:,}, {want[1]:,} and {want[2]:,}: the file is truncated, "
            f"modified or not the {spec.name} ratings file. {fix}"
        )
    if spec.table_sha256 is not None:
        checksum = table_checksum(df)
        if checksum != spec.table_sha256:
            raise DataError(
                f"{path}: the counts match {spec.name} but its contents do not (table checksum "
                f"{checksum[:16]}..., expected {spec.table_sha256[:16]}...): the file was "
                f"modified. {fix}"
            )


def _read_ml100k_any(path: Path) -> pd.DataFrame:
    return read_recbole_inter(path) if path.suffix == ".inter" else read_ml100k(path)


def _pip_download_recbole(dest_dir: Path) -> Path:
    """``pip download`` the RecBole wheel (no deps, never installed) into dest_dir; -> the wheel.

    pip saves into a temporary dir next to dest_dir; only a complete wheel is moved into place,
    so an interrupted download never leaves a partial wheel in the cache."""
    cached = sorted(dest_dir.glob(RECBOLE_WHEEL_GLOB))
    if cached:
        return cached[0]
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-") as staging:
        wheel = _pip_download(Path(staging))
        final = dest_dir / wheel.name
        os.replace(wheel, final)
    return final


def _pip_download(dest_dir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        RECBOLE_REQUIREMENT,
        "-d",
        str(dest_dir),
    ]
    log.info("ML-100K: fetching the %s wheel from the package index: %s", RECBOLE_REQUIREMENT, cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"`pip download {RECBOLE_REQUIREMENT}` failed: {e}") from e
    wheels = sorted(dest_dir.glob(RECBOLE_WHEEL_GLOB))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise DataError(
            f"`pip download {RECBOLE_REQUIREMENT}` failed (exit {proc.returncode}): "
            f"{' | '.join(tail) or 'no wheel was saved'}"
        )
    return wheels[0]


def _ml100k_from_recbole(ds_dir: Path) -> Path:
    """Offline route: extract ``ml-100k.inter`` from the RecBole wheel into ds_dir."""
    wheel = _pip_download_recbole(ds_dir / "wheel")
    return _extract_member(wheel, RECBOLE_INTER_MEMBER, ds_dir / ML100K_INTER_NAME)


def _ml_from_grouplens(spec: MovieLensSpec, ds_dir: Path, connect_timeout: float) -> Path:
    """Download (or reuse a hand-placed, MD5-checked) zip and extract the ratings member."""
    archive = ds_dir / PurePosixPath(urllib.parse.urlsplit(spec.url).path).name
    if archive.is_file():
        got = _md5_of(archive)
        if got != spec.md5:
            raise DataError(
                f"{archive}: MD5 is {got}, not the published {spec.md5}; the archive is corrupt "
                f"or truncated. Delete it so that it is downloaded again."
            )
        log.info("%s: using the archive already at %s", spec.name, archive)
    else:
        log.info("%s: downloading %s", spec.name, spec.url)
        download(spec.url, archive, md5=spec.md5, connect_timeout=connect_timeout)
    return _extract_member(archive, spec.member, ds_dir / spec.filename)


def load_movielens(
    name: str,
    *,
    cache_dir: Path | None = None,
    path: Path | None = None,
    connect_timeout: float = 5.0,
) -> pd.DataFrame:
    """Load a MovieLens ratings table, verified against the published counts (and, for ML-100K,
    a table checksum).

    With ``path``: read that file. Otherwise use ``<cache_dir>/<name>/``: the extracted ratings
    file if present, else the GroupLens zip (downloaded, MD5-checked, only the ratings member
    extracted). For ``ml100k`` only, when GroupLens fails, the same table is taken from the
    RecBole 1.2.1 wheel fetched with ``pip download`` (never installed).
    """
    spec = MOVIELENS.get(name)
    if spec is None:
        raise DataError(
            f"Unknown MovieLens dataset {name!r} (data.source); choose one of {sorted(MOVIELENS)}."
        )
    read = _read_ml100k_any if name == "ml100k" else spec.reader

    if path is not None:
        path = Path(path)
        log.info("%s: reading %s (data.path)", name, path)
        df = read(path)
        _verify(df, path, spec, user_given=True)
        return df

    ds_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ds_dir = ds_dir / name
    candidates = [ds_dir / spec.filename]
    if name == "ml100k":
        candidates.append(ds_dir / ML100K_INTER_NAME)
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        log.info("%s: using the cached file %s", name, found)
    else:
        try:
            found = _ml_from_grouplens(spec, ds_dir, connect_timeout)
            log.info("%s: downloaded from GroupLens to %s", name, found)
        except DataError as grouplens_error:
            if name != "ml100k":
                raise DataError(
                    f"Cannot get {name}. {grouplens_error} Alternatively put {spec.member!r} "
                    f"(from that zip) at {ds_dir / spec.filename}, or pass data.path=<the file>."
                ) from grouplens_error
            log.warning(
                "ml100k: GroupLens download failed (%s); trying the offline route: the RecBole "
                "wheel from the package index",
                grouplens_error.__cause__ or grouplens_error,
            )
            try:
                found = _ml100k_from_recbole(ds_dir)
            except DataError as recbole_error:
                raise DataError(
                    f"Cannot get ML-100K. GroupLens: {grouplens_error} The offline route (the "
                    f"{RECBOLE_REQUIREMENT} wheel from the package index) also failed: "
                    f"{recbole_error} Fix: put ML-100K's u.data at {ds_dir / spec.filename} (or "
                    f"ml-100k.zip at {ds_dir / 'ml-100k.zip'}), or pass data.path=<your u.data>."
                ) from recbole_error
            log.info("ml100k: extracted from the %s wheel to %s", RECBOLE_REQUIREMENT, found)
    df = read(found)
    _verify(df, found, spec, user_given=False)
    return df
