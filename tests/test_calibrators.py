"""Calibrators: residual calibration, scale search, the calibration file and Q-Diffusion import."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from modiff_trt.calibrators import (
    Calibration,
    CalibrationOptions,
    calibrate,
    calibrate_together,
    import_qdiffusion,
    load_calibration,
)
from modiff_trt.calibrators.collect import StreamStats, calibration_steps
from modiff_trt.calibrators.search import activation_scale, mse_weight
from modiff_trt.errors import ArtifactError, CheckpointError, ConfigError
from modiff_trt.models import load_config
from modiff_trt.quant import QuantConfig, quantizable_layers, quantize_unet
from modiff_trt.sampling import ddim_sample, ddim_timesteps, make_betas, make_sampler
from tests.helpers.export import BETAS
from tests.helpers.models import ddim_yaml, rel_err

FAST = dict(cali_st=5, cali_n=8, batch_size=4, reservoir=4096)


def run_calibrate(config, checkpoint, out, steps: int = 10, **options) -> Calibration:
    """`calibrate` on 10 DDIM steps and a small trajectory budget (FAST), `options` on top."""
    cfg = load_config(config)
    return calibrate(
        cfg, checkpoint, out, make_sampler(cfg, steps=steps), CalibrationOptions(**{**FAST, **options}), progress=False
    )


def run_import(config, checkpoint, out, **options) -> Calibration:
    """`import_qdiffusion`; with modulate=True it calibrates like `run_calibrate`."""
    cfg = load_config(config)
    if not options.setdefault("modulate", False):
        return import_qdiffusion(cfg, checkpoint, out, CalibrationOptions(**options))
    return import_qdiffusion(
        cfg, checkpoint, out, CalibrationOptions(**{**FAST, **options}), make_sampler(cfg, steps=10), progress=False
    )


# -- a checkpoint in Q-Diffusion's exact key layout -----------------------------------------
def qdiffusion_checkpoint(model, path: Path, bits: int, split: bool = True, one_sided: bool = False) -> Path:
    """`model.`-prefixed fp32 weights plus AdaRound weight and activation quantizers per layer."""
    gen = torch.Generator().manual_seed(1)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    splits = model.split_points() if split else {}
    for name in quantizable_layers(model):
        weight = model.get_submodule(name).weight.detach()
        if one_sided:  # a positive-only channel gets zero point 0 and codes up to 2^b - 1
            weight = weight.clone()
            weight[0] = weight[0].abs()
            state[f"model.{name}.weight"] = weight
        cut = splits.get(name, 0)
        parts = [weight[:, :cut], weight[:, cut:]] if cut else [weight]
        for i, part in enumerate(parts):
            suffix = "" if i == 0 else "_0"
            flat = part.reshape(part.shape[0], -1)
            lo, hi = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
            delta = 0.9 * (hi - lo) / (2**bits - 1)  # 0.9: some values clamp, as MSE-searched ranges do
            zero_point = torch.round(-lo / delta)
            view = (-1,) + (1,) * (part.dim() - 1)
            q = f"model.{name}.weight_quantizer{suffix}"
            state[f"{q}.alpha"] = torch.randn(part.shape, generator=gen)
            state[f"{q}.delta"] = delta.view(view).clone()
            state[f"{q}.zero_point"] = zero_point.view(view).clone()
            state[f"model.{name}.act_quantizer{suffix}.delta"] = torch.tensor(0.05 + 0.01 * i)
            state[f"model.{name}.act_quantizer{suffix}.zero_point"] = torch.tensor(float(2 ** (bits - 1) + i))
    state["model.mid.attn_1.act_quantizer_q.delta"] = torch.tensor(0.1)  # attention quantizers are ignored
    torch.save(state, path)
    return path


def expected_weight(state: dict, name: str, bits: int, cut: int) -> torch.Tensor:
    """(clamp(floor(W/d) + (alpha >= 0) + z, 0, 2^b - 1) - z) * d, written out independently."""
    weight = state[f"model.{name}.weight"]
    parts = [weight[:, :cut], weight[:, cut:]] if cut else [weight]
    out = []
    for i, part in enumerate(parts):
        q = f"model.{name}.weight_quantizer{'' if i == 0 else '_0'}"
        d, z, alpha = state[f"{q}.delta"], state[f"{q}.zero_point"], state[f"{q}.alpha"]
        w_int = torch.clamp(torch.floor(part / d) + (alpha >= 0).float() + z, 0, 2**bits - 1)
        out.append((w_int - z) * d)
    return torch.cat(out, dim=1)


def static_model(model, calibration: Calibration, config, checkpoint, **quant):
    quant = {"act_scales": "static", **quant}
    return quantize_unet(model, QuantConfig(**quant), calibration.to_scale_set(config, checkpoint))


# -- Q-Diffusion import --------------------------------------------------------------------
def test_qdiffusion_import_rebuilds_adaround_weights_exactly(tmp_path, tiny_model, tiny_config):
    ckpt = qdiffusion_checkpoint(tiny_model, tmp_path / "cifar_w4a8_ckpt.pth", bits=4)
    cal = run_import(tiny_config, ckpt, tmp_path / "q.safetensors", weight_bits=4, act_bits=8)
    assert cal.kind == "raw" and not cal.modulate and cal.meta["split"] is True
    assert cal.meta["weights"]["rounding"] == "adaround"
    loaded = load_calibration(tmp_path / "q.safetensors")
    state = torch.load(ckpt)
    assert cal.meta["first_last_bits"] is None and cal.meta["layer_weight_bits"] == {}
    q = static_model(
        tiny_model,
        loaded,
        load_config(tiny_config),
        ckpt,
        weight_bits=4,
        act_bits=8,
        modulate=False,
        split=True,
        first_last_bits=None,
    )
    splits = tiny_model.split_points()
    assert splits and all(len(q.layers[n].groups) == 2 for n in splits)
    for name, layer in q.layers.items():
        want = expected_weight(state, name, 4, splits.get(name, 0))
        assert torch.equal(layer.w_deq, want), name
        assert layer.weight_codes.abs().max() <= 15  # a 4-bit asymmetric grid in a symmetric int8 container
    first = next(iter(splits))
    assert q.layers[first].scales.act == pytest.approx([0.05, 0.06])
    assert q.layers[first].scales.act_zero_point == [8.0, 9.0]


def test_qdiffusion_8bit_asymmetric_is_exact_where_it_fits_and_rerounded_elsewhere(tmp_path, tiny_model, tiny_config):
    ckpt = qdiffusion_checkpoint(tiny_model, tmp_path / "w8.pth", bits=8, split=False, one_sided=True)
    state = torch.load(ckpt)
    for key in [k for k in state if k.endswith("weight_quantizer.zero_point")]:
        state[key][1] = 128.0  # channel 1: codes W_int - 128 lie in [-128, 127], an int8 grid already
    torch.save(state, ckpt)
    cal = run_import(tiny_config, ckpt, tmp_path / "q8.safetensors", weight_bits=8, act_bits=8)
    report = cal.meta["weights"]
    assert report["requantized_channels"] >= len(cal.layers)  # at least the one-sided channel 0 of each layer
    assert 0.4 < report["max_weight_error_in_delta"] <= 1.01  # one-sided channels: about one delta
    for name, entry in cal.layers.items():
        want = expected_weight(state, name, 8, 0)
        view = (-1,) + (1,) * (want.dim() - 1)
        got = entry.weight_codes * entry.weight_scale[:, 0].view(view)
        assert entry.weight_codes.min() >= -128 and entry.weight_codes.max() <= 127
        err = (got - want).abs().reshape(want.shape[0], -1).amax(1)
        assert err[0] > 0 and err[1] == 0, name  # re-rounded vs kept exactly
        assert torch.all(err <= entry.weight_scale[:, 0] / 2 * (1 + 1e-5))
        assert float(err.max()) <= report["max_weight_error"]


def test_qdiffusion_raw_scales_refuse_a_modulated_model(tmp_path, tiny_model, tiny_config):
    ckpt = qdiffusion_checkpoint(tiny_model, tmp_path / "q.pth", bits=4)
    cal = run_import(tiny_config, ckpt, tmp_path / "q.safetensors", weight_bits=4, act_bits=8)
    with pytest.raises(ConfigError, match="raw activations.*calibrate with --modulate"):
        static_model(
            tiny_model, cal, load_config(tiny_config), ckpt, weight_bits=4, act_bits=8, modulate=True, split=True
        )


def test_qdiffusion_import_with_modulate_calibrates_residuals_and_keeps_weights(tmp_path, tiny_model, tiny_config):
    ckpt = qdiffusion_checkpoint(tiny_model, tmp_path / "q.pth", bits=4)
    cal = run_import(tiny_config, ckpt, tmp_path / "m.safetensors", weight_bits=4, act_bits=8, modulate=True)
    assert cal.kind == "residual" and cal.meta["origin"] == "qdiffusion+calibration"
    state = torch.load(ckpt)
    assert cal.meta["first_last_bits"] is None  # Q-Diffusion keeps its input/output conv at W4 too
    with pytest.raises(ConfigError, match="W4 integer weights for layer conv_in.*at W8.*--first-last-bits"):
        static_model(tiny_model, cal, load_config(tiny_config), ckpt, weight_bits=4, act_bits=8, split=True)
    q = static_model(
        tiny_model, cal, load_config(tiny_config), ckpt, weight_bits=4, act_bits=8, split=True, first_last_bits=None
    )
    name = next(iter(tiny_model.split_points()))
    assert torch.equal(q.layers[name].w_deq, expected_weight(state, name, 4, tiny_model.split_points()[name]))
    assert q.layers[name].scales.act_zero_point is None and len(q.layers[name].scales.act) == 2


def test_qdiffusion_import_errors_name_the_problem(tmp_path, tiny_model, tiny_config, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="no weight_quantizer.*not a Q-Diffusion"):
        run_import(tiny_config, tiny_checkpoint, tmp_path / "x.safetensors", weight_bits=4, act_bits=8)
    ckpt = qdiffusion_checkpoint(tiny_model, tmp_path / "q.pth", bits=4)
    state = torch.load(ckpt)
    name, cut = next(iter(tiny_model.split_points().items()))
    for suffix in ("", "_0"):  # move the split point by one channel, as a wrong-config file would
        key = f"model.{name}.weight_quantizer{suffix}.alpha"
        shape = list(state[key].shape)
        shape[1] += 1 if suffix == "" else -1
        state[key] = torch.zeros(shape)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=f"{name} is split at input channel {cut + 1}.*splits at {cut}"):
        run_import(tiny_config, tmp_path / "bad.pth", tmp_path / "x.safetensors", weight_bits=4, act_bits=8)
    assert not (tmp_path / "x.safetensors").exists()


# -- calibration ---------------------------------------------------------------------------
def test_calibration_is_deterministic_for_a_seed(tmp_path, tiny_config, tiny_checkpoint):
    runs = [
        run_calibrate(tiny_config, tiny_checkpoint, tmp_path / f"{i}.safetensors", method="mse", seed=seed)
        for i, seed in enumerate((3, 3, 4))
    ]
    a, b, c = (load_calibration(tmp_path / f"{i}.safetensors") for i in range(3))
    assert a.layers.keys() == b.layers.keys() and len(a.layers) == len(runs[0].layers)
    for name in a.layers:
        assert a.layers[name].act == b.layers[name].act and a.layers[name].warmup == b.layers[name].warmup
        assert torch.equal(a.layers[name].weight_codes, b.layers[name].weight_codes)
    assert any(a.layers[n].act != c.layers[n].act for n in a.layers)  # the seed matters


def test_static_modiff_tracks_float_better_than_plain_at_4bit(tmp_path, tiny_model, tiny_config, tiny_checkpoint):
    config = load_config(tiny_config)
    seq, betas = ddim_timesteps(10, "quad"), make_betas("linear", 1e-4, 0.02).float()
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(123))  # not calibration noise
    reference = ddim_sample(tiny_model, noise, seq, betas)
    errors = {}
    for modulate in (True, False):
        cal = run_calibrate(
            tiny_config,
            tiny_checkpoint,
            tmp_path / f"{modulate}.safetensors",
            act_bits=4,
            modulate=modulate,
            method="mse",
        )
        assert cal.kind == ("residual" if modulate else "raw")
        q = static_model(tiny_model, cal, config, tiny_checkpoint, weight_bits=8, act_bits=4, modulate=modulate)
        errors[modulate] = rel_err(ddim_sample(q, noise, seq, betas), reference)
    assert errors[True] < 0.5 * errors[False], errors


def test_files_calibrated_together_equal_files_calibrated_alone(tmp_path, tiny_config, tiny_checkpoint):
    """One set of trajectories feeds raw, residual and per-step-group residual statistics; each
    file is what it would be alone (same scales, bit for bit: minmax and mse, INT and FP8, one and
    three step groups), and files whose trajectories differ are refused."""
    cfg = load_config(tiny_config)
    sampler = make_sampler(cfg, steps=10)
    options = {
        "raw8": CalibrationOptions(**FAST, act_bits=8, modulate=False),
        "res4": CalibrationOptions(**FAST, act_bits=4, modulate=True),
        "res8mse": CalibrationOptions(**FAST, act_bits=8, modulate=True, method="mse"),
        "res4g3": CalibrationOptions(**FAST, act_bits=4, modulate=True, step_groups=3),
        "res-fp8": CalibrationOptions(**FAST, act_bits=8, modulate=True, act_format="fp8"),
    }
    together = calibrate_together(
        cfg, tiny_checkpoint, {tmp_path / f"{k}.t": o for k, o in options.items()}, sampler, progress=False
    )
    for (key, entry), joint in zip(options.items(), together, strict=True):
        alone = calibrate(cfg, tiny_checkpoint, tmp_path / f"{key}.a", sampler, entry, progress=False)
        assert joint.kind == alone.kind and joint.layers.keys() == alone.layers.keys()
        assert joint.meta["step_groups"] == alone.meta["step_groups"] and joint.meta["act_format"] == entry.act_format
        for name, scales in alone.layers.items():
            mine = joint.layers[name]
            assert (mine.act, mine.warmup, mine.act_groups, mine.act_format) == (
                scales.act,
                scales.warmup,
                scales.act_groups,
                scales.act_format,
            ), (key, name)
    assert together[3].meta["step_groups"]["count"] == 3 and together[1].meta["step_groups"] is None
    assert together[0].meta["report"]["files_from_these_trajectories"] == 5
    with pytest.raises(ConfigError, match="cali_n differ"):
        calibrate_together(
            cfg,
            tiny_checkpoint,
            {tmp_path / "a": options["raw8"], tmp_path / "b": CalibrationOptions(**{**FAST, "cali_n": 4})},
            sampler,
        )


def test_split_calibration_has_per_group_scales(tmp_path, tiny_model, tiny_config, tiny_checkpoint):
    cal = run_calibrate(tiny_config, tiny_checkpoint, tmp_path / "s.safetensors", split=True)
    for name in tiny_model.split_points():
        assert len(cal.layers[name].act) == 2 and len(cal.layers[name].warmup) == 2
    with pytest.raises(ConfigError, match="--split setting disagree"):
        static_model(tiny_model, cal, load_config(tiny_config), tiny_checkpoint, split=False)
    static_model(tiny_model, cal, load_config(tiny_config), tiny_checkpoint, split=True, first_step="quantized")


def test_file_round_trip_and_metadata(tmp_path, tiny_config, tiny_checkpoint):
    out = tmp_path / "cal" / "c.safetensors"
    written = run_calibrate(tiny_config, tiny_checkpoint, out, method="percentile", weight_method="mse", weight_bits=6)
    loaded = load_calibration(out)
    assert [p.name for p in out.parent.iterdir()] == ["c.safetensors"]  # the temp file was renamed
    for name, entry in written.layers.items():
        got = loaded.layers[name]
        assert got.act == pytest.approx(entry.act, rel=1e-7) and got.warmup == pytest.approx(entry.warmup, rel=1e-7)
        assert torch.equal(got.weight_codes, entry.weight_codes) and torch.equal(got.weight_scale, entry.weight_scale)
        assert got.weight_codes.float().abs().max() <= (128 if name in ("conv_in", "conv_out") else 32)  # W8 ends
    meta = loaded.meta
    assert meta["format"] == "modiff-trt/calibration" and meta["version"] == 5 and meta["step_groups"] is None
    assert meta["first_last_bits"] == 8 and meta["layer_weight_bits"] == {"conv_in": 8, "conv_out": 8}
    assert meta["kind"] == "residual" and meta["modulate"] is True and meta["first_step"] == "fp"
    assert meta["weight_bits"] == 6 and meta["act_bits"] == 8 and meta["method"] == "percentile"
    assert meta["sampler"] == {
        "sampler": "ddim",
        "steps": 10,
        "skip_type": "quad",
        "eta": 0.0,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "num_train_timesteps": 1000,
    }
    assert meta["trajectories"] == {
        "cali_st": 5,
        "cali_n": 8,
        "batch_size": 4,
        "seed": 0,
        "calibration_steps": [1, 3, 5, 7, 9],
    }
    assert meta["layers"] == list(written.layers) and meta["report"]["peak_rss_mb"] > 0
    assert len(meta["checkpoint"]["sha256"]) == 64 and meta["config"]["sha256"] == load_config(tiny_config).sha256
    assert loaded.sampler(load_config(tiny_config)) == make_sampler(load_config(tiny_config), steps=10)


def test_version_1_files_still_load_and_give_their_sampler(tmp_path, tiny_config, tiny_checkpoint):
    """Version 1 kept steps/skip_type/eta (no betas) with the trajectory budget in `schedule`."""
    import json

    from safetensors.torch import load_file, save_file

    new = run_calibrate(tiny_config, tiny_checkpoint, tmp_path / "v2.safetensors", steps=6)
    meta = {k: v for k, v in new.meta.items() if k not in ("sampler", "trajectories")}
    meta.update(
        version=1,
        schedule={
            "steps": 6,
            "skip_type": "uniform",
            "eta": 0.5,
            "cali_st": 5,
            "cali_n": 8,
            "batch_size": 4,
            "seed": 0,
            "calibration_steps": [1, 2, 3, 4, 5],
        },
    )
    save_file(
        load_file(tmp_path / "v2.safetensors"), tmp_path / "v1.safetensors", metadata={"modiff_trt": json.dumps(meta)}
    )
    old = load_calibration(tmp_path / "v1.safetensors")
    cfg = load_config(tiny_config)
    assert old.sampler(cfg) == make_sampler(cfg, steps=6, skip_type="uniform", eta=0.5)
    assert old.layers.keys() == new.layers.keys() and old.to_scale_set(cfg, tiny_checkpoint).modulate
    sd_schedule = {"steps": 50, "skip_type": "ldm-uniform", "eta": 0.0, "sampler": "plms", "guidance_scale": 5.0}
    sd = load_config("sd-v1")
    assert Calibration({"version": 1, "schedule": sd_schedule}, {}).sampler(sd) == make_sampler(sd, guidance_scale=5.0)
    assert Calibration({"version": 1, "schedule": None}, {}).sampler(sd) is None  # a plain Q-Diffusion import


def test_version_4_files_hold_every_layer_at_their_weight_bits(tmp_path, tiny_config, tiny_checkpoint, tiny_model):
    """Before version 5 no file kept its first/last layers at other bits: such a file reads as
    --first-last-bits same, which export and sample then follow, and its W4 codes go on W4 layers."""
    import json

    from safetensors.torch import load_file, save_file

    from modiff_trt.api import QuantOptions
    from modiff_trt.calibrators.fileformat import calibration_settings

    new = run_calibrate(
        tiny_config, tiny_checkpoint, tmp_path / "v5.safetensors", weight_bits=4, method="mse", first_last_bits=None
    )
    meta = {k: v for k, v in new.meta.items() if k not in ("first_last_bits", "layer_weight_bits")}
    meta["version"] = 4
    v4 = tmp_path / "v4.safetensors"
    save_file(load_file(tmp_path / "v5.safetensors"), v4, metadata={"modiff_trt": json.dumps(meta)})
    old = load_calibration(v4)
    assert old.end_weight_bits == 4 and set(old.layer_weight_bits().values()) == {4}
    assert calibration_settings(v4)["first_last_bits"] == "same"
    quant = QuantOptions().following(v4).config("static")
    assert quant.first_last_bits is None and quant.end_weight_bits == 4
    q = quantize_unet(tiny_model, quant, old.to_scale_set(load_config(tiny_config), tiny_checkpoint))
    assert {layer.weight_bits for layer in q.layers.values()} == {4}


def _rewrite(src: Path, dst: Path, edit_tensors, **meta_changes) -> Path:
    """A copy of calibration `src` with edited tensors and metadata (what a hand edit or damage does)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as handle:
        meta = json.loads(handle.metadata()["modiff_trt"])
    tensors = load_file(src)
    edit_tensors(tensors)
    save_file(tensors, dst, metadata={"modiff_trt": json.dumps({**meta, **meta_changes})})
    return dst


