"""Shrunk latent-diffusion models on disk (config, Lightning checkpoint, decoder) and their
sampler trajectories, shared by the LDM pipeline and activation-format tests."""

from __future__ import annotations

from pathlib import Path

import torch

from modiff_trt.models import load_config
from modiff_trt.models.autoencoder import FirstStageConfig, build_first_stage
from tests.helpers.models import SMALL, lightning_ckpt, randomize, write_yaml


def small_ldm(tmp_path: Path, name: str, seed: int = 0):
    """(config path, checkpoint path, float UNet) of a shrunk paper config, decoder included."""
    path = write_yaml(tmp_path, name, SMALL[name])
    cfg = load_config(path)
    unet = randomize(cfg.build(), seed).eval()
    decoder = randomize(build_first_stage(FirstStageConfig.from_yaml(SMALL[name]["first_stage_config"])), seed + 1)
    return path, lightning_ckpt(tmp_path, name, unet, decoder), unet


def ldm_states(runner, sampler, noise, context) -> torch.Tensor:
    """Every sampler state x of one trajectory of `sampler` from `noise`, stacked."""
    xs = []
    sampler.trajectory(runner, noise, conditioning=context, callback=lambda step, t, x: xs.append(x.clone()))
    return torch.stack(xs)
