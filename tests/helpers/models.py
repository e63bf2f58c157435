"""Small models and checkpoints: tiny DDIM UNets, configs in the official YAML layouts, shrunk
latent-diffusion configs shaped like the three paper models, Lightning checkpoints on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from modiff_trt.models import DDIMUNet, DDIMUNetConfig
from modiff_trt.models.openaimodel import UNetConfig

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16)


def ddim_yaml(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, channels=3) -> dict:
    """A config dict in ermongroup/ddim's layout (what users pass with --config)."""
    return {
        "data": {"dataset": "TINY", "image_size": resolution, "channels": channels},
        "model": {
            "type": "simple",
            "in_channels": channels,
            "out_ch": channels,
            "ch": ch,
            "ch_mult": list(ch_mult),
            "num_res_blocks": num_res_blocks,
            "attn_resolutions": list(attn_resolutions),
            "dropout": 0.1,
            "resamp_with_conv": True,
        },
        "diffusion": {
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "num_diffusion_timesteps": 1000,
        },
    }


def tiny_unet(seed: int = 0, **overrides) -> DDIMUNet:
    """A small DDIM UNet with non-trivial random weights (GroupNorm affine and biases perturbed)."""
    torch.manual_seed(seed)
    cfg = dict(TINY, **overrides)
    model = DDIMUNet(
        DDIMUNetConfig(
            ch=cfg["ch"],
            ch_mult=tuple(cfg["ch_mult"]),
            num_res_blocks=cfg["num_res_blocks"],
            attn_resolutions=tuple(cfg["attn_resolutions"]),
            resolution=cfg["resolution"],
            dropout=0.1,
        )
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


KL_SMALL = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 32,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    },
}
VQ_SMALL = {
    "target": "ldm.models.autoencoder.VQModelInterface",
    "params": {
        "embed_dim": 3,
        "n_embed": 16,
        "ddconfig": {
            "double_z": False,
            "z_channels": 3,
            "resolution": 32,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 2, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [8],
            "dropout": 0.0,
        },
    },
}

# model.params of shrunk configs shaped like the three paper models.
SMALL: dict[str, dict[str, Any]] = {
    "churches": {
        "linear_start": 0.0015,
        "linear_end": 0.0155,
        "image_size": 8,
        "channels": 4,
        "concat_mode": False,
        "scale_by_std": True,
        "cond_stage_config": "__is_unconditional__",
        "unet_config": {
            "params": {
                "image_size": 8,
                "in_channels": 4,
                "out_channels": 4,
                "model_channels": 32,
                "attention_resolutions": [2],
                "num_res_blocks": 1,
                "channel_mult": [1, 2],
                "num_heads": 4,
                "use_scale_shift_norm": True,
                "resblock_updown": True,
            }
        },
        "first_stage_config": KL_SMALL,
    },
    "bedrooms": {
        "linear_start": 0.0015,
        "linear_end": 0.0195,
        "image_size": 8,
        "channels": 3,
        "cond_stage_config": "__is_unconditional__",
        "unet_config": {
            "params": {
                "image_size": 8,
                "in_channels": 3,
                "out_channels": 3,
                "model_channels": 32,
                "attention_resolutions": [1, 2],
                "num_res_blocks": 1,
                "channel_mult": [1, 2],
                "num_head_channels": 16,
            }
        },
        "first_stage_config": VQ_SMALL,
    },
    "sd": {
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "image_size": 8,
        "channels": 4,
        "conditioning_key": "crossattn",
        "scale_factor": 0.18215,
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        "unet_config": {
            "params": {
                "image_size": 8,
                "in_channels": 4,
                "out_channels": 4,
                "model_channels": 32,
                "attention_resolutions": [1],
                "num_res_blocks": 1,
                "channel_mult": [1, 2],
                "num_heads": 2,
                "use_spatial_transformer": True,
                "transformer_depth": 1,
                "context_dim": 16,
                "use_checkpoint": True,
                "legacy": False,
            }
        },
        "first_stage_config": KL_SMALL,
    },
}


def write_yaml(tmp_path: Path, name: str, params: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    doc = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}
    path.write_text(yaml.safe_dump(doc))
    return path


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Fill every tensor (zero-initialised output convs included) so that forwards differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def lightning_ckpt(
    tmp_path: Path,
    name: str,
    unet: nn.Module,
    decoder: nn.Module | None = None,
    ema: nn.Module | None = None,
    **extra: torch.Tensor,
) -> Path:
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    if decoder is not None:
        sd.update({f"first_stage_model.{k}": v for k, v in decoder.state_dict().items()})
        sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)  # ignored: decode only
    if ema is not None:
        sd.update({"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in ema.state_dict().items()})
        sd["model_ema.decay"] = torch.tensor(0.9999)
    sd.update(extra)
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000}, path)
    return path


def inputs(cfg: UNetConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, cfg.in_channels, 8, 8, generator=gen)
    t = torch.tensor([999, 1][:batch])
    ctx = None if cfg.context_dim is None else torch.randn(batch, 5, cfg.context_dim, generator=gen)
    return x, t, ctx
