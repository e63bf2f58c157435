"""Weight reconstruction (`--weight-method adaround`): AdaRound's relaxation, BRECQ's units, the
block loss it must lower against nearest rounding, and the reconstructed file through export."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from modiff_trt.calibrators import CalibrationOptions, load_calibration
from modiff_trt.calibrators.adaround import AdaRoundWeight, BetaSchedule
from modiff_trt.calibrators.blocks import find_blocks
from modiff_trt.calibrators.reconstruct import ReconstructionOptions
from modiff_trt.cli import app
from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.errors import ArtifactError, ConfigError, OptionError
from modiff_trt.export.exporter import export_model
from modiff_trt.export.manifest import load_manifest
from modiff_trt.models import load_config
from modiff_trt.quant import QuantConfig, quantizable_layers, quantize_unet
from modiff_trt.quant.layer import channel_groups
from tests.helpers.export import SEQ, SHAPE, check_step_layers, tiny_model_config, trajectory
from tests.helpers.models import rel_err
from tests.test_calibrators import run_calibrate

ENDS = ("conv_in", "conv_out")  # the tiny ddim UNet's first and last layer (`end_layers()`)
RECON = ReconstructionOptions(iterations=60, samples=40, batch_size=8, learning_rate=1e-2)  # few steps: a larger step


def test_adaround_starts_at_the_float_weight_and_hard_rounds_where_h_crosses_half():
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3)
    groups = channel_groups(4, 2)  # a split layer: one scale per output channel and channel group
    scale = torch.stack([weight[:, g].reshape(6, -1).abs().amax(1) / 7 for g in groups], dim=1)
    rounder = AdaRoundWeight(weight, scale, groups, 4)
    # h(V) = the fractional part at the start: the relaxed weight is the float weight
    assert torch.allclose(rounder.soft_weight(), weight, atol=2e-4 * float(scale.max()))
    assert torch.equal(rounder.nearest_codes(), torch.round(weight / rounder.step))
    assert rounder.step[:, 0].flatten().unique().numel() <= 6 and not torch.equal(
        rounder.step[:, 0], rounder.step[:, 2]
    )
    with torch.no_grad():
        rounder.v.fill_(-1e-3)
    assert torch.equal(rounder.codes(), torch.clamp(rounder.floor, -8, 7))  # h < 0.5: round down
    with torch.no_grad():
        rounder.v.fill_(0.0)
    assert torch.equal(rounder.codes(), torch.clamp(rounder.floor + 1, -8, 7))  # h = 0.5: up
    assert float(rounder.regularizer(2.0).detach()) == pytest.approx(weight.numel())  # undecided: full penalty
    with torch.no_grad():
        rounder.v.fill_(10.0)
    assert float(rounder.regularizer(2.0).detach()) == 0.0  # h = 1 exactly (the rectified sigmoid reaches it)


def test_beta_schedule_has_a_warmup_then_anneals_from_start_to_end():
    schedule = BetaSchedule(20.0, 2.0, 0.2)
    assert schedule.beta(0, 100) is None and schedule.beta(19, 100) is None
    assert schedule.beta(20, 100) == pytest.approx(20.0)
    assert schedule.beta(60, 100) == pytest.approx(11.0)
    assert schedule.beta(99, 100) == pytest.approx(2.0 + 18.0 / 80)


def test_units_are_resblocks_attention_and_single_layers_in_call_order(tiny_model):
    x = torch.randn(1, *SHAPE)
    blocks = find_blocks(tiny_model, lambda m: m(x, torch.tensor([10])))
    names = [b.name for b in blocks]
    assert names[:3] == ["temb.dense.0", "temb.dense.1", "conv_in"]
    assert "mid.attn_1" in names and names[-1] == "conv_out"
    assert names.index("up.1.block.0") < names.index("up.0.block.0")  # call order, not definition order
    covered = [layer for b in blocks for layer in b.layers]
    assert sorted(covered) == sorted(quantizable_layers(tiny_model))
    mid = next(b for b in blocks if b.name == "mid.block_1")
    assert mid.layers == ("mid.block_1.conv1", "mid.block_1.temb_proj", "mid.block_1.conv2")


def test_reconstruction_lowers_the_block_loss_against_nearest_rounding(tmp_path, tiny_config, tiny_checkpoint):
    """The point of AdaRound: on the calibration data, the learned rounding reconstructs every
    unit's float output better than round-to-nearest on the same grid."""
    cal = run_calibrate(
        tiny_config,
        tiny_checkpoint,
        tmp_path / "w4.safetensors",
        weight_bits=4,
        act_bits=None,
        weight_method="adaround",
        split=True,
        reconstruction=RECON,
    )
    assert cal.meta["weight_method"] == "adaround"
    units = cal.meta["reconstruction"]["units"]
    assert len(units) >= 10 and cal.meta["reconstruction"]["samples"] == 40
    assert sum(u["loss"] for u in units) < 0.9 * sum(u["nearest_loss"] for u in units)
    assert sum(u["loss"] < u["nearest_loss"] for u in units) >= 0.8 * len(units)
    assert cal.meta["first_last_bits"] == 8 and cal.meta["layer_weight_bits"] == {"conv_in": 8, "conv_out": 8}
    for name, entry in cal.layers.items():
        if name in ENDS:  # 8-bit codes: they use the int8 range, not the 4-bit one
            assert entry.weight_codes.abs().max() > 64, name
        else:
            assert entry.weight_codes.min() >= -8 and entry.weight_codes.max() <= 7, name


