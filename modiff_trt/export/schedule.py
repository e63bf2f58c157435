"""The noise schedule recorded in a manifest, so a backend needs no config file to sample."""

from __future__ import annotations

import torch

from modiff_trt.export.manifest import Manifest
from modiff_trt.sampling.schedules import make_betas


def manifest_betas(manifest: Manifest) -> torch.Tensor:
    """Betas of the model an export was made from."""
    s = manifest.sampling
    return make_betas(s["beta_schedule"], s["beta_start"], s["beta_end"], s["num_train_timesteps"])
