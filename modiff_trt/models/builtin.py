"""Weights that ship inside the package, by built-in config name.

`load_unet('digits', builtin_checkpoint('digits'))` gives the trained digits model on any
machine, with no download: the file lives in `modiff_trt/assets/` next to its JSON record
(seed, iterations, sha256, training time, command).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from modiff_trt.errors import CheckpointError, OptionError
from modiff_trt.models.diffusers_unet import diffusers_config, is_diffusers_folder
from modiff_trt.validate import not_a_directory

ASSET_DIR = "assets"


def _asset(name: str) -> Path:
    return Path(str(resources.files("modiff_trt").joinpath(ASSET_DIR, name)))


def builtin_checkpoint(name: str) -> Path | None:
    """The packaged weights of built-in config `name` (e.g. 'digits'), or None if none ship.

    None rather than an error: most built-in configs (ddim-cifar10, the LDMs) describe
    checkpoints the user must supply, which callers report in their own words.
    """
    path = _asset(f"{name}.safetensors")
    return path if path.is_file() else None


def builtin_record(name: str) -> dict[str, Any] | None:
    """The JSON record written with the packaged weights (sha256, seed, iterations, ...), or None."""
    path = _asset(f"{name}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_for(config: str | Path, checkpoint: str | Path | None, random_weights: bool = False) -> Path | None:
    """The checkpoint a command loads: the user's, else the packaged one of a built-in config.

    Refuses to fall back to random weights silently (sampling noise from an untrained UNet looks
    like a bug); `random_weights=True` asks for them explicitly (speed tests), even for a config
    with packaged weights, and cannot be combined with a checkpoint.
    """
    if random_weights:
        if checkpoint is not None:
            raise OptionError("--random-weights and --checkpoint exclude each other: drop one")
        return None
    if checkpoint is not None:
        not_a_directory("--checkpoint", checkpoint, "weights file")
        return Path(checkpoint)
    packaged = builtin_checkpoint(str(config))
    if packaged is not None:
        return packaged
    if is_diffusers_folder(config):  # a diffusers folder carries its weights
        return diffusers_config(config).weights
    raise CheckpointError(
        f"--checkpoint is required: config {config} has no packaged weights (only 'digits' ships with its "
        "weights); pass --random-weights to run an untrained network (speed tests only)"
    )
