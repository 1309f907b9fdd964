"""The compressed artifact: exact round trip, real size on disk, raw ids, damaged files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_compress import load_compressed
from recsys_compress.compression.accounting import size_summary
from recsys_compress.compression.codec import (
    decode_tensor,
    encode_tensor,
    pack_int4,
    payload_checksum,
    unpack_int4,
)
from recsys_compress.config import ModelConfig
from recsys_compress.errors import DataError
from recsys_compress.export import (
    ARTIFACT_NAME,
    export_model,
    load_run_model,
    read_safetensors,
)
from recsys_compress.models import build_model
from recsys_compress.train import train
from tests.conftest import REPO
from tests.e2e.test_train import FAST, compose_config


def test_int4_packing_round_trip() -> None:
    values = torch.tensor([-8, -1, 0, 1, 7, 3, -5], dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 4
    assert torch.equal(unpack_int4(packed, 7), values)
    # every byte value: all 256 (low, high) pairs, odd and even lengths, none
    pairs = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8).flatten()
    for n in (512, 511, 1, 0):
        unpacked = unpack_int4(pack_int4(pairs[:n]), n)
        assert unpacked.dtype == torch.int8 and torch.equal(unpacked, pairs[:n])
    wide = pack_int4(pairs).to(torch.int64)  # the same bytes in a wider type
    assert torch.equal(unpack_int4(wide, 512), pairs)
    with pytest.raises(ValueError, match="int4"):
        pack_int4(torch.tensor([8]))


def test_int4_unpacking_without_the_little_endian_shortcut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a big-endian machine the int16 view would swap each pair: the plain path runs."""
    import types

    from recsys_compress.compression import codec

    pairs = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8).flatten()
    monkeypatch.setattr(codec, "sys", types.SimpleNamespace(byteorder="big"))
    for n in (512, 511, 0):
        assert torch.equal(unpack_int4(pack_int4(pairs[:n]), n), pairs[:n])


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.0])
def test_codec_is_exact_and_picks_the_smaller_encoding(density: float) -> None:
    weight = torch.randn(50, 16)
    weight[torch.rand(50, 16) >= density] = 0.0
    entries, info = encode_tensor("w", weight)
    assert torch.equal(decode_tensor("w", entries, info), weight)
    stored = sum(t.numel() * t.element_size() for t in entries.values())
    assert stored <= weight.numel() * 4
    assert info["encoding"] == ("dense" if density > 0.9 else "bitmask")


@pytest.mark.parametrize(
    "dtype",
    [  # complex128: 16-byte elements, placed by index_copy_
        *(torch.float32, torch.bfloat16, torch.float16, torch.float64),
        *(torch.int8, torch.int64, torch.bool, torch.complex128),
    ],
)
def test_sparse_tensors_of_every_dtype_decode_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(37, 11, generator=gen) * 50).to(dtype)
    weight[torch.rand(37, 11, generator=gen) >= 0.2] = 0
    weight[0, :3] = torch.tensor([-1, 1, 1]).to(dtype)  # a negative value's sign bit kept
    entries, info = encode_tensor("w", weight)
    assert info["encoding"] == "bitmask"
    decoded = decode_tensor("w", entries, info)
    assert decoded.dtype == dtype and decoded.shape == weight.shape
    assert torch.equal(decoded, weight)


