"""LSUN-Churches / LSUN-Bedrooms / SD v1 shaped models through calibrate -> export -> sample.

Small configs in the official YAML layout and Lightning checkpoints are written here (helpers
from test_ldm_models); every weight is randomised, so no two layers share weight values and the
exporter's value-based MatMul matching cannot confuse them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from modiff_trt.calibrators import CalibrationOptions, calibrate, load_calibration
from modiff_trt.cli import app
from modiff_trt.engines.compare import compare_backends
from modiff_trt.engines.ort_backend import OrtRunner
from modiff_trt.engines.state_buffers import layout_from_manifest
from modiff_trt.engines.torch_backend import load_reference
from modiff_trt.errors import BackendUnavailableError, CheckpointError, ConfigError
from modiff_trt.export.exporter import export_model
from modiff_trt.export.lint import lint_export
from modiff_trt.export.manifest import load_manifest
from modiff_trt.models import load_config, load_unet
from modiff_trt.models.ldm_loading import load_first_stage
from modiff_trt.quant import QuantConfig, quantize_unet
from modiff_trt.quant.model import quantizable_layers
from modiff_trt.sampling import make_betas, make_sampler
from modiff_trt.sampling.conditioning import RandomContext, make_conditioning
from modiff_trt.sampling.run import write_samples
from tests.helpers.export import check_step_layers
from tests.helpers.ldm import ldm_states, small_ldm
from tests.helpers.models import SMALL, lightning_ckpt, randomize, rel_err, write_yaml


def test_load_config_gives_latent_model_configs():
    churches, sd = load_config("ldm-churches"), load_config("sd-v1")
    assert (churches.family, churches.sample_shape, churches.context_shape) == ("ldm", (4, 32, 32), None)
    assert (sd.family, sd.sample_shape, sd.context_shape) == ("sd", (4, 64, 64), (77, 768))
    assert load_config("ldm-bedrooms").sample_shape == (3, 64, 64)
    assert torch.equal(sd.betas(), make_betas("scaled_linear", 0.00085, 0.012).float())
    assert make_sampler(sd).timesteps()[:2] == [1, 21] and make_sampler(sd).name == "plms"
    assert make_sampler(load_config("ddim-cifar10"), steps=10, skip_type="uniform").timesteps()[:2] == [0, 100]
    assert sd.sha256 == load_config("sd-v1").sha256 != churches.sha256


def test_load_unet_reads_lightning_files_and_names_mismatches(tmp_path):
    path, ckpt, unet = small_ldm(tmp_path, "churches")
    loaded = load_unet(path, ckpt)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    assert torch.equal(loaded(x, t), unet(x, t))
    other = write_yaml(tmp_path, "bedrooms", SMALL["bedrooms"])
    with pytest.raises(CheckpointError, match="churches.ckpt"):
        load_unet(other, ckpt)
    with pytest.raises(ConfigError, match="latent-diffusion"):
        load_unet("ddim-cifar10", None, ema=True)


def test_sd_weight_only_ort_follows_torch_under_guidance_and_compare_runs_it(tmp_path):
    """Context input, CFG multiplier 2 in the manifest, runner sees 2N, PLMS trajectory < 1e-4;
    `compare` runs the export's own sampler (PLMS, guidance, random context) on both backends."""
    path, ckpt, unet = small_ldm(tmp_path, "sd")
    cfg = load_config(path)
    qmodel = quantize_unet(unet, QuantConfig(8, None))
    manifest = export_model(unet, qmodel, cfg, tmp_path / "exp", checkpoint=ckpt, guidance=True)
    assert manifest.export.state_batch_multiplier == 2 and manifest.model.context_shape == (77, 16)
    assert len(manifest.layers) == len(qmodel.layers)  # every SpatialTransformer Linear found
    assert "context" in {s.name for s in manifest.graphs["step"].inputs}
    assert lint_export(tmp_path / "exp") == []
    ort = OrtRunner(tmp_path / "exp")
    seen = []

    def counting(x, t, context=None):  # records the batch the engine gets
        seen.append(x.shape[0])
        return ort(x, t, context)

    counting.reset_state = ort.reset_state
    sampler = make_sampler(cfg, steps=2)
    noise = torch.randn(2, *cfg.sample_shape, generator=torch.Generator().manual_seed(3))
    context = RandomContext(cfg.context_shape)
    got = ldm_states(counting, sampler, noise, context)
    assert sampler.name == "plms" and set(seen) == {4} and len(seen) == 3
    assert rel_err(got, ldm_states(qmodel, sampler, noise, context)) < 1e-4
    assert manifest.sampling == make_sampler(cfg)  # no calibration: the config's PLMS, guidance 7.5
    rows = compare_backends(tmp_path / "exp", ["torch", "ort"], num_images=2, steps=2)
    assert [(r.step, r.t, r.backend) for r in rows] == [(0, 501, "ort"), (1, 1, "ort")]  # LDM timesteps of 2 steps
    assert all(r.rel_err < 1e-4 for r in rows), rows
    result = CliRunner().invoke(
        app, ["compare", str(tmp_path / "exp"), "--backends", "torch,ort", "--steps", "2", "-n", "1"]
    )
    assert result.exit_code == 0 and "rel. error vs torch" in result.output, result.output


