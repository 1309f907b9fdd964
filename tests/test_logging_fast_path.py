"""``self.log`` without Lightning's per-call walk of the logged result (recsys_compress.module)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.connectors.logger_connector.result import (
    _Metadata,
    _ResultMetric,
    _Sync,
)
from torchmetrics import MeanMetric

from recsys_compress import module as module_mod


def result(is_tensor: bool = True) -> _ResultMetric:
    meta = _Metadata(fx="on_train_epoch_end", name="x")
    meta.sync = _Sync()
    metric = _ResultMetric(meta, is_tensor)
    if is_tensor:
        metric.update(torch.tensor(0.5), 2)
    return metric


def test_installed_on_the_pinned_lightning() -> None:
    # A new Lightning: check its _ResultMetric.to against _result_to, then move the version.
    assert L.__version__ == "2.6.6"
    assert _ResultMetric.to is module_mod._result_to


def test_nothing_to_move_returns_the_result_as_it_is() -> None:
    metric = result()
    meta, value = metric.meta, metric.value
    assert metric.to(torch.device("cpu")) is metric
    # Lightning's walk rebuilds every attribute (its metadata deep-copied); here none changed.
    assert metric.meta is meta and metric.value is value
    assert float(metric.compute()) == 0.5


def test_another_device_takes_lightnings_path_and_moves_every_tensor() -> None:
    metric = result()
    meta = metric.meta
    metric.to(torch.device("meta"))
    assert metric.meta is not meta  # walked
    assert metric.value.device.type == "meta"
    assert metric.cumulated_batch_size.device.type == "meta"
    assert all(t.device.type == "meta" for t in metric._defaults.values())


def test_a_tensor_in_a_container_elsewhere_takes_lightnings_path() -> None:
    metric = result().to(torch.device("meta"))
    metric._defaults["value"] = torch.tensor(0.0)  # left on the CPU
    meta = metric.meta
    metric.to(torch.device("meta"))
    assert metric.meta is not meta
    assert metric._defaults["value"].device.type == "meta"


def test_a_logged_metric_object_takes_lightnings_path() -> None:
    metric = result(is_tensor=False)
    meta = metric.meta
    metric.to(torch.device("cpu"))
    assert metric.meta is not meta


class Logs(L.LightningModule):
    """Logs per-step values and a metric object; epoch means must be Lightning's."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.mean = MeanMetric()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        value = torch.tensor(float(batch_idx + 10 * self.current_epoch))
        self.log("step_value", value, on_step=False, on_epoch=True, batch_size=1)
        self.mean.update(value)
        self.log("mean_metric", self.mean, on_step=False, on_epoch=True)
        return (self.w**2).sum()

    def on_train_epoch_end(self) -> None:
        self.log("epoch_float", 1.5 + self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_logged_values_reach_the_trainer_as_before() -> None:
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Logs(), train_dataloaders=torch.utils.data.DataLoader(range(4), batch_size=None))
    logged = trainer.callback_metrics
    # Second epoch: steps 10..13, mean 11.5; the metric object the same; the float as logged.
    assert float(logged["step_value"]) == 11.5
    assert float(logged["mean_metric"]) == 11.5
    assert float(logged["epoch_float"]) == 2.5
