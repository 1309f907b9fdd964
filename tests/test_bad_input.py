"""Bad input fails early with an error that names the key or file and the fix.

Every numeric config field has a range check (walked from the schema, so a new field without
one fails here); full disks, mismatched checkpoints and tampered artifacts give clear errors
and leave earlier files intact; skip_completed keeps completed runs.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from recsys_compress.compression.codec import payload_checksum
from recsys_compress.config import ModelConfig, TrainConfig, config_to_dict, to_train_config
from recsys_compress.errors import ConfigError, DataError, OutputWriteError, RunDirInUseError
from recsys_compress.export import (
    CHECKSUM,
    export_model,
    export_run,
    load_compressed,
    unpack_metadata,
)
from recsys_compress.models import MLP, build_model
from recsys_compress.results import (
    RESULTS_FILE,
    completed_run,
    save_state_dict,
    write_failure,
    write_json,
)
from tests.e2e.test_train import run_cli


def numeric_fields(cls: type = TrainConfig, prefix: str = "") -> dict[str, type]:
    """Dotted key -> int / float for every numeric field of the schema (compression included)."""
    found: dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            found.update(numeric_fields(args[0], f"{prefix}{field.name}."))
        elif len(args) == 1 and args[0] in (int, float):
            found[f"{prefix}{field.name}"] = args[0]
    return found


def nested(key: str, value: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"a": {"b": value}} for "a.b", merged with dotted ``extra`` overrides."""
    out: dict[str, Any] = {}
    for dotted, v in {**(extra or {}), key: value}.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    return out


# key -> (an out-of-range value, other keys it needs to be checked)
OUT_OF_RANGE: dict[str, tuple[Any, dict[str, Any]]] = {
    "data.connect_timeout": (0.05, {}),
    "data.rating_threshold": (math.inf, {}),
    "data.min_user_interactions": (-1, {}),
    "data.min_item_interactions": (-1, {}),
    "data.synthetic.num_users": (0, {}),
    "data.synthetic.num_items": (1, {}),
    "data.synthetic.interactions_per_user": (0, {}),
    "data.synthetic.seed": (-1, {}),
    "split.seed": (-1, {}),
    "model.dim": (0, {}),
    "model.mlp_dim": (0, {}),
    "model.dropout": (1.0, {}),
    "model.init_std": (-0.1, {}),
    "model.alpha": (1.5, {}),
    "loss.num_negatives": (0, {}),
    "eval.num_negatives": (0, {}),
    "eval.seed": (-1, {}),
    "eval.batch_users": (0, {}),
    "optim.lr": (0.0, {}),
    "optim.weight_decay": (-1e-4, {}),
    "optim.embedding_weight_decay": (-1e-4, {}),
    "optim.momentum": (-0.5, {}),
    "optim.step_size": (0, {}),
    "optim.gamma": (2.0, {}),
    "trainer.max_epochs": (0, {}),
    "trainer.batch_size": (0, {}),
    "trainer.early_stopping_patience": (0, {}),
    "trainer.check_val_every_n_epoch": (0, {}),
    "trainer.limit_train_batches": (0.0, {}),
    "trainer.progress_refresh_rate": (0, {}),
    "trainer.gradient_clip_val": (-1.0, {}),
    "trainer.fast_dev_run": (-1, {}),
    "trainer.checkpoint_every_n_steps": (0, {}),
    "trainer.checkpoint_max_overhead": (0.0, {}),
    "trainer.batches_per_call": (0, {}),
    "trainer.overfit_batches": (2.5, {}),
    "compression.prune.sparsity": (1.0, {}),
    "compression.prune.embedding_sparsity": (1.2, {}),
    "compression.prune.linear_sparsity": (-0.1, {}),
    "compression.prune.threshold": (-1.0, {"compression.prune.sparsity": None}),
    "compression.prune.initial_sparsity": (1.0, {}),
    "compression.prune.start_step": (-1, {}),
    "compression.prune.end_step": (0, {}),
    "compression.prune.end_fraction": (0.0, {}),
    "compression.prune.frequency": (0, {}),
    "compression.prune.max_layer_sparsity": (0.0, {}),
    "compression.prune.rewind_step": (-1, {}),
    "compression.l1.strength": (-1e-4, {}),
    "compression.l1.embedding_strength": (-1.0, {}),
    "compression.l1.linear_strength": (-1.0, {}),
    "compression.l1.start_step": (-1, {}),
    "compression.l1.warmup_steps": (-1, {}),
    "compression.l1.final_threshold": (-1.0, {}),
    "compression.svd.rank": (0, {"compression.svd.param_ratio": None}),
    "compression.svd.param_ratio": (1.5, {}),
    "compression.svd.energy": (0.0, {"compression.svd.param_ratio": None}),
    "compression.svd.embedding_rank": (0, {}),
    "compression.svd.linear_rank": (0, {}),
    "compression.svd.at_epoch": (-1, {}),
    "compression.svd.oversample": (-1, {}),
    "compression.svd.niter": (-1, {}),
    "compression.qat.bits": (3, {}),
    "compression.qat.embedding_bits": (2, {}),
    "compression.qat.linear_bits": (16, {}),
    "compression.qat.group_size": (1, {"compression.qat.granularity": "per_group"}),
    "compression.qat.activation_bits": (5, {}),
    "compression.qat.start_epoch": (-1, {}),
    "compression.qat.freeze_epoch": (-1, {}),
    "compression.dense_epochs": (-1, {}),
    "compression.embedding_weight_decay": (-1.0, {}),
    "compression.lr": (0.0, {}),
    "seed": (-1, {}),
    "budget_bytes": (0, {}),
    "budget_ratio": (1.5, {}),
}
FLOAT_FIELDS = sorted(k for k, t in numeric_fields().items() if t is float)