def test_sd_calibrate_export_and_every_layer_follows_modiff(tmp_path):
    path, ckpt, _ = small_ldm(tmp_path, "sd", seed=1)
    cfg = load_config(path)
    context, sampler = RandomContext(cfg.context_shape), make_sampler(cfg, steps=2)
    with pytest.raises(ConfigError, match="text-conditioned"):
        calibrate(cfg, ckpt, tmp_path / "x.safetensors", sampler, CalibrationOptions(cali_n=1), progress=False)
    cal = calibrate(
        cfg,
        ckpt,
        tmp_path / "sd.safetensors",
        sampler,
        CalibrationOptions(cali_st=3, cali_n=2, batch_size=2),
        conditioning=context,
        progress=False,
    )
    # PLMS: 2 steps are 3 UNet calls (the first step calls twice); residuals exist at calls 1 and 2
    assert cal.meta["sampler"] == sampler.to_dict() and cal.meta["trajectories"]["calibration_steps"] == [1, 2]
    assert cal.meta["sampler"]["sampler"] == "plms" and cal.meta["sampler"]["guidance_scale"] == 7.5
    cfg, unet, qmodel = load_reference(path, ckpt, QuantConfig(8, 8, act_scales="static"), tmp_path / "sd.safetensors")
    export_model(unet, qmodel, cfg, tmp_path / "exp", checkpoint=ckpt, guidance=True, sampler=cal.sampler(cfg))
    assert load_manifest(tmp_path / "exp").sampling == sampler
    noise = torch.randn(1, *cfg.sample_shape, generator=torch.Generator().manual_seed(5))
    checked = check_step_layers(tmp_path / "exp", qmodel, noise, run=lambda m: ldm_states(m, sampler, noise, context))
    assert checked == len(qmodel.layers) * (sampler.model_calls() - 1)


