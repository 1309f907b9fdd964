"""Shared test fixtures: every test gets its own data cache, so runs never touch the user's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "RECSYS_COMPRESS_TEST_REAL_CACHE" not in os.environ:
        monkeypatch.setenv("RECSYS_COMPRESS_CACHE", str(tmp_path / "cache"))