def test_every_numeric_config_field_has_a_range_check_listed_here() -> None:
    assert sorted(numeric_fields()) == sorted(OUT_OF_RANGE)


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_out_of_range_value_names_the_key(key: str) -> None:
    value, extra = OUT_OF_RANGE[key]
    with pytest.raises(ConfigError) as info:
        to_train_config(nested(key, value, extra))
    assert key in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_non_finite_float_names_the_key(key: str, bad: float) -> None:
    _, extra = OUT_OF_RANGE[key]
    with pytest.raises(ConfigError) as info:
        to_train_config(nested(key, bad, extra))
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("trainer.precision", "8-bit"),
        ("trainer.accelerator", "npu"),
        ("trainer.strategy", "horovod"),
        ("trainer.devices", 0),
        ("trainer.devices", -2),
        ("trainer.devices", "two"),
        ("trainer.devices", []),
        ("trainer.devices", [0, 0]),
    ],
)
def test_bad_trainer_setting_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_train_config(nested(key, value))


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true", 64])
def test_qat_with_weights_not_in_float32_is_refused_before_training(precision: Any) -> None:
    """QAT's fake quantisation keeps float32 tables and scales: with half or double weights a
    run trained its first epoch and then failed at evaluation (a dtype mismatch)."""
    cfg = {"trainer": {"precision": precision}, "compression": {"qat": {}}}
    with pytest.raises(ConfigError, match=r"trainer\.precision=.*qat.*bf16-mixed"):
        to_train_config(cfg)
    # the mixed precisions keep float32 weights: accepted
    to_train_config({"trainer": {"precision": "bf16-mixed"}, "compression": {"qat": {}}})
    to_train_config({"trainer": {"precision": precision}, "compression": {"prune": {}}})


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_rowwise_adagrad_with_half_precision_state_is_refused(precision: str) -> None:
    optim = {"name": "rowwise_adagrad", "sparse": True, "embedding_weight_decay": 0.0}
    cfg = {"trainer": {"precision": precision}, "optim": optim}
    with pytest.raises(ConfigError, match=r"trainer\.precision=.*rowwise_adagrad.*bf16-mixed"):
        to_train_config({**cfg, "compression": {}})
    # float32 weights and state: accepted
    to_train_config({"trainer": {"precision": "bf16-mixed"}, "optim": optim, "compression": {}})