def test_sd_constant_input_layers_pass_o_hat_through_and_fp16_export_lints_clean(tmp_path):
    """Bug 6: SD's cross-attention to_k/to_v read the text context, constant over a trajectory, so
    their residual is exactly 0 and their scale the calibrators' 1e-8 floor, which is 0 in fp16:
    every fp16 SD export failed its own lint. Calibration now marks them, the file and the manifest
    record them, and the step graph passes their o_hat through (no Q/DQ, no matmul, no a_hat)."""
    path, ckpt, unet = small_ldm(tmp_path, "sd", seed=2)
    cfg = load_config(path)
    context = RandomContext(cfg.context_shape)
    cal = calibrate(
        cfg,
        ckpt,
        tmp_path / "sd.safetensors",
        make_sampler(cfg, steps=6),
        CalibrationOptions(cali_st=5, cali_n=2, batch_size=2),
        conditioning=context,
        progress=False,
    )
    expected = {name for name in quantizable_layers(unet) if name.endswith(("attn2.to_k", "attn2.to_v"))}
    assert expected and set(cal.meta["constant_input"]) == expected
    loaded = load_calibration(tmp_path / "sd.safetensors")
    assert {name for name, entry in loaded.layers.items() if entry.constant_input} == expected
    cfg, unet, qmodel = load_reference(path, ckpt, QuantConfig(8, 8, act_scales="static"), tmp_path / "sd.safetensors")
    out = tmp_path / "fp16"
    manifest = export_model(
        unet, qmodel, cfg, out, checkpoint=ckpt, guidance=True, float_dtype="float16", sampler=cal.sampler(cfg)
    )
    assert lint_export(out) == []
    assert {layer.name for layer in manifest.layers if layer.constant_input} == expected
    step = onnx.load(str(out / "step.onnx"))
    inputs = {value.name for value in step.graph.input}
    for name in expected:
        assert f"o_hat_in.{name}" in inputs and f"a_hat_in.{name}" not in inputs
        assert {n.op_type for n in step.graph.node if n.name.startswith(f"{name}/")} == {"Identity", "Cast"}
    # self-attention's k/v read q's a_hat (one tensor, one quantizer); the constant-input k/v own none;
    # every layer that reads another's a_hat subtracts it from the very tensor its owner reads
    owners = {layer.name: layer.a_hat_owner for layer in manifest.layers if layer.a_hat_owner}
    self_kv = {layer.name for layer in manifest.layers if layer.name.endswith(("attn1.to_k", "attn1.to_v"))}
    assert self_kv and self_kv <= set(owners) and not expected & set(owners)
    assert all(owners[name] == name[: -len("to_k")] + "to_q" for name in self_kv)
    reads = {n.name.split("/")[0]: n.input[0] for n in step.graph.node if n.op_type == "Sub" and "/" in n.name}
    assert all(reads[name] == reads[owner] for name, owner in owners.items())
    warm_outputs = {value.name for value in onnx.load(str(out / "warmup.onnx")).graph.output}
    assert not {f"a_hat_out.{name}" for name in expected} & warm_outputs
    inits = {i.name: numpy_helper.to_array(i) for i in step.graph.initializer}
    scales = [inits[n.input[1]] for n in step.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and min(float(v.min()) for v in scales) > 0
    # The state memory counts no a_hat for them (nor a second one for a shared tensor), and the CPU
    # runner lays out exactly the graph's I/O.
    elements = sum(
        int(np.prod(layer.o_hat_shape))
        + (0 if layer.constant_input or layer.a_hat_owner else int(np.prod(layer.a_hat_shape)))
        for layer in manifest.layers
    )
    assert manifest.state_bytes_per_sample() == elements * 4 * 2  # fp32 state, cond + uncond
    layout = layout_from_manifest(manifest, 2)
    assert {slot.input_name for slot in layout.slots} == {n for n in inputs if "_hat_in." in n}


def test_churches_export_parity_and_cli_sample_decodes(tmp_path):
    path, ckpt, unet = small_ldm(tmp_path, "churches")
    cfg = load_config(path)
    qmodel = quantize_unet(unet, QuantConfig(8, None))
    export_model(unet, qmodel, cfg, tmp_path / "exp", checkpoint=ckpt)
    with pytest.raises(ConfigError, match="guidance"):
        export_model(unet, qmodel, cfg, tmp_path / "bad", guidance=True)
    sampler = make_sampler(cfg, steps=5)
    assert (sampler.name, sampler.guided) == ("ldm-ddim", False)
    noise = torch.randn(2, *cfg.sample_shape, generator=torch.Generator().manual_seed(4))
    assert (
        rel_err(ldm_states(OrtRunner(tmp_path / "exp"), sampler, noise, None), ldm_states(qmodel, sampler, noise, None))
        < 1e-4
    )
    result = CliRunner().invoke(
        app,
        [
            "sample",
            str(tmp_path / "exp"),
            "--backend",
            "ort",
            "-n",
            "3",
            "--batch-size",
            "2",
            "--steps",
            "4",
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    npz = np.load(tmp_path / "out" / "samples.npz")
    assert (
        npz["arr_0"].shape == (3, 16, 16, 3) and npz["z0"].shape == (3, 4, 8, 8) and npz["x0"].shape == (3, 3, 16, 16)
    )
    assert (tmp_path / "out" / "000002.png").is_file()


def test_bedrooms_vq_decoder_and_eta_sampling(tmp_path):
    path, ckpt, _ = small_ldm(tmp_path, "bedrooms")
    cfg = load_config(path)
    runner = load_reference(cfg, ckpt, QuantConfig(8, None)).qmodel
    decoder = load_first_stage(cfg.ldm, ckpt)
    sampler = make_sampler(cfg, steps=2, eta=1.0)
    first, second = (
        np.load(
            write_samples(
                runner,
                sampler,
                cfg.sample_shape,
                tmp_path / name,
                3,
                2,
                seed=1,
                decoder=decoder,
                pngs=False,
                progress=False,
            )
        )
        for name in ("out", "again")
    )
    assert first["z0"].shape == (3, 3, 8, 8) and first["x0"].shape == (3, 3, 32, 32)
    assert first["x0"].tobytes() == second["x0"].tobytes()


def test_text_conditioning_errors_are_clear(tmp_path):
    sd = load_config("sd-v1")
    with pytest.raises(ConfigError, match="--text-encoder"):
        make_conditioning(sd.context_shape, sd.source, prompt="a church")
    with pytest.raises(ConfigError, match="unconditional"):
        make_conditioning(None, "ldm-churches", prompt="a church")
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match=r"modiff-trt\[sd\]"):
            make_conditioning(sd.context_shape, sd.source, prompt="a church", text_encoder=tmp_path)
    with pytest.raises(ConfigError, match="unconditional"):
        make_sampler(load_config("ldm-churches"), guidance_scale=7.5)
    with pytest.raises(ConfigError, match="divides"):
        make_sampler(sd, steps=3)  # range(0, 1000, 333) + 1 would index timestep 1000


def test_ema_export_is_recorded_and_the_torch_backend_rebuilds_ema_weights(tmp_path):
    path, _, unet = small_ldm(tmp_path, "churches")
    ema = randomize(load_config(path).build(), seed=5).eval()
    ckpt = lightning_ckpt(tmp_path, "with_ema", unet, ema=ema)
    result = CliRunner().invoke(
        app,
        ["export", "-c", str(path), "--checkpoint", str(ckpt), "--ema", "--act-bits", "0", "-o", str(tmp_path / "exp")],
    )
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "exp")
    assert manifest.model.ema is True
    from modiff_trt.engines.torch_backend import reference_from_manifest

    rebuilt = reference_from_manifest(manifest, tmp_path / "exp")
    conv = "input_blocks.0.0"
    assert torch.equal(rebuilt.layers[conv].module.weight, ema.get_submodule(conv).weight)
    assert not torch.equal(rebuilt.layers[conv].module.weight, unet.get_submodule(conv).weight)