def _adaround_w4a8_export(tmp_path, tiny_config, tiny_checkpoint, tiny_model, **options):
    """A W4A8 AdaRound calibration of the tiny model (`options` go to both calibrate and QuantConfig:
    split, first_last_bits), its reference and its export: (calibration, reference, export dir)."""
    path = tmp_path / "w4a8.safetensors"
    run_calibrate(
        tiny_config,
        tiny_checkpoint,
        path,
        weight_bits=4,
        act_bits=8,
        weight_method="adaround",
        reconstruction=RECON,
        **options,
    )
    cal = load_calibration(path)
    config = QuantConfig(4, 8, act_scales="static", **options)
    qmodel = quantize_unet(tiny_model, config, cal.to_scale_set(load_config(tiny_config), tiny_checkpoint))
    out = tmp_path / "exp"
    export_model(tiny_model, qmodel, tiny_model_config(tiny_model), out, calibration=path)
    return cal, qmodel, out


def test_reconstructed_file_round_trips_through_export_exactly(tmp_path, tiny_config, tiny_checkpoint, tiny_model):
    """The learned integer weights survive the file, the reference and the exported graph: per
    layer and step on ONNX Runtime's own tensors, o_hat_out - o_hat_in = f(rq, W_adaround), the
    8-bit first and last layers among them."""
    cal, qmodel, out = _adaround_w4a8_export(tmp_path, tiny_config, tiny_checkpoint, tiny_model, split=True)
    for name, layer in qmodel.layers.items():
        assert torch.equal(layer.weight_codes, cal.layers[name].weight_codes), name
    nearest = quantize_unet(tiny_model, QuantConfig(4, None))
    assert any(not torch.equal(qmodel.layers[n].w_deq, nearest.layers[n].w_deq) for n in qmodel.layers)
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    assert check_step_layers(out, qmodel, noise) == len(qmodel.layers) * (len(SEQ) - 1)
    assert rel_err(trajectory(OrtRunner(out), noise), trajectory(qmodel, noise)) < 5e-3
    manifest = load_manifest(out)
    assert manifest.calibration.weight_method == "adaround"
    assert {layer.name: layer.weight_bits for layer in manifest.layers} == {
        name: 8 if name in ENDS else 4 for name in qmodel.layers
    }
    for name in ENDS:
        assert qmodel.layers[name].weight_bits == 8 and qmodel.layers[name].weight_codes.abs().max() > 64
    shown = CliRunner().invoke(app, ["inspect", str(out), "--no-layers"])
    assert shown.exit_code == 0, shown.output
    assert "W4 adaround" in shown.output and "block reconstruction" in shown.output
    assert "conv_in, conv_out at W8 (first/last layer)" in " ".join(shown.output.split())