def test_scales_that_no_calibration_could_give_are_refused(tmp_path, tiny_config, tiny_checkpoint, caplog):
    path = tmp_path / "c.safetensors"
    written = run_calibrate(tiny_config, tiny_checkpoint, path, method="mse")
    name = next(iter(written.layers))
    loaded = load_calibration(path).layers[name]
    assert loaded.act_absmax == pytest.approx(written.layers[name].act_absmax, rel=1e-7)
    assert loaded.act[0] <= loaded.act_absmax[0] / 127 * (1 + 1e-6) and loaded.warmup_absmax is not None

    def huge(tensors):
        tensors[f"{name}.act"][0] = 1e30

    with pytest.raises(ArtifactError, match=rf"layer {name}'s act scale 1e\+30 cannot come from its measured absmax"):
        load_calibration(_rewrite(path, tmp_path / "huge.safetensors", huge))
    with pytest.raises(ArtifactError, match=rf"layer {name} lacks the measured absmax of its warmup scales"):
        load_calibration(
            _rewrite(path, tmp_path / "no-absmax.safetensors", lambda tensors: tensors.pop(f"{name}.warmup_absmax"))
        )

    def version_3(tensors):
        for key in [k for k in tensors if k.endswith("_absmax")]:
            del tensors[key]

    old = load_calibration(_rewrite(path, tmp_path / "v3.safetensors", version_3, version=3))
    assert old.layers[name].act == loaded.act and "keeps no measured absmax" in caplog.text

    def nan(tensors):
        version_3(tensors)
        tensors[f"{name}.warmup"][0] = float("nan")

    with pytest.raises(ArtifactError, match=f"layer {name} has a warmup scale that is not a finite positive number"):
        load_calibration(_rewrite(path, tmp_path / "nan.safetensors", nan, version=3))


