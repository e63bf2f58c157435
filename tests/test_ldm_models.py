"""LDM / SD UNet, configs, checkpoint loading and first-stage decoders on small configs.

Checkpoints are written here in the official Lightning layout (``state_dict`` with
``model.diffusion_model.*``, ``model_ema.*``, ``first_stage_model.*``) with shrunk channels.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from modiff_trt.errors import CheckpointError, ConfigError
from modiff_trt.models import ldm_builtins
from modiff_trt.models.autoencoder import FirstStageConfig, build_first_stage
from modiff_trt.models.ldm_config import load_ldm_yaml, resolve_ldm_config
from modiff_trt.models.ldm_loading import build_ldm_unet, load_first_stage, load_ldm, load_ldm_unet
from modiff_trt.models.openaimodel import UNetConfig, UNetModel, timestep_embedding
from tests.helpers.models import SMALL, VQ_SMALL, inputs, lightning_ckpt, randomize, write_yaml

# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize(("name", "params_m"), [("ldm-churches", 294.96), ("ldm-bedrooms", 274.06), ("sd-v1", 859.52)])
def test_builtin_parameter_counts(name: str, params_m: float) -> None:
    """Full-size built-ins on the meta device have the published parameter counts."""
    with torch.device("meta"):
        model = build_ldm_unet(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


def test_official_key_layout_and_plain_layers() -> None:
    sd_keys = build_ldm_unet(UNetConfig.from_params(SMALL["sd"]["unet_config"]["params"])).state_dict()
    for key in (
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias",
        "input_blocks.2.0.op.weight",
        "middle_block.1.proj_out.weight",
        "output_blocks.0.0.skip_connection.weight",
        "output_blocks.1.1.conv.weight",
        "output_blocks.2.1.transformer_blocks.0.norm3.weight",
        "out.0.weight",
        "out.2.weight",
    ):
        assert key in sd_keys, key
    assert sd_keys["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 16)

    churches = build_ldm_unet(UNetConfig.from_params(SMALL["churches"]["unet_config"]["params"]))
    keys = churches.state_dict()
    # resblock_updown: the downsampler is a ResBlock, the attention a fused qkv Conv1d.
    assert "input_blocks.2.0.in_layers.2.weight" in keys and "input_blocks.2.0.op.weight" not in keys
    assert keys["input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)
    assert keys["input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)  # scale + shift
    layers = [m for m in churches.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert layers and all(type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear) for m in layers)


def test_timestep_embedding_is_cos_then_sin() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs]
    assert torch.allclose(emb[1], torch.tensor(expected), atol=1e-6)


def test_forward_shapes_and_timestep_forms() -> None:
    model = randomize(build_ldm_unet(UNetConfig.from_params(SMALL["sd"]["unet_config"]["params"])), 0)
    x, t, ctx = inputs(model.config)
    with torch.no_grad():
        out = model(x, t, ctx)
        out_float_t = model(x, t.float(), ctx)
        out_no_ctx_change = model(x, t, ctx * 2)
    assert out.shape == x.shape
    assert torch.allclose(out, out_float_t)
    assert not torch.allclose(out, out_no_ctx_change)  # cross-attention really reads context


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"bogus_switch": 1}, "unknown unet_config parameter"),
        ({"num_heads": -1}, "num_heads or num_head_channels"),
        ({"context_dim": 8}, "use_spatial_transformer"),
    ],
)
def test_bad_unet_params_raise_config_error(params: dict[str, Any], message: str) -> None:
    base = dict(SMALL["churches"]["unet_config"]["params"])
    base.update(params)
    with pytest.raises(ConfigError, match=message):
        UNetConfig.from_params(base)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda p: p.update(timesteps=-5), "model.params.timesteps is -5"),
        (lambda p: p.update(channels=4.5), "model.params.channels is 4.5"),
        (lambda p: p["unet_config"]["params"].update(model_channels=32.5), "unet_config.params.model_channels is 32.5"),
        (lambda p: p["unet_config"]["params"].update(channel_mult=[1, 0]), "unet_config.params.channel_mult is 0"),
        (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(ch=-8), "ddconfig.ch is -8"),
    ],
)
def test_ldm_yaml_integer_fields_must_be_positive_integers(tmp_path: Path, edit, field) -> None:
    params = copy.deepcopy(SMALL["churches"])
    edit(params)
    with pytest.raises(ConfigError, match=rf"churches.yaml: .*{field}; it must be a positive integer"):
        load_ldm_yaml(write_yaml(tmp_path, "churches", params))


def test_official_yaml_text_parses(tmp_path: Path) -> None:
    text = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    image_size: 64
    channels: 4
    cond_stage_trainable: false   # comment as in the official file
    conditioning_key: crossattn
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""
    path = tmp_path / "v1-inference.yaml"
    path.write_text(text)
    cfg = load_ldm_yaml(path)
    assert cfg.conditioning_key == "crossattn" and cfg.scale_factor == pytest.approx(0.18215)
    assert cfg.unet == resolve_ldm_config("sd-v1").unet
    assert cfg.first_stage is None and cfg.latent_shape == (4, 64, 64)


def test_builtins_match_reference_facts() -> None:
    churches, beds, sd = (resolve_ldm_config(n) for n in ("ldm-churches", "ldm-bedrooms", "sd-v1"))
    assert churches.conditioning_key is None and churches.first_stage.kind == "kl"
    assert churches.first_stage.downsampling == 8 and churches.latent_shape == (4, 32, 32)
    assert beds.first_stage.kind == "vq" and beds.first_stage.n_embed == 8192
    assert beds.first_stage.downsampling == 4 and (beds.eta, beds.steps) == (1.0, 200)
    assert (sd.sampler, sd.steps, sd.guidance_scale) == ("plms", 50, 7.5)
    assert (sd.linear_start, sd.linear_end) == (0.00085, 0.012)


def test_unknown_config_name() -> None:
    with pytest.raises(ConfigError, match="ldm-churches"):
        resolve_ldm_config("ldm-cathedrals")


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("flavour", ["churches", "bedrooms", "sd"])
def test_lightning_checkpoint_roundtrip(tmp_path: Path, flavour: str) -> None:
    params = SMALL[flavour]
    yml = write_yaml(tmp_path, flavour, params)
    source = randomize(build_ldm_unet(yml), 1)
    ckpt = lightning_ckpt(tmp_path, flavour, source)
    loaded = load_ldm_unet(yml, ckpt)
    x, t, ctx = inputs(source.config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx), source(x, t, ctx))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())


def test_ema_weights_are_selected(tmp_path: Path) -> None:
    yml = write_yaml(tmp_path, "churches", SMALL["churches"])
    live, ema = randomize(build_ldm_unet(yml), 1), randomize(build_ldm_unet(yml), 2)
    ckpt = lightning_ckpt(tmp_path, "both", live, ema=ema)
    x, t, _ = inputs(live.config)
    with torch.no_grad():
        assert torch.equal(load_ldm_unet(yml, ckpt, ema=True)(x, t), ema(x, t))
        assert torch.equal(load_ldm_unet(yml, ckpt)(x, t), live(x, t))
    no_ema = lightning_ckpt(tmp_path, "live", live)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_ldm_unet(yml, no_ema, ema=True)


def test_fp16_checkpoint_is_cast_to_fp32(tmp_path: Path) -> None:
    yml = write_yaml(tmp_path, "sd", SMALL["sd"])
    source = randomize(build_ldm_unet(yml), 3)
    ckpt = lightning_ckpt(tmp_path, "half", source.half())
    loaded = load_ldm_unet(yml, ckpt)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ref = source.float()
    for (name, p), (_, q) in zip(loaded.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name  # half -> float is exact


def test_qdiffusion_wrapped_state_dict(tmp_path: Path) -> None:
    yml = write_yaml(tmp_path, "bedrooms", SMALL["bedrooms"])
    source = randomize(build_ldm_unet(yml), 4)
    sd = {f"model.{k}": v for k, v in source.state_dict().items()}
    sd["model.input_blocks.0.0.weight_quantizer.delta"] = torch.ones(32, 1, 1, 1)
    sd["model.input_blocks.0.0.act_quantizer.zero_point"] = torch.tensor(0.0)
    sd["model.input_blocks.1.1.attention.qk_matmul.act_quantizer_q.delta"] = torch.tensor(1.0)
    path = tmp_path / "bedroom_w8a8_ckpt.pth"
    torch.save(sd, path)
    loaded = load_ldm_unet(yml, path)
    x, t, _ = inputs(source.config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), source(x, t))


def test_mismatched_checkpoint_names_file_and_fitting_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Register the small configs as "built-ins" so the suggestion search stays cheap.
    builtins = {f"tiny-{k}": copy.deepcopy(v) for k, v in SMALL.items()}
    monkeypatch.setattr(ldm_builtins, "LDM_BUILTINS", builtins)
    source = randomize(build_ldm_unet("tiny-sd"), 5)
    ckpt = lightning_ckpt(tmp_path, "sd_small", source)
    with pytest.raises(CheckpointError) as err:
        load_ldm_unet("tiny-churches", ckpt)
    msg = str(err.value)
    assert "sd_small.ckpt" in msg and "missing" in msg and "unexpected" in msg
    assert "tiny-sd" in msg and "tiny-churches" not in msg.split("fits")[-1]

    narrow = dict(SMALL["sd"])
    narrow["unet_config"] = {"params": {**SMALL["sd"]["unet_config"]["params"], "context_dim": 8}}
    with pytest.raises(CheckpointError, match=r"shape: .*attn2\.to_k\.weight: checkpoint \(32, 16\)"):
        load_ldm_unet(write_yaml(tmp_path, "narrow", narrow), ckpt)


class _NotATensor:
    """A pickled object that weights_only loading refuses."""


def test_untrusted_pickle_is_refused_with_advice(tmp_path: Path) -> None:
    yml = write_yaml(tmp_path, "churches", SMALL["churches"])
    source = build_ldm_unet(yml)
    path = tmp_path / "pickled.ckpt"
    sd = {f"model.diffusion_model.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": sd, "callbacks": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="pickled.ckpt.*trust"):
        load_ldm_unet(yml, path)
    assert isinstance(load_ldm_unet(yml, path, trust=True), UNetModel)


def test_missing_or_garbage_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_ldm_unet("sd-v1", tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        load_ldm_unet("sd-v1", bad)


# ---------------------------------------------------------------- first stage


def test_kl_decoder_shapes_and_scale_factor(tmp_path: Path) -> None:
    yml = write_yaml(tmp_path, "sd", SMALL["sd"])
    cfg = resolve_ldm_config(yml)
    decoder = randomize(build_first_stage(cfg.first_stage), 6)
    assert "decoder.up.1.upsample.conv.weight" in decoder.state_dict()
    ckpt = lightning_ckpt(tmp_path, "sd", randomize(build_ldm_unet(yml), 0), decoder=decoder)
    loaded = load_first_stage(yml, ckpt)
    assert loaded.scale_factor == pytest.approx(0.18215)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        img = loaded.decode(z)
        assert img.shape == (2, 3, 16, 16)
        assert torch.allclose(img, decoder(z / 0.18215), atol=1e-6)
        assert not torch.allclose(img, decoder(z), atol=1e-3)


def test_vq_decoder_codebook_lookup_and_stored_scale(tmp_path: Path) -> None:
    yml = write_yaml(tmp_path, "bedrooms", SMALL["bedrooms"])
    cfg = resolve_ldm_config(yml)
    decoder = randomize(build_first_stage(cfg.first_stage), 7)
    codes = decoder.quantize.embedding.weight.detach()
    idx = torch.randint(0, 16, (2, 4, 4))
    z = codes[idx].permute(0, 3, 1, 2) + 1e-4 * torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        snapped = decoder.quantize(z)
    assert torch.equal(snapped, codes[idx].permute(0, 3, 1, 2))

    unet = randomize(build_ldm_unet(yml), 0)
    ckpt = lightning_ckpt(tmp_path, "beds", unet, decoder=decoder, scale_factor=torch.tensor(0.5))
    bundle = load_ldm(yml, ckpt)
    assert bundle.first_stage is not None and bundle.first_stage.scale_factor == 0.5
    with torch.no_grad():
        img = bundle.first_stage.decode(z * 0.5)
        assert img.shape == (2, 3, 16, 16)  # f4: 4x4 latent -> 16x16 image
        assert torch.allclose(img, decoder(z), atol=1e-5)


def test_decoder_mismatch_raises(tmp_path: Path) -> None:
    yml = write_yaml(tmp_path, "sd", SMALL["sd"])
    other = FirstStageConfig.from_yaml(VQ_SMALL)
    ckpt = lightning_ckpt(tmp_path, "mixed", randomize(build_ldm_unet(yml), 0), decoder=build_first_stage(other))
    with pytest.raises(CheckpointError, match="mixed.ckpt: first-stage decoder weights"):
        load_first_stage(yml, ckpt)
