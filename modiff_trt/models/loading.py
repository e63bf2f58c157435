"""`load_unet`: a config plus a checkpoint in any supported layout -> an eval-mode float UNet."""

from __future__ import annotations

from pathlib import Path

import torch

from modiff_trt.errors import CheckpointError, ConfigError
from modiff_trt.models.checkpoint import (
    diff_state_dict,
    extract_state_dict,
    read_checkpoint,
)
from modiff_trt.models.config import ModelConfig
from modiff_trt.models.diffusers_unet import DiffusersModelConfig
from modiff_trt.models.latent import LatentModelConfig
from modiff_trt.models.ldm_loading import load_ldm_unet
from modiff_trt.models.registry import ddim_builtin_names, load_config


def _fitting_builtins(state: dict[str, torch.Tensor], exclude: str) -> list[str]:
    """Built-in ddim configs whose parameter names and shapes equal the checkpoint's (built on meta).

    Latent-diffusion checkpoints get their own suggestion from `ldm_loading`.
    """
    fits = []
    for name in ddim_builtin_names():
        if name == exclude:
            continue
        try:
            cfg = load_config(name)
        except ConfigError:
            continue
        with torch.device("meta"):
            candidate = cfg.build()
        if not diff_state_dict(candidate, state):
            fits.append(name)
    return fits


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: str, config: str) -> None:
    """Strictly load `state`; on any difference raise an error listing it and a config that fits."""
    problems = diff_state_dict(model, state)
    if problems:
        fits = _fitting_builtins(state, exclude=config)
        hint = (
            f"the built-in config {' or '.join(repr(f) for f in fits)} fits this checkpoint"
            if fits
            else "check that --config is the YAML this checkpoint was trained with"
        )
        raise CheckpointError(f"{checkpoint} does not fit config {config}:\n  " + "\n  ".join(problems) + f"\n{hint}")
    model.load_state_dict(state, strict=True)


def load_unet(
    config: str | Path | ModelConfig, checkpoint: str | Path | None, trust: bool = False, ema: bool = False
) -> torch.nn.Module:
    """Build the UNet of `config` and load `checkpoint` into it (None: random init, for speed tests).

    Latent-diffusion configs go to `ldm_loading.load_ldm_unet`, which reads Lightning, EMA
    (`ema=True`), fp16 and Q-Diffusion files; ddim checkpoints have no EMA switch (their EMA
    copy is the file itself or the last list entry).
    """
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    if isinstance(cfg, DiffusersModelConfig):  # the folder's own weights, in diffusers' names
        model = cfg.build()
        if checkpoint is not None:
            load_state_into(model.net, read_checkpoint(checkpoint, trust=trust), str(checkpoint), cfg.source)
        return model.eval()
    latent = isinstance(cfg, LatentModelConfig)
    if latent and checkpoint is not None:
        return load_ldm_unet(cfg.ldm, checkpoint, ema=ema, trust=trust)
    if ema and not latent:
        raise ConfigError(f"--ema applies to latent-diffusion checkpoints; {cfg.source} is a {cfg.family} config")
    model = cfg.build()
    if checkpoint is not None:
        state = extract_state_dict(read_checkpoint(checkpoint, trust=trust), str(checkpoint))
        load_state_into(model, state, str(checkpoint), cfg.source)
    return model.eval()