def test_first_last_bits_same_keeps_every_layer_at_the_weight_bits(tmp_path, tiny_config, tiny_checkpoint, tiny_model):
    """`first_last_bits=None` ('same'): the file, the reference, the export and the manifest hold
    every layer at W4, and the export still follows the reference per layer on ORT."""
    path = tmp_path / "w4a8-same.safetensors"
    cal = run_calibrate(
        tiny_config, tiny_checkpoint, path, weight_bits=4, act_bits=8, method="mse", first_last_bits=None
    )
    assert cal.meta["first_last_bits"] is None and cal.meta["layer_weight_bits"] == {}
    for name, entry in cal.layers.items():
        assert entry.weight_codes.min() >= -8 and entry.weight_codes.max() <= 7, name
    config = QuantConfig(4, 8, act_scales="static", first_last_bits=None)
    qmodel = quantize_unet(tiny_model, config, cal.to_scale_set(load_config(tiny_config), tiny_checkpoint))
    assert {layer.weight_bits for layer in qmodel.layers.values()} == {4}
    out = tmp_path / "exp"
    export_model(tiny_model, qmodel, tiny_model_config(tiny_model), out, calibration=path)
    assert {layer.weight_bits for layer in load_manifest(out).layers} == {4}
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    assert check_step_layers(out, qmodel, noise) == len(qmodel.layers) * (len(SEQ) - 1)
    with pytest.raises(ArtifactError, match="--first-last-bits"):  # the file's W4 ends, asked for W8 ends
        cal.check_settings(QuantConfig(4, 8, act_scales="static"))


def test_minmax_weights_follow_the_first_last_bits_in_the_reference(tiny_model):
    """Without a calibration the reference rounds the end layers at their own width: absmax
    per-channel 8-bit codes use the full int8 range, the other layers stay within 4 bits."""
    qmodel = quantize_unet(tiny_model, QuantConfig(4, None))
    for name, layer in qmodel.layers.items():
        top = 127 if name in ENDS else 7
        assert layer.weight_bits == (8 if name in ENDS else 4)
        assert layer.weight_codes.abs().amax(dim=tuple(range(1, layer.weight_codes.dim()))).max() == top, name
    same = quantize_unet(tiny_model, QuantConfig(4, None, first_last_bits=None))
    assert {layer.weight_bits for layer in same.layers.values()} == {4}
    assert {layer.weight_bits for layer in quantize_unet(tiny_model, QuantConfig(None, 8)).layers.values()} == {None}


@pytest.mark.parametrize("first_last_bits", [None, pytest.param(8, id="ends-w8")])
def test_reconstructed_file_follows_modiff_per_layer_on_openvino(
    tmp_path, tiny_config, tiny_checkpoint, tiny_model, first_last_bits
):
    """Every layer W4 is exact on any CPU; 8-bit first/last layers only where OpenVINO's int8
    kernels are (VNNI or AMX: `exact_int8_kernels`, docs/openvino.md), so that case skips elsewhere."""
    pytest.importorskip("openvino")
    from modiff_trt.engines.openvino_backend import exact_int8_kernels

    if first_last_bits == 8 and not exact_int8_kernels():
        pytest.skip("x86 CPU without VNNI: OpenVINO's 8-bit-weight int8 kernels are not exact here")
    _, qmodel, out = _adaround_w4a8_export(
        tmp_path, tiny_config, tiny_checkpoint, tiny_model, first_last_bits=first_last_bits
    )
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    checked = check_step_layers(out, qmodel, noise, runtime="openvino", workdir=tmp_path)
    assert checked == len(qmodel.layers) * (len(SEQ) - 1)


def test_reconstruction_options_are_checked_naming_the_option(tmp_path, tiny_config, tiny_checkpoint):
    with pytest.raises(OptionError, match="--recon-iters"):
        ReconstructionOptions(iterations=0)
    with pytest.raises(OptionError, match="--recon-beta"):
        ReconstructionOptions(beta_start=2, beta_end=20)
    with pytest.raises(OptionError, match="--recon-lr"):
        ReconstructionOptions(learning_rate=0)
    with pytest.raises(ConfigError, match="--weight-bits"):
        CalibrationOptions(weight_bits=None, weight_method="adaround")
    with pytest.raises(ConfigError, match="unknown"):
        CalibrationOptions(weight_method="gptq")
    runner = CliRunner()
    base = ["calibrate", "-c", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "-o", str(tmp_path / "c.st")]
    for extra, message in (
        (["--weight-method", "adaround", "--recon-beta", "20"], "--recon-beta"),
        (["--weight-method", "adaround", "--recon-iters", "0"], "--recon-iters"),
        (["--device", "tpu"], "--device"),
    ):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and message in result.output, result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, [*base, "--device", "cuda"])
        assert result.exit_code == 2 and "--device cuda" in result.output, result.output


