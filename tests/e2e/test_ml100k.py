"""Integration on the real MovieLens-100K (fetched through the offline route when GroupLens is
unreachable, into this test's own cache): the data is verified and MF learns it."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_compress.train import train
from tests.e2e.test_train import compose_config


@pytest.mark.slow
def test_mf_on_real_ml100k_reaches_min_ndcg(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "compression=none",
            "trainer.max_epochs=5",
            "trainer.progress_bar=false",
            "trainer.early_stopping_patience=null",
            "optim.lr=0.005",
            "optim.embedding_weight_decay=1e-5",
            "logger=none",
        ]
    )
    record = train(cfg, tmp_path)
    assert record["data"]["num_users"] == 943 and record["data"]["num_items"] == 1682
    assert (
        record["data"]["num_train"] + record["data"]["num_val"] + record["data"]["num_test"]
        == 100_000
    )
    # Popularity ranking scores NDCG@10 0.140 and HR@10 0.579 on this split (seed 42).
    assert record["test"]["ndcg@10"] > 0.24
    assert record["test"]["hr@10"] > 0.70
