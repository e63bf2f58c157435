"""Beta schedules and DDIM timestep selections, bit-for-bit as the official runners build them."""

from __future__ import annotations

import numpy as np
import torch


def linear_betas(beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000) -> torch.Tensor:
    """ddim's `linear` schedule: float64 linspace, then float32 (as `Diffusion.__init__` does)."""
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    return torch.from_numpy(betas).float()


def sqrt_linear_betas(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Latent diffusion's `linear` schedule, linear in sqrt(beta) (float64, then float32)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return betas.float()


def make_betas(schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Betas by the name a config uses: `linear` (ddim) or `sqrt_linear` (latent diffusion)."""
    if schedule == "linear":
        return linear_betas(beta_start, beta_end, num_train_timesteps)
    if schedule == "sqrt_linear":
        return sqrt_linear_betas(beta_start, beta_end, num_train_timesteps)
    raise ValueError(f"unknown beta schedule {schedule!r}: use 'linear' or 'sqrt_linear'")


def ddim_timesteps(num_steps: int, skip_type: str = "uniform", num_train_timesteps: int = 1000) -> list[int]:
    """The increasing timestep sequence of ddim's runner (`uniform`: stride, `quad`: squares).

    `quad` may repeat a timestep at small step counts (100 steps give 96 unique values); the
    official runner keeps the repeats, and so do we, so trajectories stay comparable.
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    if skip_type == "uniform":
        return list(range(0, num_train_timesteps, num_train_timesteps // num_steps))
    if skip_type == "quad":
        seq = np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2
        return [int(s) for s in seq]
    raise ValueError(f"unknown skip_type {skip_type!r}: use 'uniform' or 'quad'")
