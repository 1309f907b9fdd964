"""Tests for recsys_compress.data.sources: small files written here, no network."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys_compress.data import sources
from recsys_compress.data.sources import (
    MOVIELENS,
    default_cache_dir,
    download,
    load_movielens,
    read_interaction_file,
    read_ml1m,
    read_ml20m,
    read_ml100k,
    read_recbole_inter,
    table_checksum,
)
from recsys_compress.errors import DataError

ROWS = [(196, 242, 3, 881250949), (186, 302, 3, 891717742), (22, 377, 1, 878887116)]
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _u_data(path: Path, rows=ROWS) -> Path:
    return _write(path, "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))


def _inter(path: Path, rows=ROWS) -> Path:
    return _write(path, INTER_HEADER + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))


def _assert_standard(df: pd.DataFrame) -> None:
    assert list(df.columns) == ["user", "item", "rating", "timestamp"]
    assert df["rating"].dtype == np.float32
    assert df["timestamp"].dtype == np.float64


def _assert_rows(df: pd.DataFrame, rows=ROWS) -> None:
    _assert_standard(df)
    assert df["user"].dtype == np.int64 and df["item"].dtype == np.int64
    assert df.to_numpy().tolist() == [list(map(float, r)) for r in rows]


def _assert_no_temp_files(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


# --- fixed-format readers --------------------------------------------------------------------


def test_read_ml100k(tmp_path):
    _assert_rows(read_ml100k(_u_data(tmp_path / "u.data")))


def test_read_ml1m_double_colon(tmp_path):
    path = _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    df = read_ml1m(path)
    _assert_rows(df, [(1, 1193, 5, 978300760), (2, 661, 3, 978302109)])


def test_read_ml20m_half_stars(tmp_path):
    text = "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,0.5,1112484676\n"
    df = read_ml20m(_write(tmp_path / "ratings.csv", text))
    _assert_standard(df)
    assert df["rating"].tolist() == [3.5, 0.5]
    assert df["item"].tolist() == [2, 29]


def test_read_ml20m_wrong_header(tmp_path):
    path = _write(tmp_path / "ratings.csv", "user,movie,rating,timestamp\n1,2,3.5,1112486027\n")
    with pytest.raises(DataError, match=r"ratings\.csv.*header.*Delete it"):
        read_ml20m(path)


def test_read_recbole_inter(tmp_path):
    _assert_rows(read_recbole_inter(_inter(tmp_path / "x.inter")))


def test_read_recbole_inter_string_tokens(tmp_path):
    path = _write(tmp_path / "x.inter", INTER_HEADER + "u1\t007\t4\t10\nu2\t7\t5\t11\n")
    df = read_recbole_inter(path)
    assert df["user"].tolist() == ["u1", "u2"]
    assert df["item"].tolist() == ["007", "7"]  # "007" is not the integer 7
    assert pd.api.types.is_string_dtype(df["item"].dtype)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("196\t242\t3\t881250949\n186\t30", "truncated last line"),
        ("196\t242\t3\t881250949\n186\t302\t3\t891717742\t9\n", "extra column"),
        ("196\t242\tthree\t881250949\n", "unparsable rating"),
        ("196|242|3|881250949\n", "wrong separator"),
        ("", "empty"),
    ],
)
def test_read_ml100k_corrupt(tmp_path, text, why):
    path = _write(tmp_path / "u.data", text)
    with pytest.raises(DataError) as err:
        read_ml100k(path)
    msg = str(err.value)
    assert str(path) in msg, why
    assert "corrupt or truncated" in msg and "Delete it" in msg, why


def test_read_ml100k_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.data.*not found.*data\.path"):
        read_ml100k(tmp_path / "nothere.data")


# --- generic reader --------------------------------------------------------------------------


def test_csv_custom_columns(tmp_path):
    text = "uid,movie,stars,when,extra\n196,242,3,881250949,x\n186,302,3,891717742,y\n"
    path = _write(tmp_path / "r.csv", text)
    df = read_interaction_file(
        path, user_col="uid", item_col="movie", rating_col="stars", timestamp_col="when"
    )
    _assert_rows(df, ROWS[:2])


def test_tsv_by_suffix_and_custom_sep(tmp_path):
    header = "user_id\titem_id\trating\ttimestamp\n"
    tsv = _write(tmp_path / "r.tsv", header + "196\t242\t3\t881250949\n")
    _assert_rows(read_interaction_file(tsv), ROWS[:1])
    semi = _write(tmp_path / "r.txt", "user_id;item_id;rating;timestamp\n196;242;3;881250949\n")
    _assert_rows(read_interaction_file(semi, sep=";"), ROWS[:1])
    _assert_rows(read_interaction_file(semi), ROWS[:1])  # sniffed


def test_parquet(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame(
        {"u": ["a", "b"], "i": [10, 20], "r": [4.5, 1.0], "t": pd.to_datetime(["1970-01-02"] * 2)}
    ).to_parquet(path)
    df = read_interaction_file(path, user_col="u", item_col="i", rating_col="r", timestamp_col="t")
    _assert_standard(df)
    assert df["user"].tolist() == ["a", "b"]
    assert df["item"].dtype == np.int64 and df["item"].tolist() == [10, 20]
    assert df["rating"].tolist() == [4.5, 1.0]
    assert df["timestamp"].tolist() == [86400.0, 86400.0]


def test_string_ids_and_no_rating_or_timestamp(tmp_path):
    path = _write(tmp_path / "r.csv", "user_id,item_id\nalice,B00X\nNA,42\n")
    df = read_interaction_file(path, rating_col=None, timestamp_col=None)
    _assert_standard(df)
    assert df["user"].tolist() == ["alice", "NA"]  # "NA" is an id, not a missing value
    assert df["item"].tolist() == ["B00X", "42"]
    assert df["rating"].isna().all() and df["timestamp"].isna().all()


def test_iso_timestamps(tmp_path):
    text = (
        "user_id,item_id,rating,timestamp\n"
        "1,2,5,2000-01-01\n1,3,4,2000-01-01T00:00:10Z\n2,2,3,2000-01-01T01:00:00+01:00\n"
    )
    df = read_interaction_file(_write(tmp_path / "r.csv", text))
    assert df["timestamp"].tolist() == [946684800.0, 946684810.0, 946684800.0]


def test_recbole_typed_header_matches_plain_names(tmp_path):
    _assert_rows(read_interaction_file(_inter(tmp_path / "x.inter")))


def test_missing_column_lists_columns_and_key(tmp_path):
    path = _write(tmp_path / "r.csv", "user,item,rating\n1,2,3\n")
    with pytest.raises(DataError) as err:
        read_interaction_file(path, timestamp_col=None)
    msg = str(err.value)
    assert "r.csv" in msg and "data.user_col" in msg and "data.item_col" in msg
    assert "['user', 'item', 'rating']" in msg


def test_bad_rating_names_value_and_row(tmp_path):
    path = _write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\n1,2,5,1\n1,3,five,2\n")
    with pytest.raises(DataError) as err:
        read_interaction_file(path)
    msg = str(err.value)
    assert "r.csv" in msg and "data.rating_col" in msg and "'five'" in msg
    assert "data row 2 (line 3" in msg


def test_bad_timestamp(tmp_path):
    path = _write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\n1,2,5,1\n1,3,4,soon\n")
    with pytest.raises(DataError, match=r"r\.csv.*data\.timestamp_col.*'soon'.*data row 2"):
        read_interaction_file(path)


def test_missing_item_id(tmp_path):
    path = _write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\n1,,5,1\n")
    with pytest.raises(DataError, match=r"r\.csv.*data\.item_col.*data row 1"):
        read_interaction_file(path)


def test_truncated_csv(tmp_path):
    path = _write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\n1,2,5,1\n1,3")
    with pytest.raises(DataError, match=r"r\.csv.*data\.rating_col.*data row 2"):
        read_interaction_file(path)


def test_unknown_format(tmp_path):
    path = _write(tmp_path / "r.csv", "user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"data\.format"):
        read_interaction_file(path, fmt="xlsx")


# --- download --------------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def test_download_file_url_md5_ok(tmp_path):
    src = _zip(tmp_path / "src.zip", {"a/b.txt": "hello"})
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest_dir = tmp_path / "cache"
    dest = download(src.as_uri(), dest_dir / "got.zip", md5=md5)
    assert dest.read_bytes() == src.read_bytes()
    _assert_no_temp_files(dest_dir)


def test_download_md5_mismatch_leaves_nothing(tmp_path):
    src = _zip(tmp_path / "src.zip", {"a/b.txt": "hello"})
    dest_dir = tmp_path / "cache"
    with pytest.raises(DataError, match="MD5"):
        download(src.as_uri(), dest_dir / "got.zip", md5="0" * 32)
    assert list(dest_dir.iterdir()) == []


def test_download_unreachable_fails_fast(tmp_path):
    dest = tmp_path / "cache" / "x.zip"
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        download("http://127.0.0.1:9/x.zip", dest, md5=None, connect_timeout=2.0)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "127.0.0.1 is unreachable" in msg and str(dest) in msg
    assert list(dest.parent.iterdir()) == []


# --- load_movielens --------------------------------------------------------------------------


def _small_ml100k_spec(df: pd.DataFrame, **changes) -> sources.MovieLensSpec:
    """The ml100k spec with the counts (and checksum) of a small table."""
    fields = {
        "n_rows": len(df),
        "n_users": df["user"].nunique(),
        "n_items": df["item"].nunique(),
        "table_sha256": table_checksum(df),
    }
    fields.update(changes)
    return dataclasses.replace(MOVIELENS["ml100k"], **fields)


def _fail_download(*args, **kwargs):
    raise DataError("files.grouplens.org is unreachable (test)")


def test_load_movielens_path_count_mismatch(tmp_path):
    path = _u_data(tmp_path / "u.data")
    with pytest.raises(DataError) as err:
        load_movielens("ml100k", path=path)
    msg = str(err.value)
    assert str(path) in msg and "100,000" in msg and "data.path" in msg


def test_load_movielens_checksum_mismatch(tmp_path, monkeypatch):
    good = read_ml100k(_u_data(tmp_path / "good.data"))
    monkeypatch.setitem(MOVIELENS, "ml100k", _small_ml100k_spec(good))
    assert load_movielens("ml100k", path=tmp_path / "good.data").equals(good)
    changed = [(196, 242, 4, 881250949), *ROWS[1:]]  # same counts, one rating edited
    path = _u_data(tmp_path / "u.data", changed)
    with pytest.raises(DataError, match=r"u\.data.*checksum"):
        load_movielens("ml100k", path=path)


def test_load_movielens_from_hand_placed_zip(tmp_path, monkeypatch):
    archive = _zip(
        tmp_path / "ml-100k.zip",
        {"ml-100k/u.data": "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS), "x/y": "z"},
    )
    expected = read_ml100k(_u_data(tmp_path / "ref.data"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(MOVIELENS, "ml100k", _small_ml100k_spec(expected, md5=md5))
    monkeypatch.setattr(sources, "download", _fail_download)
    cache = tmp_path / "cache"
    (cache / "ml100k").mkdir(parents=True)
    archive.rename(cache / "ml100k" / "ml-100k.zip")
    _assert_rows(load_movielens("ml100k", cache_dir=cache))
    assert sorted(p.name for p in (cache / "ml100k").iterdir()) == ["ml-100k.zip", "u.data"]
    (cache / "ml100k" / "ml-100k.zip").unlink()
    _assert_rows(load_movielens("ml100k", cache_dir=cache))  # now from the extracted file


def test_load_movielens_downloads_and_extracts_only_the_member(tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    ratings = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS)
    archive = _zip(server / "ml-100k.zip", {"ml-100k/u.data": ratings, "ml-100k/u.item": "x"})
    expected = read_ml100k(_u_data(tmp_path / "ref.data"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    spec = _small_ml100k_spec(expected, md5=md5, url=archive.as_uri())
    monkeypatch.setitem(MOVIELENS, "ml100k", spec)
    monkeypatch.setattr(sources, "_pip_download_recbole", pytest.fail)
    cache = tmp_path / "cache"
    _assert_rows(load_movielens("ml100k", cache_dir=cache))
    assert sorted(p.name for p in (cache / "ml100k").iterdir()) == ["ml-100k.zip", "u.data"]


def test_download_failing_midway_leaves_no_partial_file_and_a_retry_works(tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    ratings = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS)
    archive = _zip(server / "ml-100k.zip", {"ml-100k/u.data": ratings})
    expected = read_ml100k(_u_data(tmp_path / "ref.data"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(MOVIELENS, "ml100k", _small_ml100k_spec(expected, md5=md5))
    monkeypatch.setattr(sources, "_probe", lambda url, timeout: None)

    class Dropped:
        """Sends the first half of the archive, then the connection resets."""

        def __init__(self) -> None:
            self.chunks = [archive.read_bytes()[: archive.stat().st_size // 2]]

        def read(self, size: int) -> bytes:
            if self.chunks:
                return self.chunks.pop()
            raise ConnectionResetError("connection reset by peer")

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: Dropped())

    def no_pip(dest_dir: Path) -> Path:
        raise DataError("`pip download recbole==1.2.1` failed (test)")

    monkeypatch.setattr(sources, "_pip_download_recbole", no_pip)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="connection reset"):
        load_movielens("ml100k", cache_dir=cache)
    assert list((cache / "ml100k").iterdir()) == []  # no partial zip, no temp file
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: archive.open("rb"))
    _assert_rows(load_movielens("ml100k", cache_dir=cache))
    assert sorted(p.name for p in (cache / "ml100k").iterdir()) == ["ml-100k.zip", "u.data"]


def test_interrupted_pip_download_leaves_no_partial_wheel(tmp_path, monkeypatch):
    def interrupted(staging: Path) -> Path:
        (staging / "recbole-1.2.1-py3-none-any.whl").write_bytes(b"PK partial")
        raise DataError("`pip download recbole==1.2.1` failed (test)")

    monkeypatch.setattr(sources, "_pip_download", interrupted)
    with pytest.raises(DataError, match="pip download"):
        sources._pip_download_recbole(tmp_path / "wheel")
    assert list((tmp_path / "wheel").iterdir()) == []


def test_load_movielens_bad_cached_zip(tmp_path):
    ds_dir = tmp_path / "ml1m"
    ds_dir.mkdir()
    _zip(ds_dir / "ml-1m.zip", {"ml-1m/ratings.dat": "1::2::3::4\n"})
    with pytest.raises(DataError, match=r"ml-1m\.zip.*MD5.*Delete it"):
        load_movielens("ml1m", cache_dir=tmp_path)


def test_load_movielens_ml100k_offline_route(tmp_path, monkeypatch, caplog):
    expected = read_ml100k(_u_data(tmp_path / "ref.data"))
    monkeypatch.setitem(MOVIELENS, "ml100k", _small_ml100k_spec(expected))
    monkeypatch.setattr(sources, "download", _fail_download)
    calls = []

    def fake_pip_download(dest_dir: Path) -> Path:
        calls.append(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        rows = [ROWS[2], ROWS[0], ROWS[1]]  # another row order: same table checksum
        return _zip(
            dest_dir / "recbole-1.2.1-py3-none-any.whl",
            {
                "recbole/__init__.py": "",
                sources.RECBOLE_INTER_MEMBER: INTER_HEADER
                + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows),
                "recbole/dataset_example/ml-100k/ml-100k.item": "junk",
            },
        )

    monkeypatch.setattr(sources, "_pip_download_recbole", fake_pip_download)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger=sources.__name__):
        df = load_movielens("ml100k", cache_dir=cache)
    assert calls == [cache / "ml100k" / "wheel"]
    assert sorted(map(tuple, df.to_numpy().tolist())) == sorted(map(tuple, expected.to_numpy()))
    assert sorted(p.name for p in (cache / "ml100k").iterdir()) == ["ml-100k.inter", "wheel"]
    assert "RecBole" in caplog.text
    load_movielens("ml100k", cache_dir=cache)  # cached: neither route runs again
    assert len(calls) == 1


def test_load_movielens_ml100k_both_routes_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "download", _fail_download)

    def no_pip(dest_dir: Path) -> Path:
        raise DataError("`pip download recbole==1.2.1` failed (test)")

    monkeypatch.setattr(sources, "_pip_download_recbole", no_pip)
    with pytest.raises(DataError) as err:
        load_movielens("ml100k", cache_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "ml100k" / "u.data") in msg and "data.path" in msg
    assert "unreachable" in msg and "pip download" in msg


def test_load_movielens_other_datasets_have_no_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "download", _fail_download)
    monkeypatch.setattr(sources, "_pip_download_recbole", pytest.fail)
    with pytest.raises(DataError, match="unreachable"):
        load_movielens("ml1m", cache_dir=tmp_path)


def test_load_movielens_unknown_name():
    with pytest.raises(DataError, match=r"data\.source"):
        load_movielens("ml10k")


# --- helpers ---------------------------------------------------------------------------------


def test_table_checksum_order_invariant():
    df = pd.DataFrame(ROWS, columns=["user", "item", "rating", "timestamp"]).astype(
        {"rating": np.float32, "timestamp": np.float64}
    )
    shuffled = df.iloc[[2, 0, 1]].reset_index(drop=True)
    assert table_checksum(df) == table_checksum(shuffled)
    edited = df.copy()
    edited.loc[0, "timestamp"] += 1
    assert table_checksum(edited) != table_checksum(df)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_COMPRESS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("RECSYS_COMPRESS_CACHE")
    assert "recsys-compress" in str(default_cache_dir())


def test_spec_table():
    assert MOVIELENS["ml100k"].md5 == "0e33842e24a9c977be4e0107933c0723"
    assert MOVIELENS["ml1m"].md5 == "c4d9eecfca2ab87c1945afe126590906"
    assert MOVIELENS["ml25m"].reader is read_ml20m
    assert MOVIELENS["ml100k"].table_sha256 == sources.ML100K_TABLE_SHA256
    assert all(s.url.startswith("https://files.grouplens.org/") for s in MOVIELENS.values())