@pytest.mark.parametrize(
    ("optim", "key"),
    [
        ({"sparse": True}, "optim.embedding_weight_decay"),  # adam's default L2 on tables
        ({"sparse": True, "name": "adamw", "embedding_weight_decay": 0.0}, "optim.name"),
        (
            {"sparse": True, "name": "sgd", "momentum": 0.9, "embedding_weight_decay": 0.0},
            "optim.momentum",
        ),
        ({"name": "rowwise_adagrad"}, "optim.sparse=true"),  # row-wise needs sparse gradients
        ({"name": "rowwise_adagrad", "sparse": True}, "optim.embedding_weight_decay"),
    ],
)
def test_sparse_optimizer_without_support_names_the_key(optim: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_train_config({"optim": optim})


@pytest.mark.parametrize(
    "trainer",
    [
        {"precision": "bf16-mixed", "accelerator": "cpu", "strategy": "ddp_spawn", "devices": 2},
        {"precision": 16, "devices": "auto"},
        {"devices": -1, "accelerator": "gpu"},
        {"devices": [0, 1], "accelerator": "cuda"},
        {"devices": "0,1"},
    ],
)
def test_valid_trainer_settings_are_accepted(trainer: dict[str, Any]) -> None:
    to_train_config({"trainer": trainer})


# --- full disk ------------------------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write to a temp file of atomic_write fails with ENOSPC after 10 bytes."""
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, handle: Any) -> None:
            self.handle, self.written = handle, 0

        def write(self, data: bytes) -> int:
            if self.written + len(data) > 10:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def __enter__(self) -> FullFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

    monkeypatch.setattr(
        "recsys_compress.io.os.fdopen", lambda *a, **k: FullFile(real_fdopen(*a, **k))
    )


