"""Shared fixtures: tiny DDIM UNets, configs in the official YAML layout, checkpoints on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from modiff_trt.models import DDIMUNet, DDIMUNetConfig

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16)


def ddim_yaml(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, channels=3) -> dict:
    """A config dict in ermongroup/ddim's layout (what users pass with --config)."""
    return {
        "data": {"dataset": "TINY", "image_size": resolution, "channels": channels},
        "model": {
            "type": "simple", "in_channels": channels, "out_ch": channels, "ch": ch, "ch_mult": list(ch_mult),
            "num_res_blocks": num_res_blocks, "attn_resolutions": list(attn_resolutions), "dropout": 0.1,
            "resamp_with_conv": True,
        },
        "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 1000},
    }


def tiny_unet(seed: int = 0, **overrides) -> DDIMUNet:
    """A small DDIM UNet with non-trivial random weights (GroupNorm affine and biases perturbed)."""
    torch.manual_seed(seed)
    cfg = dict(TINY, **overrides)
    model = DDIMUNet(DDIMUNetConfig(
        ch=cfg["ch"], ch_mult=tuple(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"],
        attn_resolutions=tuple(cfg["attn_resolutions"]), resolution=cfg["resolution"], dropout=0.1,
    ))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(ddim_yaml()))
    return path


@pytest.fixture
def tiny_model() -> DDIMUNet:
    return tiny_unet()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_model: DDIMUNet) -> Path:
    path = tmp_path / "tiny.ckpt"
    torch.save(tiny_model.state_dict(), path)
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
