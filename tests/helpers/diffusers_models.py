"""Tiny diffusers models saved as the folders users hold (nothing downloaded: built from configs)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
TINY_COND_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _randomize(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of a trained-looking scale: diffusers zero-initialises the output convs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.2 if p.dim() > 1 else 0.05))
    return unet.eval()


def unet_folder(path: Path, conditional: bool = False, seed: int = 0) -> Path:
    """A diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors) with random weights."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    cls, config = (UNet2DConditionModel, TINY_COND_UNET) if conditional else (UNet2DModel, TINY_UNET)
    torch.manual_seed(seed)
    _randomize(cls(**config), seed).save_pretrained(path, safe_serialization=True)
    return path


def pipeline_folder(path: Path, scheduler: str = "PNDMScheduler", seed: int = 0) -> Path:
    """A pipeline-layout folder: unet/ (conditional) and scheduler/ with Stable Diffusion's schedule."""
    import diffusers

    unet_folder(path / "unet", conditional=True, seed=seed)
    getattr(diffusers, scheduler)(**SD_SCHEDULE).save_pretrained(path / "scheduler")
    return path
