"""Quantisation-aware training: row-gathered fake quantisation, the grid, convert, accounting,
Lightning fits with delayed start, frozen scales and a real resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from recsys_compress.compression.accounting import layer_stats
from recsys_compress.compression.qat import (
    FakeQuantEmbedding,
    FakeQuantLinear,
    QATConfig,
    QuantizationAwareTraining,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantScheme,
    _fake_quantize_with,
    _within,
    convert_module,
    plan,
    post_training_quantize,
    round_up_to_float16,
    symmetric_scales,
    to_fake_quant,
    torchao_qat,
)
from recsys_compress.compression.targets import TargetSpec
from recsys_compress.config import to_train_config
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.errors import ConfigError
from recsys_compress.models import build_model
from recsys_compress.models.mf import MF
from recsys_compress.models.ncf import NeuMF
from recsys_compress.module import RecommenderModule
from recsys_compress.ops import gather_rows

SCHEMES = [
    QuantScheme(8, None),
    QuantScheme(4, None),
    QuantScheme(8, 8),
    QuantScheme(4, 8),
    QuantScheme(8, None, symmetric=False),
    QuantScheme(4, 8, symmetric=False),
]


def scheme_id(s: QuantScheme) -> str:
    gran = "row" if s.group_size is None else f"g{s.group_size}"
    return f"int{s.bits}-{gran}-{'sym' if s.symmetric else 'asym'}"


def torchao_whole_table(weight: torch.Tensor, scheme: QuantScheme) -> nn.Module:
    """torchao's own FakeQuantizedEmbedding (fake-quantises the whole table each call)."""
    from torchao.quantization.qat import FakeQuantizedEmbedding

    reference = FakeQuantizedEmbedding(
        weight.shape[0], weight.shape[1], weight_config=scheme.fake_quantize_config()
    )
    reference.weight = nn.Parameter(weight.detach().clone())
    return reference


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_row_gathered_fake_quant_equals_whole_table(scheme: QuantScheme) -> None:
    torch.manual_seed(0)
    table = nn.Embedding(50, 16)
    nn.init.normal_(table.weight, std=0.1)
    with torch.no_grad():
        table.weight[3] += 0.05  # a row away from zero: asymmetric offsets matter
    reference = torchao_whole_table(table.weight, scheme)
    fake = FakeQuantEmbedding(table, scheme)
    ids = torch.tensor([[3, 7, 7], [0, 49, 3]])  # repeats and a 2-D id tensor
    probe = torch.randn(2, 3, 16)

    out = fake(ids)
    expected = reference(ids)
    assert out.shape == (2, 3, 16)
    assert torch.equal(out, expected)
    # all_rows-style read: the whole table, fake-quantised
    assert torch.equal(fake(torch.arange(50)), reference(torch.arange(50)))
    assert not torch.equal(out, table(ids))  # it does quantise

    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    assert fake.weight is table.weight  # gradients reach the shared float Parameter
    assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0
    # equal up to the summation order of a repeated row's gradients
    torch.testing.assert_close(table.weight.grad, reference.weight.grad, rtol=1e-6, atol=1e-6)
    assert table.weight.grad[[1, 2, 4]].abs().sum() == 0  # rows not read get no gradient


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_fake_quant_values_lie_on_the_grid(scheme: QuantScheme) -> None:
    torch.manual_seed(1)
    table = nn.Embedding(20, 16)
    with torch.no_grad():
        table.weight.add_(0.5)  # off-centre rows: asymmetric offsets have work to do
    fake = FakeQuantEmbedding(table, scheme)
    values = fake(torch.arange(20)).detach()
    scale, offset = fake.compute_qparams()
    step = scale.repeat_interleave(16 // scale.shape[1], dim=1)
    shift = 0 if offset is None else offset.repeat_interleave(16 // offset.shape[1], dim=1)
    levels = (values - shift) / step
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
    assert levels.round().min() >= scheme.qmin and levels.round().max() <= scheme.qmax
    assert len(levels.round().unique()) > (100 if scheme.bits == 8 else 12)
    # round to nearest: within half a step of the float weight (the symmetric positive extreme,
    # max|w| / s = 2^(b-1) - 0.5, is clipped to 2^(b-1) - 1: also half a step)
    assert ((values - table.weight.detach()).abs() <= 0.5 * step * (1 + 1e-4)).all()
    if scheme.symmetric:
        assert levels.round().min() == scheme.qmin  # s = max|w| / (2^(b-1) - 0.5)


def test_round_up_to_float16_is_the_smallest_float16_not_below() -> None:
    scale = torch.tensor([1e-7, 3.3e-5, 0.0123, 0.5, 1.0, 1000.3, 2.0**-23])
    up = round_up_to_float16(scale)
    assert torch.equal(up.half().float(), up)  # exact in float16
    assert (up >= scale).all()
    assert up[4] == 1.0 and up[6] == 2.0**-23  # exact inputs stay
    below = (up.half().view(torch.int16) - 1).view(torch.float16).float()
    assert (below < scale).all()  # the float16 just below would be too small
    with pytest.raises(ValueError, match="scale_dtype=float32"):
        round_up_to_float16(torch.tensor([1e6]))


def test_round_up_to_float16_bit_path_equals_the_conversion_path() -> None:
    """Scales all in float16's normal range take the integer path (carry, then clear the low
    mantissa bits); any subnormal one sends the whole tensor through the conversions. Both give
    the same values."""
    torch.manual_seed(9)
    normal = torch.exp(torch.empty(4000).uniform_(math.log(2.0**-14), math.log(6e4)))
    normal[:4] = torch.tensor([2.0**-14, 65504.0, 1.0, 0.1])  # edges and exact float16 values
    subnormal = torch.cat([normal, torch.tensor([1e-6])])
    for scale in (normal, subnormal):
        half = scale.half()
        below = half.float() < scale
        expected = torch.where(
            below, (half.view(torch.int16) + 1).view(torch.float16), half
        ).float()
        assert torch.equal(round_up_to_float16(scale), expected)
    assert round_up_to_float16(torch.empty(0)).numel() == 0


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, None), (4, 8)])
def test_float16_scales_keep_every_weight_within_half_a_step(
    bits: int, group_size: int | None
) -> None:
    torch.manual_seed(4)
    table = nn.Embedding(40, 16)
    with torch.no_grad():
        table.weight.mul_(torch.logspace(-6, 1, 40)[:, None])  # scales over 7 decades
        table.weight[5] = 0.0  # a pruned row: no NaN, no division by a zero scale
    scheme = QuantScheme(bits, group_size, True, "float16")
    fake = FakeQuantEmbedding(table, scheme)
    values = fake(torch.arange(40)).detach()
    scale, offset = fake.compute_qparams()
    assert offset is None and torch.equal(scale.half().float(), scale)
    step = scale.repeat_interleave(16 // scale.shape[1], dim=1)
    levels = values / step
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
    assert levels.round().min() >= scheme.qmin and levels.round().max() <= scheme.qmax
    assert torch.isfinite(values).all() and (values[5] == 0).all()
    # no clipping: round to nearest everywhere, the extremes included
    assert ((values - table.weight.detach()).abs() <= 0.5 * step * (1 + 1e-4)).all()
    # the row-gathered path equals the whole-table path, and convert stores the same grid
    ids = torch.tensor([[3, 39, 3], [5, 0, 17]])
    assert torch.equal(fake(ids), values[ids])
    real = convert_module(fake)
    assert torch.equal(real.scales, scale)
    assert torch.equal(real(torch.arange(40)), values)
    assert real.rcz_scale_bytes == 2


def test_float16_scales_need_a_symmetric_scheme() -> None:
    with pytest.raises(ConfigError, match=r"compression\.qat\.scale_dtype=float32"):
        QATConfig(symmetric=False)
    with pytest.raises(ConfigError, match=r"compression\.qat\.scale_dtype='bfloat16'"):
        QATConfig(scale_dtype="bfloat16")


def test_frozen_scales_are_not_recomputed() -> None:
    torch.manual_seed(2)
    table = nn.Embedding(10, 8)
    fake = FakeQuantEmbedding(table, QuantScheme(8, None))
    fake.freeze()
    scale = fake.scale.clone()
    with torch.no_grad():
        table.weight.mul_(3.0)  # training moves the weights: frozen scales stay
    out = fake(torch.arange(10)).detach()
    assert torch.equal(fake.scale, scale)
    levels = out / scale
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert levels.abs().max() == 128  # clipped at the frozen range: [-128, 127]
    # a fresh (dynamic) quantiser would rescale instead
    dynamic = FakeQuantEmbedding(table, QuantScheme(8, None))
    assert not torch.equal(dynamic(torch.arange(10)), out)


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_convert_stores_int8_and_matches_fake_quant(scheme: QuantScheme) -> None:
    torch.manual_seed(3)
    table = nn.Embedding(30, 16)
    linear = nn.Linear(16, 8)
    fake_table, fake_linear = FakeQuantEmbedding(table, scheme), FakeQuantLinear(linear, scheme, 8)
    real_table, real_linear = convert_module(fake_table), convert_module(fake_linear)
    assert isinstance(real_table, QuantizedEmbedding) and isinstance(real_linear, QuantizedLinear)
    for real in (real_table, real_linear):
        assert real.qweight.dtype == torch.int8 and not real.qweight.requires_grad
        assert real.scales.dtype == torch.float32
        assert scheme.qmin <= int(real.qweight.min()) and int(real.qweight.max()) <= scheme.qmax
        assert (real.zero_points is None) == scheme.symmetric
        assert real.rcz_bits == scheme.bits
    assert real_table.scales.shape == (30, 1 if scheme.group_size is None else 2)
    ids = torch.tensor([[1, 5], [29, 1]])
    # converted embeddings dequantise with torchao's float ops: the same numbers
    assert torch.equal(real_table(ids), fake_table(ids).detach())
    assert torch.equal(real_table.dequantize(), fake_table(torch.arange(30)).detach())
    x = torch.randn(4, 16)
    torch.testing.assert_close(real_linear(x), fake_linear(x).detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(real_linear.bias, linear.bias.detach())


def neumf() -> NeuMF:
    torch.manual_seed(4)
    model = NeuMF(40, 30, dim=8, mlp_dim=8, layers=[16, 8])
    for p in model.parameters():  # trained-looking scales, not the 0.01 init
        nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
def test_converted_scores_match_fake_quant_model(granularity: str) -> None:
    torch.manual_seed(5)
    users = torch.arange(0, 40, 3)
    cases = [(MF(40, 30, dim=16), 4, None), (neumf(), 8, 8)]
    for model, bits, activation_bits in cases:
        cfg = QATConfig(
            bits=bits,
            granularity=granularity,
            group_size=8,
            activation_bits=activation_bits,
            float_dtype="float32",  # exact comparison; float16 rounding: the next test
        )
        with torch.no_grad():
            float_scores = model.score_all(users)
        callback = QuantizationAwareTraining(cfg)
        callback.start(model)
        with torch.no_grad():
            fake_scores = model.score_all(users)
            fake_pairs = model(users, users % 30)
        callback.convert(model)
        assert all(not isinstance(m, FakeQuantEmbedding | FakeQuantLinear) for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(model.score_all(users), fake_scores, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(users, users % 30), fake_pairs, rtol=1e-5, atol=1e-5)
        # quantisation changes the scores, but not beyond what the bits allow
        assert not torch.equal(fake_scores, float_scores)
        relative = (fake_scores - float_scores).norm() / float_scores.norm()
        assert relative < (0.2 if bits == 4 else 0.05)


def test_convert_rounds_the_float_leftovers_to_float16_and_checkpoints_load_rounded() -> None:
    torch.manual_seed(6)
    model = neumf()
    users = torch.arange(0, 40, 3)
    callback = QuantizationAwareTraining(QATConfig(bits=8))
    callback.start(model)
    trained_state = {k: v.clone() for k, v in model.state_dict().items()}  # a QAT checkpoint
    with torch.no_grad():
        fake_scores = model.score_all(users)
    callback.convert(model)
    floats = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    assert floats and all(torch.equal(p.half().float(), p) for p in floats.values())
    assert {s.name: s for s in layer_stats(model)}["mlp.tower.0"].compressed_bytes == (
        16 * 16 + 2 * 16 + 2 * 16  # int8 weight [16, 16], float16 scale per row, float16 bias
    )
    with torch.no_grad():
        torch.testing.assert_close(model.score_all(users), fake_scores, rtol=2e-3, atol=2e-3)
    # loading the float checkpoint into the converted model (validate/test with ckpt_path):
    # biases arrive rounded as convert rounded them, so metrics are the exported model's
    host = nn.Module()
    host.model = model
    callback._hooked = None
    callback.setup(None, host, "validate")  # type: ignore[arg-type]
    host.load_state_dict({f"model.{k}": v for k, v in trained_state.items()})
    assert all(
        torch.equal(p.half().float(), p) for p in model.parameters() if p.is_floating_point()
    )
    assert not torch.equal(
        trained_state["mlp.tower.0.bias"].half().float(), trained_state["mlp.tower.0.bias"]
    )


def test_swap_shares_parameters_so_the_optimizer_keeps_working() -> None:
    model = neumf()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    before = [id(p) for p in model.parameters()]
    QuantizationAwareTraining(QATConfig(activation_bits=8)).start(model)
    assert [id(p) for p in model.parameters()] == before
    assert isinstance(model.mlp.tower[0], FakeQuantLinear)
    assert isinstance(model.gmf_user_embedding, FakeQuantEmbedding)
    weight = model.mlp.tower[0].weight.detach().clone()
    table = model.gmf_item_embedding.weight.detach().clone()
    users, items = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    model(users, items).sum().backward()
    optimizer.step()
    assert not torch.equal(model.mlp.tower[0].weight, weight)
    assert not torch.equal(model.gmf_item_embedding.weight[3:6], table[3:6])


def test_layer_stats_count_converted_and_fake_quant_modules() -> None:
    n_users, n_items, d = 50, 40, 16
    model = post_training_quantize(MF(n_users, n_items, dim=d), QATConfig(bits=8))
    stats = {s.name: s for s in layer_stats(model)}
    assert isinstance(model.user_embedding, QuantizedEmbedding)
    # int8 values and one float16 scale per row (the default scale_dtype)
    assert stats["user_embedding"].compressed_bytes == n_users * d + 2 * n_users
    assert stats["item_embedding"].compressed_bytes == n_items * d + 2 * n_items
    assert stats["user_embedding"].params == n_users * d
    assert stats["user_bias"].bits == 32  # excluded by default: stays float32

    int4 = QATConfig(
        bits=4, granularity="per_group", group_size=8, symmetric=False, scale_dtype="float32"
    )
    fake = MF(n_users, n_items, dim=d)
    QuantizationAwareTraining(int4).start(fake)
    converted = post_training_quantize(MF(n_users, n_items, dim=d), int4)
    for candidate in (fake, converted):
        got = {s.name: s for s in layer_stats(candidate)}["user_embedding"].compressed_bytes
        # 4-bit values, and per group of 8 one float32 scale and one float32 offset
        assert got == n_users * d // 2 + 4 * 2 * n_users * (d // 8)


def test_post_training_quantize_is_close_to_the_float_model() -> None:
    model = neumf()
    users = torch.arange(40)
    with torch.no_grad():
        before = model.score_all(users)
        post_training_quantize(model, QATConfig(bits=8))
        after = model.score_all(users)
    assert isinstance(model.mlp.tower[0], QuantizedLinear)
    assert (after - before).norm() / before.norm() < 0.02


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"compression\.qat\.bits"):
        QATConfig(bits=3)
    with pytest.raises(ConfigError, match=r"compression\.qat\.embedding_bits"):
        QATConfig(embedding_bits=2)
    with pytest.raises(ConfigError, match=r"compression\.qat\.granularity"):
        QATConfig(granularity="per_tensor")
    with pytest.raises(ConfigError, match=r"compression\.qat\.group_size=12 .*user_embedding"):
        plan(MF(10, 10, dim=16), QATConfig(granularity="per_group", group_size=12))
    with pytest.raises(ConfigError, match=r"compression\.qat\.targets"):
        plan(MF(10, 10, dim=16), QATConfig(targets=TargetSpec(exclude=[])))  # 1-wide bias rows
    with pytest.raises(ConfigError, match=r"compression\.qat\.targets"):
        plan(MF(10, 10, dim=16), QATConfig(targets=TargetSpec(groups=["linear"])))


# -- Lightning ---------------------------------------------------------------------------------
def make_run(tmp_path: Path, model: str = "mf") -> tuple[RecDataModule, RecommenderModule]:
    cfg = to_train_config(
        {
            "data": {
                "name": "synthetic",
                "source": "synthetic",
                "use_cache": False,
                "cache_dir": str(tmp_path / "cache"),
                "synthetic": {"num_users": 40, "num_items": 30, "interactions_per_user": 8},
            },
            "split": {"name": "loo"},
            "model": {"name": model, "dim": 8, "mlp_layers": [16, 8]},
            "loss": {"name": "bce", "num_negatives": 2},
            "eval": {"protocol": "full", "ks": [10]},
            "optim": {"lr": 0.01},
            "trainer": {"batch_size": 128},
        }
    )
    L.seed_everything(0, verbose=False)
    dm = RecDataModule(cfg.data, cfg.split, cfg.loss, cfg.eval, cfg.trainer.batch_size, cfg.seed)
    dm.setup()
    net = build_model(cfg.model, dm.num_users, dm.num_items)
    return dm, RecommenderModule(net, cfg.loss, cfg.optim, cfg.eval)


def trainer(max_epochs: int, callbacks: list[L.Callback], root: Path) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


def first_table(pl_module: L.LightningModule) -> nn.Module:
    """The item table of MF, the GMF item table of NeuMF."""
    model = pl_module.model
    return model.item_embedding if hasattr(model, "item_embedding") else model.gmf_item_embedding


class Probe(L.Callback):
    """Records module types per training epoch, and the optimizer's Parameters at train start."""

    def __init__(self) -> None:
        self.types: list[str] = []
        self.optimizer_params_are_model_params = False
        self.frozen_at_start: bool | None = None
        self.scale_at_start: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.optimizer_params_are_model_params = params == {id(p) for p in pl_module.parameters()}
        table = first_table(pl_module)
        if isinstance(table, FakeQuantEmbedding):
            self.frozen_at_start = table._is_frozen
            self.scale_at_start = table.scale.clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.types.append(type(first_table(pl_module)).__name__)


@pytest.mark.parametrize(("model", "start_epoch"), [("neumf", 0), ("mf", 1)])
def test_fit_with_qat_converts_at_the_end(tmp_path: Path, model: str, start_epoch: int) -> None:
    dm, module = make_run(tmp_path, model)
    cfg = QATConfig(start_epoch=start_epoch, activation_bits=8 if model == "neumf" else None)
    qat, probe = QuantizationAwareTraining(cfg), Probe()
    trainer(2, [qat, probe], tmp_path).fit(module, datamodule=dm)
    expected = (
        ["FakeQuantEmbedding"] * 2 if start_epoch == 0 else ["Embedding", "FakeQuantEmbedding"]
    )
    assert probe.types == expected
    assert math.isfinite(float(module.trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(module.trainer.callback_metrics["val/ndcg@10"]))
    assert qat.state_dict()["converted"] and qat.started and not qat.frozen
    converted = [m for m in module.model.modules() if isinstance(m, QuantizedEmbedding)]
    assert len(converted) == (4 if model == "neumf" else 2)
    if model == "neumf":
        assert isinstance(module.model.mlp.tower[0], QuantizedLinear)
    assert not any(
        isinstance(m, nn.Embedding) and "bias" not in n for n, m in module.named_modules()
    )


def test_resume_rebuilds_fake_quant_modules_with_frozen_scales(tmp_path: Path) -> None:
    cfg = QATConfig(start_epoch=1, freeze_epoch=1)
    dm, module = make_run(tmp_path)
    saver = ModelCheckpoint(
        tmp_path / "ckpt", "e{epoch}", save_top_k=-1, auto_insert_metric_name=False
    )
    first = QuantizationAwareTraining(cfg)
    trainer(3, [first, saver], tmp_path).fit(module, datamodule=dm)
    ckpt = tmp_path / "ckpt" / "e2.ckpt"  # epoch 2: QAT since epoch 1, scales frozen since 2
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = saved["state_dict"]
    assert bool(state["model.item_embedding.frozen"])
    assert saved["callbacks"][first.state_key] == {
        "started": True,
        "frozen": True,
        "converted": False,
        "config": first.state_dict()["config"],
    }

    # A fresh process: float model, new callback; the fake-quant modules exist before the weights
    # load (strict loading would fail otherwise) and the optimizer is built over them.
    dm, module = make_run(tmp_path)
    resumed, probe = QuantizationAwareTraining(cfg), Probe()
    trainer(4, [resumed, probe], tmp_path).fit(module, datamodule=dm, ckpt_path=ckpt)
    assert probe.types == ["FakeQuantEmbedding"]  # only epoch 3 ran
    assert probe.optimizer_params_are_model_params
    assert probe.frozen_at_start is True
    assert torch.equal(probe.scale_at_start, state["model.item_embedding.scale"])
    table = module.model.item_embedding
    assert isinstance(table, QuantizedEmbedding) and resumed.converted
    # frozen scales survive training and conversion
    assert torch.equal(table.scales, state["model.item_embedding.scale"])
    trained_q = table.qweight.clone()

    # validate with the (fake-quant) checkpoint on the converted model: it quantises those weights
    trainer(4, [resumed], tmp_path).validate(module, datamodule=dm, ckpt_path=ckpt, verbose=False)
    table = module.model.item_embedding
    assert isinstance(table, QuantizedEmbedding)
    expected = torch.clamp(
        torch.round(state["model.item_embedding.weight"] / state["model.item_embedding.scale"]),
        -128,
        127,
    )
    assert (table.qweight.float() - expected).abs().max() <= 1  # torchao multiplies by 1/scale
    assert not torch.equal(table.qweight, trained_q)  # epoch 3 had moved the weights


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.symmetric], ids=scheme_id)
@pytest.mark.parametrize("case", ["fresh", "fresh-edge", "frozen"])
def test_fused_fake_quant_is_bit_identical_to_torchao(scheme: QuantScheme, case: str) -> None:
    """The fused symmetric op gives torchao's values and straight-through gradients bit for bit:
    signed zeros, clipped weights (frozen scales below a grown weight, or a fresh scale that puts
    a weight exactly half a step past the top level) and NaN included; both the path that skips
    the clamp (nothing clipped) and the one that masks."""
    torch.manual_seed(5)
    rows = torch.randn(64, 16) * 0.1
    rows[0, :4] = torch.tensor([-1e-9, 1e-9, -0.0, 0.0])  # round to -0.0 / +0.0
    if case == "fresh-edge":  # max|w| / scale = 2^(b-1) - 0.5 exactly: rounds up past qmax
        edge = (2 ** (scheme.bits - 1) - 0.5) * 2.0**-7  # scale 2^-7, a float16
        rows[1] = (torch.rand(16) - 0.5) * edge  # below it (other groups: no exact edge)
        rows[1, 0] = edge
    # float16 scales, rounded up (the default): no weight clips, except at the edge case
    scale = symmetric_scales(rows, QuantScheme(scheme.bits, scheme.group_size, True, "float16"))
    frozen = case == "frozen"
    if frozen:
        rows[1:9] *= 3.0  # beyond the frozen range: clipped, no gradient
        rows[9, 5] = float("nan")
    levels = (rows.view(64, scale.shape[1], -1) * scale.reciprocal().unsqueeze(-1)).round()
    assert _within(levels, scheme.qmin, scheme.qmax) is (case == "fresh")
    probe = torch.randn(64, 16)
    grads, outs = [], []
    for fused in (True, False):
        x = rows.clone().requires_grad_()
        if fused:
            out = _fake_quantize_with(x, scale, None, scheme)
        else:
            zero = torch.zeros_like(scale, dtype=torch.int32)
            group = scheme.columns_per_scale(16)
            fn = torchao_qat().fake_quantize_per_channel_group
            out = fn(x, scale, zero, scheme.qmin, scheme.qmax, group, scheme.zero_point_domain)
        (out * probe).nansum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    for fused, reference in (outs, grads):
        assert torch.equal(fused.nan_to_num(7.0), reference.nan_to_num(7.0))
        assert torch.equal(fused.signbit(), reference.signbit())
    zero_grads = int((grads[0] == 0).sum())  # the clipped weights got none
    assert zero_grads > 40 if frozen else zero_grads == (case == "fresh-edge")
    if case == "fresh-edge":
        assert grads[0][1, 0] == 0
    assert outs[0][0, 2].signbit().item() is False  # torchao's "+ 0" turns -0.0 into +0.0


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.symmetric], ids=scheme_id)
@pytest.mark.parametrize("clipped", [False, True], ids=["inside", "clipped"])
def test_fused_fake_quant_and_gather_equals_the_two_steps(
    scheme: QuantScheme, clipped: bool
) -> None:
    """Table first, fused: fake-quantise and gather in one node gives the values and gradients of
    fake-quantising the table and then :func:`gather_rows`, bit for bit."""
    torch.manual_seed(8)
    table = torch.randn(12, 16) * 0.1
    scale = symmetric_scales(table, QuantScheme(scheme.bits, scheme.group_size, True, "float16"))
    if clipped:
        table[3] *= 2.5
    ids = torch.randint(12, (40,))
    probe = torch.randn(40, 16)
    outs, grads = [], []
    for fused in (True, False):
        x = table.clone().requires_grad_()
        if fused:
            out = _fake_quantize_with(x, scale, None, scheme, gather=ids)
        else:
            out = gather_rows(_fake_quantize_with(x, scale, None, scheme), ids)
        (out * probe).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0].signbit(), outs[1].signbit())
    assert torch.equal(grads[0], grads[1])
    assert bool((grads[0][3] == 0).any()) is clipped


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("frozen", [False, True], ids=["fresh", "frozen"])
def test_table_first_path_equals_the_gathered_rows_path(scheme: QuantScheme, frozen: bool) -> None:
    """More ids than table rows: the table is fake-quantised once and then gathered. Same values
    as fake-quantising the gathered rows; gradients equal up to summation order."""
    torch.manual_seed(6)
    table = nn.Embedding(12, 16)
    with torch.no_grad():
        table.weight[2] += 0.3  # an off-centre row
    fake = FakeQuantEmbedding(table, scheme)
    if frozen:
        fake.freeze()
        with torch.no_grad():
            table.weight[5] *= 4.0  # grows past its frozen range: clipped
    many = torch.randint(12, (3, 10))  # 30 ids >= 12 rows: table first
    assert fake._quantise_table_first(many.reshape(-1))
    probe = torch.randn(3, 10, 16)
    out = fake(many)
    (out * probe).sum().backward()
    table_grad = table.weight.grad.clone()
    table.weight.grad = None
    # the gathered-rows path on the same ids, one chunk of < 12 ids at a time
    chunks = [fake(chunk) for chunk in many.reshape(-1).split(5)]
    assert not fake._quantise_table_first(many.reshape(-1)[:5])
    gathered = torch.cat(chunks).view(3, 10, 16)
    (gathered * probe).sum().backward()
    assert torch.equal(out, gathered)
    torch.testing.assert_close(table_grad, table.weight.grad, rtol=1e-6, atol=1e-7)
    assert table_grad.abs().sum() > 0
    if frozen and scheme.symmetric:
        assert (table_grad[5] == 0).sum() > 0  # clipped weights get no gradient either way


def test_torchao_whole_table_reference_is_the_slow_path() -> None:
    """Guard for the optimisation's premise: torchao's module quantises the full table."""
    reference = torchao_whole_table(torch.randn(6, 8), QuantScheme(8, None))
    calls: list[tuple[int, ...]] = []
    quantizer = reference.weight_fake_quantizer
    original = quantizer.forward
    quantizer.forward = lambda x: calls.append(tuple(x.shape)) or original(x)
    reference(torch.tensor([1]))
    assert calls == [(6, 8)]
    assert isinstance(quantizer, torchao_qat().IntxFakeQuantizer)


def test_to_fake_quant_rejects_other_modules() -> None:
    with pytest.raises(TypeError):
        to_fake_quant(nn.ReLU(), QuantScheme(8, None))