def test_mismatched_checkpoint_config_and_layers_give_clear_errors(tmp_path, tiny_model, tiny_config, tiny_checkpoint):
    cal = run_calibrate(tiny_config, tiny_checkpoint, tmp_path / "c.safetensors")
    config = load_config(tiny_config)
    other_ckpt = tmp_path / "other.ckpt"
    state = tiny_model.state_dict()
    state["conv_in.bias"] = state["conv_in.bias"] + 1
    torch.save(state, other_ckpt)
    with pytest.raises(ArtifactError, match=r"calibrated on .*tiny\.ckpt.*uses .*other\.ckpt.*--checkpoint"):
        cal.to_scale_set(config, other_ckpt)
    with pytest.raises(ArtifactError, match="random weights"):
        cal.to_scale_set(config, None)
    other_yaml = tmp_path / "wide.yml"
    other_yaml.write_text(yaml.safe_dump(ddim_yaml(ch_mult=(1, 2, 2))))
    with pytest.raises(ArtifactError, match=r"calibrated for config .*tiny\.yml.*not .*wide\.yml.*--config"):
        cal.to_scale_set(load_config(other_yaml), tiny_checkpoint)
    cal.meta["config"]["sha256"] = load_config(other_yaml).sha256  # same hash, other layers: caught too
    with pytest.raises(ArtifactError, match=r"does not match the layers of .*wide\.yml.*unknown"):
        cal.to_scale_set(load_config(other_yaml), tiny_checkpoint)