@pytest.mark.parametrize(
    ("name", "dtype"), [("mf", torch.float32), ("neumf", torch.float32), ("mf", torch.bfloat16)]
)
def test_a_run_model_loads_its_saved_tensors_without_drawing_random_weights(
    tmp_path: Path, name: str, dtype: torch.dtype
) -> None:
    """``load_run_model`` (the export CLI's load, the inference benchmark's dense reference)
    builds on the meta device: the saved tensors, in their dtype (a ``bf16-true`` run's model
    re-exports in bfloat16, as the run exported it), and the global RNG left untouched."""
    cfg = ModelConfig(name=name, dim=8)
    torch.manual_seed(1)
    saved = build_model(cfg, 30, 20).to(dtype)
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    rng = torch.random.get_rng_state()
    model = load_run_model(tmp_path / "model.pt", cfg, 30, 20, {})
    assert torch.equal(torch.random.get_rng_state(), rng)
    loaded = model.state_dict()
    assert loaded.keys() == saved.state_dict().keys()
    for key, value in saved.state_dict().items():
        assert loaded[key].device.type == "cpu" and loaded[key].dtype == dtype, key
        assert torch.equal(loaded[key], value), key
    users = torch.arange(30)
    assert torch.equal(model.eval().score_all(users), saved.eval().score_all(users))