@pytest.mark.gpu
def test_reconstruction_runs_on_cuda(tmp_path, tiny_config, tiny_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = load_config(tiny_config)
    from modiff_trt.calibrators import calibrate
    from modiff_trt.sampling import make_sampler

    cal = calibrate(
        cfg,
        tiny_checkpoint,
        tmp_path / "cuda.safetensors",
        make_sampler(cfg, steps=10),
        CalibrationOptions(
            weight_bits=4, act_bits=8, weight_method="adaround", cali_st=5, cali_n=8, batch_size=4, reconstruction=RECON
        ),
        device="cuda",
        progress=False,
    )
    units = cal.meta["reconstruction"]["units"]
    assert sum(u["loss"] for u in units) < sum(u["nearest_loss"] for u in units)
    assert json.dumps(cal.meta)  # the report is plain JSON


def test_unit_data_spills_to_disk_above_its_budget_and_reads_back_the_same():
    from modiff_trt.calibrators.recon_data import SampleStore

    x, temb = torch.randn(10, 4, 3, 3), torch.randn(10, 8)
    for budget, on_disk in ((1 << 30, False), (1, True)):
        store = SampleStore(10, budget)
        store.write(0, [x[:6], temb[:6], None])
        store.write(6, [x[6:], temb[6:], None])
        assert store.on_disk is on_disk
        index = torch.tensor([9, 0, 3])
        got = store.read(index, torch.device("cpu"))
        assert torch.equal(got[0], x[index]) and torch.equal(got[1], temb[index]) and got[2] is None
        store.close()


def test_cli_calibrate_adaround_writes_the_weights_and_says_so(tmp_path, tiny_config, tiny_checkpoint):
    out = tmp_path / "w4.safetensors"
    args = f"calibrate -c {tiny_config} --checkpoint {tiny_checkpoint} -o {out} --steps 5 --cali-st 3 --cali-n 4"
    args += " --batch-size 4 --weight-bits 4 --act-bits 0 --weight-method adaround --recon-iters 5 --recon-samples 8"
    result = CliRunner().invoke(app, [*args.split(), "--first-last-bits", "eight"])
    assert result.exit_code == 2 and "--first-last-bits eight: give the bits (2..8) or 'same'" in result.output
    result = CliRunner().invoke(app, [*args.split(), "--first-last-bits", "same"])
    assert result.exit_code == 0, result.output
    assert "AdaRound weights" in result.output
    cal = load_calibration(out)
    assert cal.meta["weight_method"] == "adaround" and cal.meta["reconstruction"]["options"]["iterations"] == 5
    assert all(entry.weight_codes is not None for entry in cal.layers.values())
    assert cal.meta["first_last_bits"] is None and all(e.weight_codes.abs().max() <= 8 for e in cal.layers.values())


def test_cli_reconstruction_defaults_are_the_library_defaults():
    """`calibrate` spells its --recon-* defaults out (the CLI does not import torch at start-up);
    they must be ReconstructionOptions' own, or the CLI and the API would learn different weights."""
    import inspect

    from modiff_trt import cli

    params = inspect.signature(cli.calibrate_command).parameters
    defaults = ReconstructionOptions()
    assert params["recon_iters"].default.default == defaults.iterations == 3000
    assert params["recon_lr"].default.default == defaults.learning_rate
    assert params["recon_samples"].default.default == defaults.samples
    assert params["recon_batch_size"].default.default == defaults.batch_size
    assert params["recon_warmup"].default.default == defaults.warmup
    assert params["recon_beta"].default.default == f"{defaults.beta_start:g},{defaults.beta_end:g}"