def _only_file(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_full_disk_keeps_the_previous_results_json(tmp_path: Path, full_disk: None) -> None:
    path = tmp_path / RESULTS_FILE
    path.write_text('{"status": "completed"}')
    with pytest.raises(OutputWriteError) as info:
        write_json(path, {"status": "completed", "test": {"ndcg@10": 0.3}})
    assert str(info.value).startswith(f"no space left on device while writing {path}; ")
    assert "the previous results.json is intact" in str(info.value)
    assert path.read_text() == '{"status": "completed"}'
    assert _only_file(tmp_path) == [RESULTS_FILE]  # no temp file left


def test_full_disk_while_saving_model_and_artifact(tmp_path: Path, full_disk: None) -> None:
    model = build_model(ModelConfig(name="mf", dim=4), 5, 6)
    with pytest.raises(OutputWriteError, match=r"while writing .*model\.pt; nothing was written"):
        save_state_dict(model, tmp_path / "model.pt")
    artifact = tmp_path / "model.compressed.safetensors"
    artifact.write_bytes(b"old")
    with pytest.raises(OutputWriteError, match=r"the previous model\.compressed\.safetensors is"):
        export_model(model, ModelConfig(name="mf", dim=4), np.arange(5), np.arange(6), artifact)
    assert artifact.read_bytes() == b"old"
    assert _only_file(tmp_path) == ["model.compressed.safetensors"]


# --- results.json of reruns -----------------------------------------------------------------


def _record(cfg: TrainConfig, status: str = "completed") -> dict[str, Any]:
    return {"status": status, "config": config_to_dict(cfg), "monitor": "val/ndcg@10"}


def test_completed_run_is_returned_only_for_the_same_config(tmp_path: Path) -> None:
    cfg = to_train_config({"data": {"source": "synthetic"}})
    assert completed_run(tmp_path, config_to_dict(cfg)) is None  # nothing there
    write_json(tmp_path / RESULTS_FILE, _record(cfg, "failed"))
    assert completed_run(tmp_path, config_to_dict(cfg)) is None  # failed: train again
    write_json(tmp_path / RESULTS_FILE, _record(cfg))
    rerun = dataclasses.replace(cfg, skip_completed=True)
    assert completed_run(tmp_path, config_to_dict(rerun))["status"] == "completed"
    other = to_train_config({"data": {"source": "synthetic"}, "model": {"dim": 8}})
    with pytest.raises(RunDirInUseError, match=r"model\.dim differs.*hydra\.sweep\.dir"):
        completed_run(tmp_path, config_to_dict(other))
    # the display and the checkpoints' spacing by time (which a resume may change) are not the
    # run's identity; the spacing by steps and the logger are
    shown = {"progress_bar": False, "progress_refresh_rate": 7, "checkpoint_max_overhead": 0.3}
    neutral = to_train_config({"data": {"source": "synthetic"}, "trainer": shown})
    assert completed_run(tmp_path, config_to_dict(neutral))["status"] == "completed"
    spaced = to_train_config(
        {"data": {"source": "synthetic"}, "trainer": {"checkpoint_every_n_steps": 7}}
    )
    with pytest.raises(RunDirInUseError, match=r"trainer\.checkpoint_every_n_steps differs"):
        completed_run(tmp_path, config_to_dict(spaced))
    (tmp_path / RESULTS_FILE).write_text("{truncated")
    assert completed_run(tmp_path, config_to_dict(cfg)) is None


def test_skip_completed_takes_an_l1_run_with_another_kernel_as_the_same_run(
    tmp_path: Path,
) -> None:
    """Rerunning a sweep with compression.l1.kernel=eager (e.g. without a C++ compiler) skips
    its completed L1 runs (the same values to the last place), where another λ is refused."""
    cfg = to_train_config({"data": {"source": "synthetic"}, "compression": {"l1": {}}})
    write_json(tmp_path / RESULTS_FILE, _record(cfg))
    eager = {"data": {"source": "synthetic"}, "compression": {"l1": {"kernel": "eager"}}}
    assert completed_run(tmp_path, config_to_dict(to_train_config(eager)))
    stronger = {"data": {"source": "synthetic"}, "compression": {"l1": {"strength": 1e-3}}}
    with pytest.raises(RunDirInUseError, match=r"compression\.l1\.strength differs"):
        completed_run(tmp_path, config_to_dict(to_train_config(stronger)))


def test_a_failure_never_replaces_a_completed_record(tmp_path: Path) -> None:
    failure = {"status": "failed", "error": "boom"}
    write_failure(tmp_path, failure)
    assert json.loads((tmp_path / RESULTS_FILE).read_text()) == failure
    write_json(tmp_path / RESULTS_FILE, {"status": "completed"})
    write_failure(tmp_path, failure)
    assert json.loads((tmp_path / RESULTS_FILE).read_text()) == {"status": "completed"}


# --- checkpoints and artifacts of another model -----------------------------------------------


def _fake_run(run_dir: Path, cfg: TrainConfig, state: dict[str, torch.Tensor] | bytes) -> None:
    """A finished run dir: results.json of ``cfg`` and a model.pt holding ``state``."""
    run_dir.mkdir(parents=True)
    write_json(run_dir / RESULTS_FILE, _record(cfg))
    if isinstance(state, bytes):
        (run_dir / "model.pt").write_bytes(state)
    else:
        torch.save(state, run_dir / "model.pt")


SYNTH = {"data": {"source": "synthetic"}, "model": {"name": "mf", "dim": 8}}


def test_export_of_a_model_pt_with_other_shapes_names_file_and_shapes(tmp_path: Path) -> None:
    cfg = to_train_config(SYNTH)
    other = build_model(ModelConfig(name="mf", dim=16), 300, 200)
    _fake_run(tmp_path / "run", cfg, other.state_dict())
    with pytest.raises(DataError) as info:
        export_run(tmp_path / "run")
    msg = str(info.value)
    assert str(tmp_path / "run" / "model.pt") in msg
    assert "(300, 16)" in msg and "(300, 8)" in msg and "another run" in msg


def test_export_of_another_architecture_or_a_truncated_model_pt(tmp_path: Path) -> None:
    cfg = to_train_config(SYNTH)
    mlp = MLP(300, 200, 8, [8, 4])
    _fake_run(tmp_path / "mlp", cfg, mlp.state_dict())
    with pytest.raises(DataError, match=r"mlp/model\.pt does not fit .*(Missing|Unexpected)"):
        export_run(tmp_path / "mlp")
    good = build_model(ModelConfig(name="mf", dim=8), 300, 200)
    save_state_dict(good, tmp_path / "good.pt")
    blob = (tmp_path / "good.pt").read_bytes()
    _fake_run(tmp_path / "cut", cfg, blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut/model\.pt cannot be read as a model\.pt"):
        export_run(tmp_path / "cut")


def _artifact(tmp_path: Path) -> Path:
    path = tmp_path / "a.safetensors"
    model = build_model(ModelConfig(name="mf", dim=8), 30, 20)
    export_model(model, ModelConfig(name="mf", dim=8), np.arange(30), np.arange(20), path)
    return path


def test_artifact_with_a_flipped_tensor_byte_is_refused(tmp_path: Path) -> None:
    path = _artifact(tmp_path)
    load_compressed(path)  # intact: loads
    blob = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(blob[:8], "little")  # after the header
    blob[data_start + 1] ^= 0xFF  # a weight's byte: still a valid safetensors file
    path.write_bytes(bytes(blob))
    expected = r"a\.safetensors: its contents do not match the checksum \(crc32\)"
    with pytest.raises(DataError, match=expected):
        load_compressed(path)


def _rewritten(path: Path, out: Path, meta_edit: dict[str, Any], sums: dict[str, str]) -> Path:
    """``path``'s artifact with its metadata changed by ``meta_edit`` and its checksum entries
    replaced by ``sums`` (entry -> algorithm, computed over the new metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    meta = {**unpack_metadata(metadata["recsys_compress"]), **meta_edit}
    text = json.dumps(meta)
    tensors = {k: v for k, v in load_file(str(path)).items() if k != CHECKSUM}
    payload = dict(tensors)
    for entry, algorithm in sums.items():
        tensors[entry] = payload_checksum(payload, text, algorithm)
    save_file(tensors, str(out), metadata={**metadata, "recsys_compress": text})
    return out


def test_artifacts_of_format_1_still_load_with_their_sha256_checked(tmp_path: Path) -> None:
    """Artifacts exported before the CRC-32 (format 1) hold a SHA-256 in ``::sha256`` (or, the
    oldest, no checksum): they load, and the SHA-256 is verified."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _artifact(tmp_path)
    expected = load_compressed(path).model.state_dict()
    v1 = {"format": "recsys-compress/1"}
    old = _rewritten(path, tmp_path / "old.safetensors", v1, {"::sha256": "sha256"})
    loaded = load_compressed(old).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    oldest = _rewritten(path, tmp_path / "oldest.safetensors", v1, {})
    assert all(
        torch.equal(load_compressed(oldest).model.state_dict()[k], v) for k, v in expected.items()
    )
    with safe_open(str(old), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(old))
    tensors["user_embedding.weight::values"][3] += 1.0  # after the SHA-256 was written
    save_file(tensors, str(tmp_path / "old_edited.safetensors"), metadata=metadata)
    with pytest.raises(DataError, match=r"old_edited\.safetensors: .* checksum \(sha256\)"):
        load_compressed(tmp_path / "old_edited.safetensors")


def test_an_artifact_of_format_2_without_its_crc32_is_refused(tmp_path: Path) -> None:
    """Format 2 must hold its CRC-32, and only it: a dropped or swapped checksum entry would
    otherwise turn the check off."""
    path = _artifact(tmp_path)
    for name, sums in (("none", {}), ("sha", {"::sha256": "sha256"})):
        bad = _rewritten(path, tmp_path / f"{name}.safetensors", {}, sums)
        with pytest.raises(DataError, match=rf"{name}\.safetensors: a recsys-compress/2 artifact"):
            load_compressed(bad)
    both = {"::crc32": "crc32", "::sha256": "sha256"}
    with pytest.raises(DataError, match=r"\['crc32', 'sha256'\], not one of \['crc32'\]"):
        load_compressed(_rewritten(path, tmp_path / "both.safetensors", {}, both))
    same = _rewritten(path, tmp_path / "same.safetensors", {}, {"::crc32": "crc32"})
    assert (
        load_compressed(same).model.state_dict().keys()
        == load_compressed(path).model.state_dict().keys()
    )


def test_artifact_with_edited_metadata_is_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _artifact(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    meta = unpack_metadata(metadata["recsys_compress"])
    meta["num_users"] = 31
    edited = {**metadata, "recsys_compress": json.dumps(meta)}
    save_file(load_file(str(path)), str(tmp_path / "edited.safetensors"), metadata=edited)
    with pytest.raises(DataError, match=r"edited\.safetensors: its contents do not match"):
        load_compressed(tmp_path / "edited.safetensors")
    # an unknown key in a format-1 artifact without checksum (it had none to check): still a
    # clear DataError
    meta["model"]["hidden"] = 3
    odd = _rewritten(
        path, tmp_path / "odd.safetensors", {**meta, "format": "recsys-compress/1"}, {}
    )
    with pytest.raises(DataError, match=r"odd\.safetensors is not a readable"):
        load_compressed(odd)


# --- the CLI: non-zero exit, the key or file in stderr, no traceback --------------------------


def _truncated_ml100k(tmp_path: Path) -> tuple[list[str], str]:
    path = tmp_path / "u.data"
    path.write_text("196\t242\t3\t881250949\n186\t302\t3\n")
    return ["data=ml100k", f"data.path={path}"], str(path)


def _bad_rating_csv(tmp_path: Path) -> tuple[list[str], str]:
    path = tmp_path / "ratings.csv"
    path.write_text("user_id,item_id,rating,timestamp\nu1,i1,4,10\nu2,i2,four,11\n")
    return ["data=csv", f"data.path={path}"], "'four'"


def _missing_column_csv(tmp_path: Path) -> tuple[list[str], str]:
    path = tmp_path / "ratings.csv"
    path.write_text("uid,item_id,rating,timestamp\n1,1,4,10\n")
    return ["data=csv", f"data.path={path}"], "data.user_col"


def _pretrained_gmf_of_an_mlp_run(tmp_path: Path) -> tuple[list[str], str]:
    mlp_run = tmp_path / "mlp_run"
    save_state_dict(MLP(300, 200, 8, [16, 8]), mlp_run / "model.pt")
    args = [
        "data=synthetic",
        "model=neumf",
        "model.dim=8",
        "model.mlp_layers=[16,8]",
        f"model.pretrained_gmf={mlp_run}",
        f"model.pretrained_mlp={mlp_run}",
    ]
    return args, "model.pretrained_gmf"


@pytest.mark.parametrize(
    "case",
    [_truncated_ml100k, _bad_rating_csv, _missing_column_csv, _pretrained_gmf_of_an_mlp_run],
)
def test_cli_bad_file_fails_before_training(tmp_path: Path, case: Any) -> None:
    args, expected = case(tmp_path)
    result = run_cli(["compression=none", "trainer.progress_bar=false", *args], tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    record = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert record["status"] == "failed" and expected in record["error"]