def mf_model(sparsity: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mf", dim=32), 300, 500)
    with torch.no_grad():
        for table in (model.user_embedding.weight, model.item_embedding.weight):
            table[table.abs() < table.abs().flatten().quantile(sparsity)] = 0.0
    return model


def test_export_round_trip_scores_ids_and_size(tmp_path: Path) -> None:
    model = mf_model(0.8)
    user_ids = np.arange(1, 301)
    item_ids = np.array([f"item-{i}" for i in range(500)])
    path = tmp_path / "a.safetensors"
    size = export_model(model, ModelConfig(name="mf", dim=32), user_ids, item_ids, path)
    assert size == path.stat().st_size
    # the file really is compressed: close to the accounting estimate, far below fp32
    estimate = size_summary(model)["compressed_bytes"]
    dense = size_summary(model)["dense_bytes"]
    assert estimate <= size <= estimate + 4096 + 500 * 12
    assert size < 0.35 * dense
    loaded = load_compressed(path)
    users = torch.arange(300)
    assert torch.equal(loaded.model.score_all(users), model.score_all(users))
    recs = loaded.recommend([1, 300], k=5)
    top = torch.topk(model.score_all(torch.tensor([0, 299])), 5).indices.numpy()
    assert recs.tolist() == item_ids[top].tolist()
    with pytest.raises(DataError, match="unknown user ids"):
        loaded.recommend([0])


def test_the_artifact_reader_gives_what_safetensors_wrote(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(4)
    tensors = {
        "f32": torch.randn(7, 5, generator=gen),
        "bf16": torch.randn(3, generator=gen).bfloat16(),
        "i64": torch.arange(9).reshape(3, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    _, metadata, read = read_safetensors(path)
    assert metadata == {"k": "v"}
    expected = load_file(str(path))
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    read["f32"][0, 0] = 7.0  # views of one writable buffer, not of the file
    assert load_file(str(path))["f32"][0, 0] != 7.0

    blob = bytearray(path.read_bytes())
    size = int.from_bytes(blob[:8], "little")
    (tmp_path / "long.safetensors").write_bytes((size + len(blob)).to_bytes(8, "little") + blob[8:])
    with pytest.raises(ValueError, match="a header of"):
        read_safetensors(tmp_path / "long.safetensors")
    shifted = blob[8 : 8 + size].replace(b'"shape":[7,5]', b'"shape":[7,6]')
    (tmp_path / "shape.safetensors").write_bytes(blob[:8] + shifted + blob[8 + size :])
    with pytest.raises(ValueError, match=r"tensor f32: bytes .* shape \[7, 6\]"):
        read_safetensors(tmp_path / "shape.safetensors")

    # a float32 tensor 1 byte after the header (safetensors' writer aligns; a copy if not)
    entries = {
        "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    floats = torch.tensor([1.5, -2.0]).numpy().tobytes()
    (tmp_path / "odd.safetensors").write_bytes(
        len(text).to_bytes(8, "little") + text + b"\x07" + floats
    )
    *_, read = read_safetensors(tmp_path / "odd.safetensors")
    assert read["b"].tolist() == [7] and read["f"].tolist() == [1.5, -2.0]

    entries["f"]["data_offsets"] = [0, 8]  # overlapping the first: safetensors refuses it too
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "overlap.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + floats)
    with pytest.raises(ValueError, match="overlap or leave gaps"):
        read_safetensors(tmp_path / "overlap.safetensors")


def test_the_artifact_reader_refuses_a_lying_header_before_reading_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def header(text: bytes) -> Path:
        path = tmp_path / "h.safetensors"
        path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(8))
        return path

    for shape, why in [
        (b"[Infinity]", "Infinity in the header"),
        (b'"12"', "lists of integers"),
        (b"[1.5]", "lists of integers"),
        (b"[true]", "lists of integers"),
    ]:
        text = b'{"a":{"dtype":"F32","shape":' + shape + b',"data_offsets":[0,8]}}'
        with pytest.raises(ValueError, match=why):
            read_safetensors(header(text))
    allocated = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a))
    path = tmp_path / "junk.bin"
    path.write_bytes((10**9).to_bytes(8, "little") + bytes(64))  # a "header" past the end
    with pytest.raises(ValueError, match="a header of 1000000000 bytes in a file of 72"):
        read_safetensors(path)
    assert allocated == []  # nothing the file's size allocated


def test_bitmask_entries_that_do_not_fit_their_shape_are_refused() -> None:
    weight = torch.tensor([[0.0, 1.5, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    entries, info = encode_tensor("w", weight)
    assert info["encoding"] == "bitmask"
    with pytest.raises(ValueError, match="1 values for 2 mask bits"):
        decode_tensor("w", {**entries, "w::values": entries["w::values"][:1]}, info)
    with pytest.raises(ValueError, match="a mask of 1 bytes for 100000000000000 values"):
        decode_tensor("w", entries, {**info, "shape": [10**7, 10**7]})
    with pytest.raises(ValueError, match="not a list of sizes"):
        decode_tensor("w", entries, {**info, "shape": [-1, 8]})


def test_a_dense_model_pt_loads_into_the_quantized_structure_of_its_run(tmp_path: Path) -> None:
    from recsys_compress.compression.qat import QATConfig, post_training_quantize
    from recsys_compress.export import describe_structure

    cfg = ModelConfig(name="mf", dim=16)
    torch.manual_seed(0)
    dense = build_model(cfg, 40, 30)
    torch.save(dense.state_dict(), tmp_path / "model.pt")
    quantized = post_training_quantize(build_model(cfg, 40, 30), QATConfig(bits=8))
    structure = describe_structure(quantized)
    # float weights on a meta model: the integer modules quantise them, on the CPU
    loaded = load_run_model(tmp_path / "model.pt", cfg, 40, 30, structure)
    reference = post_training_quantize(dense, QATConfig(bits=8))
    assert loaded.user_embedding.qweight.device.type == "cpu"
    assert torch.equal(loaded.user_embedding.qweight, reference.user_embedding.qweight)


def test_a_loaded_artifact_keeps_the_file_in_memory_only_where_it_is_the_model(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.safetensors"

    def owns(tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().nbytes() == tensor.nbytes

    def exported(sparsity: float) -> torch.nn.Module:
        model = mf_model(sparsity)
        with torch.no_grad():  # float32 biases (zeros would be stored as float16)
            model.user_bias.weight.copy_(torch.randn(300, 1, generator=torch.Generator()))
        export_model(model, ModelConfig(name="mf", dim=32), np.arange(300), np.arange(500), path)
        return model

    exported(0.0)
    dense = load_compressed(path).model
    # the float tables are ~all of the file: they stay views of it, no second copy
    assert not owns(dense.user_embedding.weight) and not owns(dense.user_bias.weight)
    model = exported(0.8)
    pruned = load_compressed(path).model
    # bitmask tables decode into new memory; the bias, left a view, would pin the whole file
    assert owns(pruned.user_embedding.weight) and owns(pruned.user_bias.weight)
    assert torch.equal(pruned.user_bias.weight, model.user_bias.weight)
    assert torch.equal(pruned.user_embedding.weight, model.user_embedding.weight)


def test_payload_checksums_cover_the_metadata_and_every_tensor_in_name_order() -> None:
    """CRC-32 (written) and SHA-256 (artifacts before it) of the same byte stream: the metadata,
    then per tensor in name order its name, dtype and shape, then its bytes."""
    import hashlib
    import zlib

    entries = {
        "b": torch.tensor([1.5, -2.0]),
        "a": torch.tensor([[7, 8, 9]], dtype=torch.int16),
    }
    stream = (
        b"meta"
        + b"a:torch.int16:[1, 3];"
        + np.array([7, 8, 9], dtype="<i2").tobytes()
        + b"b:torch.float32:[2];"
        + np.array([1.5, -2.0], dtype="<f4").tobytes()
    )
    crc = payload_checksum(entries, "meta", "crc32")
    assert crc.dtype == torch.uint8
    assert bytes(crc.tolist()) == zlib.crc32(stream).to_bytes(4, "big")
    sha = payload_checksum(entries, "meta", "sha256")
    assert bytes(sha.tolist()) == hashlib.sha256(stream).digest()[:16]
    changed = {**entries, "b": torch.tensor([1.5, -2.5])}
    assert not torch.equal(payload_checksum(changed, "meta", "crc32"), crc)
    assert not torch.equal(payload_checksum(entries, "meta2", "crc32"), crc)


def test_truncated_or_tampered_artifact_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    export_model(
        mf_model(0.5), ModelConfig(name="mf", dim=32), np.arange(300), np.arange(500), path
    )
    blob = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut\.safetensors.*export it again"):
        load_compressed(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(DataError, match="junk"):
        load_compressed(tmp_path / "junk.safetensors")


def test_compressed_run_exports_automatically_and_cli_reexports(tmp_path: Path) -> None:
    cfg = compose_config([*FAST, "trainer.max_epochs=4", "compression=prune"])
    record = train(cfg, tmp_path / "run")
    comp = record["compression"]
    assert comp["methods"] == ["prune"]
    # 80% of each row of both 64-dim tables (round(0.8 * 64) = 51 of 64 per user / item);
    # the bias tables stay dense
    assert comp["sparsity"] == pytest.approx(500 * 51 / record["num_params"], rel=1e-6)
    artifact = Path(comp["artifact"])
    assert comp["artifact_bytes"] == artifact.stat().st_size
    assert comp["artifact_ratio"] < 0.35
    loaded = load_compressed(artifact)
    # the artifact scores exactly like the run's final (best compressed) model
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    users = torch.arange(10)
    net = build_model(cfg.model, 300, 200)
    net.load_state_dict(state)
    assert torch.equal(loaded.model.score_all(users), net.score_all(users))
    out = tmp_path / "again.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "recsys_compress.export", str(tmp_path / "run"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == artifact.read_bytes()
    bad = subprocess.run(
        [sys.executable, "-m", "recsys_compress.export", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "results.json not found" in bad.stderr


def test_two_stage_run_records_dense_and_compressed(tmp_path: Path) -> None:
    cfg = compose_config(
        [*FAST, "trainer.max_epochs=3", "compression=prune", "compression.dense_epochs=2"]
    )
    record = train(cfg, tmp_path)
    dense, comp = record["dense"], record["compression"]
    assert set(dense["test"]) == set(record["test"])
    assert (tmp_path / "dense" / "checkpoints" / "best.ckpt").is_file()
    assert dense["artifact_bytes"] == (tmp_path / "dense" / ARTIFACT_NAME).stat().st_size
    # the dense artifact is fp32-sized, the pruned one about a quarter of it
    assert dense["artifact_bytes"] > comp["uncompressed_fp32_bytes"]
    assert comp["artifact_bytes"] < 0.3 * dense["artifact_bytes"]
    assert record["epochs_trained"] == 3


def test_prune_then_qat_gives_a_sparse_int8_artifact(tmp_path: Path) -> None:
    cfg = compose_config([*FAST, "trainer.max_epochs=3", "compression=[prune,qat]"])
    record = train(cfg, tmp_path)
    comp = record["compression"]
    assert comp["methods"] == ["prune", "qat"]
    assert set(comp["structure"]["quantized"]) == {"user_embedding", "item_embedding"}
    # 80% zeros stored as bitmask + int8 values + one fp32 scale per row: ~0.1x of fp32;
    # the file adds a few KB of metadata (a large share on this tiny model)
    assert comp["compression_ratio"] < 0.12
    assert comp["compressed_bytes"] < comp["artifact_bytes"] < comp["compressed_bytes"] + 4096
    loaded = load_compressed(comp["artifact"])
    table = loaded.model.item_embedding
    assert table.qweight.dtype == torch.int8
    assert float((table.qweight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    net = build_model(cfg.model, 300, 200)
    from recsys_compress.export import load_compressed_state

    load_compressed_state(
        net, torch.load(tmp_path / "model.pt", weights_only=True), comp["structure"]
    )
    users = torch.arange(20)
    assert torch.equal(loaded.model.score_all(users), net.score_all(users))


@pytest.mark.parametrize("method", ["prune", "l1"])
def test_sparsity_and_svd_on_overlapping_targets_are_refused_before_training(
    tmp_path: Path, method: str
) -> None:
    from recsys_compress.errors import ConfigError

    # the config alone cannot tell (targets are globs on a model): it composes ...
    cfg = compose_config([*FAST, f"compression=[{method},svd]"])
    # ... and the SVD callback refuses it on the model, before any training step
    with pytest.raises(ConfigError, match=rf"compression\.{method}\.targets and compression\.svd"):
        train(cfg, tmp_path)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_svd_after_quantization_is_refused() -> None:
    from recsys_compress.errors import ConfigError

    with pytest.raises(ConfigError, match="SVD cannot follow"):
        compose_config(
            ["compression=[svd,qat]", "compression.svd.at_epoch=2", "compression.qat.start_epoch=1"]
        )


DISJOINT = ["compression.{0}.targets.groups=[embedding]", "compression.svd.targets.groups=[linear]"]
PAIRS = {
    "prune+l1": ["compression=[prune,l1]"],
    "prune+svd": ["model=neumf", "compression=[prune,svd]", *(k.format("prune") for k in DISJOINT)],
    "l1+svd": [
        "model=neumf",
        "compression=[l1,svd]",
        "compression.l1.strength=1e-3",
        *(k.format("l1") for k in DISJOINT),
    ],
    "l1+qat": ["compression=[l1,qat]", "compression.l1.strength=1e-3"],
    "svd+qat": ["model=neumf", "compression=[svd,qat]"],
    "svd(emb)+qat(linear)": [
        "model=neumf",
        "compression=[svd,qat]",
        "compression.svd.targets.groups=[embedding]",
        "compression.qat.targets.groups=[linear]",
    ],
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_compositions_run_end_to_end_and_export(tmp_path: Path, pair: str) -> None:
    """Every pair of methods (prune+qat: test_prune_then_qat_gives_a_sparse_int8_artifact)."""
    cfg = compose_config([*FAST, "trainer.max_epochs=2", *PAIRS[pair]])
    record = train(cfg, tmp_path)
    comp = record["compression"]
    assert comp["methods"] == cfg.compression.methods()
    layers = {layer["name"]: layer for layer in comp["layers"]}
    tables = [n for n, layer in layers.items() if "embedding" in n]
    lowrank = comp["structure"]["lowrank"]
    quantized = comp["structure"]["quantized"]
    if "prune" in comp["methods"]:  # ~80% of every table row, kept through the other method
        assert all(layers[n]["sparsity"] >= 0.78 for n in tables)
    if "l1" in comp["methods"]:
        assert all(layers[n]["sparsity"] > 0 for n in tables)
    if pair in ("prune+svd", "l1+svd"):  # the MLP factorised, the sparse tables not
        assert set(lowrank) == {"mlp.tower.0", "mlp.tower.2", "mlp.tower.4"}
        assert all(layers[n]["rank"] is None for n in tables)
    if pair == "svd+qat":  # every factor of every factorised layer is int8
        assert set(lowrank) >= {"mlp.user_embedding", "mlp.tower.0"}
        assert set(quantized) >= {f"{n}.{f}" for n in lowrank for f in ("left", "right")}
        assert all(layers[n]["bits"] == 8 for n in lowrank)
    if pair == "svd(emb)+qat(linear)":  # the tables' factors stay float, the MLP is int8
        assert set(lowrank) == set(tables)
        assert all(layers[n]["bits"] == 32 for n in tables)
        assert set(quantized) == {"mlp.tower.0", "mlp.tower.2", "mlp.tower.4", "predict"}
    loaded = load_compressed(comp["artifact"])
    users = torch.arange(8)
    net = build_model(cfg.model, 300, 200)
    from recsys_compress.export import load_compressed_state

    load_compressed_state(
        net, torch.load(tmp_path / "model.pt", weights_only=True), comp["structure"]
    )
    assert torch.equal(loaded.model.score_all(users), net.score_all(users))
    for name in quantized:
        assert loaded.model.get_submodule(name).qweight.dtype == torch.int8


def test_float32_values_exact_in_float16_are_stored_in_two_bytes() -> None:
    exact = torch.tensor([0.5, -2.0, 3.0, 1024.0])
    entries, info = encode_tensor("s", exact)
    assert entries["s::values"].dtype == torch.float16
    decoded = decode_tensor("s", entries, info)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, exact)
    inexact = torch.tensor([0.1, 1e-9])
    entries, info = encode_tensor("t", inexact)
    assert entries["t::values"].dtype == torch.float32
    assert torch.equal(decode_tensor("t", entries, info), inexact)


def test_compression_stage_weight_decay_applies_only_while_compressing(tmp_path: Path) -> None:
    norms = {}
    for decay in ("0.0", "10.0"):
        cfg = compose_config(
            [
                *FAST,
                "trainer.max_epochs=2",
                "trainer.early_stopping_patience=null",
                "compression=qat",
                "compression.dense_epochs=2",
                f"compression.embedding_weight_decay={decay}",
            ]
        )
        record = train(cfg, tmp_path / decay)
        # the dense stage is identical: its own L2 (optim.embedding_weight_decay) is unchanged
        norms[decay] = (record["dense"]["test"]["ndcg@10"], _table_norm(tmp_path / decay))
    assert norms["0.0"][0] == norms["10.0"][0]
    assert norms["10.0"][1] < 0.9 * norms["0.0"][1]


def _table_norm(run_dir: Path) -> float:
    model = load_compressed(run_dir / ARTIFACT_NAME).model
    return float(model.user_embedding.dequantize().norm())


def test_compression_stage_learning_rate(tmp_path: Path) -> None:
    """compression.lr: a tiny one leaves the dense stage's tables (almost) where they were."""
    moved = {}
    for lr in ("1e-9", "0.05"):
        cfg = compose_config(
            [
                *FAST,
                "trainer.max_epochs=2",
                "trainer.early_stopping_patience=null",
                "compression=qat",
                "compression.qat.float_dtype=float32",
                "compression.dense_epochs=2",
                f"compression.lr={lr}",
            ]
        )
        record = train(cfg, tmp_path / lr)
        dense = load_compressed(tmp_path / lr / "dense" / ARTIFACT_NAME).model
        after = load_compressed(tmp_path / lr / ARTIFACT_NAME).model
        table = dense.user_embedding.weight
        step = after.user_embedding.scales.max()
        change = (after.user_embedding.dequantize() - table).abs().max()
        moved[lr] = float(change / step)
        assert record["dense"]["test"]["ndcg@10"] > 0
    assert moved["1e-9"] <= 0.5 + 1e-3  # only int8 rounding: within half a step
    assert moved["0.05"] > 5