def test_bad_files_and_options(tmp_path, tiny_config, tiny_checkpoint):
    with pytest.raises(ArtifactError, match="not found.*modiff-trt calibrate"):
        load_calibration(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_calibration(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="choose one of minmax, mse, percentile"):
        run_calibrate(tiny_config, tiny_checkpoint, tmp_path / "x.safetensors", method="kl")
    with pytest.raises(ConfigError, match="no residual"):
        run_calibrate(tiny_config, tiny_checkpoint, tmp_path / "x.safetensors", steps=1)
    assert not (tmp_path / "x.safetensors").exists()


# -- statistics and search -----------------------------------------------------------------
def test_streaming_stats_stay_bounded_and_keep_exact_absmax():
    stats, gen = StreamStats(per_chunk=100), torch.Generator().manual_seed(0)
    for i in range(50):
        chunk = torch.randn(64, 8, 4, 4, generator=gen)
        if i == 17:
            chunk[3, 2, 1, 1] = 42.0
        stats.update(chunk, gen)
    assert stats.values().numel() == 5000 and stats.absmax == 42.0 and stats.count == 50 * 64 * 128
    assert abs(float(stats.values().std()) - 1.0) < 0.1  # an unbiased sample of the values


def test_scale_search_methods():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    absmax = 40.0  # one far outlier outside the sample
    assert activation_scale(x, absmax, 4, "minmax") == pytest.approx(absmax / 7)
    mse = activation_scale(x, absmax, 4, "mse")
    assert absmax * 0.2 / 7 <= mse < absmax / 7 * 0.5  # 80 candidates shrink the range to 21% at most
    pct = activation_scale(x, absmax, 4, "percentile", percentile=99.0)
    assert pct == pytest.approx(float(torch.quantile(x.abs(), 0.99)) / 7)
    weight = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    weight[0, 0, 0, 0] = 20.0
    codes, scale = mse_weight(weight, 4)
    assert scale[0] < 20.0 / 7 and codes.abs().max() <= 8 and torch.equal(codes, codes.round())
    assert calibration_steps(100, 20, True)[0] == 1 and calibration_steps(100, 20, False)[0] == 0
    assert len(calibration_steps(100, 20, True)) == 20 and calibration_steps(100, 20, True)[-1] == 99


# -- command line --------------------------------------------------------------------------
def test_cli_calibrate_then_sample_static_and_refuse_other_checkpoint(
    tmp_path, tiny_model, tiny_config, tiny_checkpoint
):
    from typer.testing import CliRunner

    from modiff_trt.cli import app

    runner, out = CliRunner(), tmp_path / "c.safetensors"
    args = [
        "calibrate",
        "-c",
        str(tiny_config),
        "--checkpoint",
        str(tiny_checkpoint),
        "-o",
        str(out),
        "--steps",
        "10",
        "--cali-st",
        "3",
        "--cali-n",
        "4",
        "--batch-size",
        "4",
        "--act-bits",
        "6",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_calibration(out).meta["act_bits"] == 6
    sample = [
        "sample",
        "-c",
        str(tiny_config),
        "--act-bits",
        "6",
        "--act-scales",
        "static",
        "--calibration",
        str(out),
        "-n",
        "2",
        "--steps",
        "10",
        "--no-pngs",
        "-o",
        str(tmp_path / "s"),
    ]
    result = runner.invoke(app, sample + ["--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    other = qdiffusion_checkpoint(tiny_model, tmp_path / "q.pth", bits=4)
    result = runner.invoke(app, sample + ["--checkpoint", str(other), "--overwrite"])
    assert result.exit_code == 2 and "scales do not carry over between checkpoints" in result.output
    calibrate_import = ["calibrate", "-c", str(tiny_config), "--from-qdiffusion", str(other), "--weight-bits", "4"]
    calibrate_import += ["--act-bits", "8", "--no-modulate", "-o", str(tmp_path / "q.safetensors")]
    result = runner.invoke(app, calibrate_import + ["--first-last-bits", "8"])
    assert result.exit_code == 2 and "holds every layer at --weight-bits" in " ".join(result.output.split())
    result = runner.invoke(app, calibrate_import)
    assert result.exit_code == 0, result.output
    assert load_calibration(tmp_path / "q.safetensors").kind == "raw"


# -- step groups ---------------------------------------------------------------------------
def test_step_group_calibration_round_trips_pins_the_schedule_and_runs_the_reference(
    tmp_path, tiny_model, tiny_config, tiny_checkpoint
):
    """Residual scales per step group: the file holds [G, channel groups] scales and the schedule;
    the reference switches groups per call, and sampling another schedule is refused with the fix."""
    out = tmp_path / "g.safetensors"
    written = run_calibrate(tiny_config, tiny_checkpoint, out, act_bits=4, step_groups=3, cali_st=9)
    loaded = load_calibration(out)
    groups = loaded.step_groups
    assert groups.bounds == (1, 4, 7, 10) and groups.timesteps == tuple(
        sorted(ddim_timesteps(10, "quad"), reverse=True)
    )
    for name, entry in loaded.layers.items():
        assert len(entry.act_groups) == 3 and entry.act == entry.act_groups[0]
        assert torch.allclose(torch.tensor(entry.act_groups), torch.tensor(written.layers[name].act_groups), rtol=1e-7)
    config = load_config(tiny_config)
    qmodel = quantize_unet(
        tiny_model, QuantConfig(8, 4, act_scales="static"), loaded.to_scale_set(config, tiny_checkpoint)
    )
    noise = torch.randn(2, *config.sample_shape, generator=torch.Generator().manual_seed(0))
    ddim_sample(qmodel, noise, ddim_timesteps(10, "quad"), BETAS)
    with pytest.raises(ConfigError, match="--steps 10 --skip-type quad, or recalibrate"):
        ddim_sample(qmodel, noise, ddim_timesteps(10, "uniform"), BETAS)
    with pytest.raises(ConfigError, match="--step-groups applies to MoDiff"):
        run_calibrate(
            tiny_config, tiny_checkpoint, tmp_path / "x.safetensors", act_bits=4, modulate=False, step_groups=2
        )
    with pytest.raises(ConfigError, match="without a calibration step: raise --cali-st"):
        run_calibrate(tiny_config, tiny_checkpoint, tmp_path / "x.safetensors", step_groups=9, cali_st=2)


def test_auto_step_groups_pick_a_pooling_of_the_measured_groups(tmp_path, tiny_config, tiny_checkpoint, caplog):
    """'auto' measures the finest power-of-two groups and keeps the fewest whose scales agree."""
    with caplog.at_level("INFO"):
        cal = run_calibrate(
            tiny_config, tiny_checkpoint, tmp_path / "auto.safetensors", act_bits=4, step_groups="auto", cali_st=9
        )
    assert "--step-groups auto picked" in caplog.text
    count = 1 if cal.step_groups is None else cal.step_groups.count
    assert count in (1, 2, 4, 8) and load_calibration(tmp_path / "auto.safetensors").meta["version"] == 5
